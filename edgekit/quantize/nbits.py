"""Block-quantized weights for onnxruntime's ``com.microsoft::MatMulNBits`` (8 or 4 bits).

What: ``pack(w, cfg)`` turns an fp32 weight ``w`` [K, N] (a ``MatMul``'s B) into the kernel's
layout: ``q`` uint8 [N, K / block, block * bits / 8] (symmetric integers stored with the default
zero point 2^(bits-1); 4-bit: two per byte, low nibble first) and ``scales`` fp32 [N, K / block];
``matmul_nbits(x, w, out, name, add_init, cfg)`` returns the node that computes ``x @ w`` from them.

Why: with ``accuracy_level = 4`` the kernel quantizes its input itself, per row and per K-block
(symmetric int8), and runs integer dot products (VNNI where the CPU has it). One node then does
what the ``MatMulIntegerToFloat`` path spends six more on (per-token max, scale, divide, quantize,
rescale), and onnxruntime's per-node cost is what dominates an MoE layer's many small expert
GEMMs. Block scales on both sides are also finer than per-column weight / per-token activation
scales. 4 bits halves the weight bytes again (a precision the planner can choose per unit).

Invariants: every row's result depends on that row alone (per-row input blocks): prefill equals
decode and a batched row equals the row alone, as on the other int8 paths. Weights are symmetric
(integers in [-qmax, qmax], qmax = 127 or 7); no zero-point input is written.

Failure modes: ``K`` not a multiple of ``block`` or bits not 4/8 raise ``ValueError`` (callers keep
another path for that unit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import helper

from ..int8 import quantize_blocks

MS = "com.microsoft"


@dataclass(frozen=True)
class NBitsConfig:
    bits: int = 8                # 8 or 4
    block: int = 32              # weights (and, at accuracy_level 4, activations) per scale along K
    accuracy_level: int = 4      # 4: int8 compute (dynamic per-block activation quantization)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"MatMulNBits bits={self.bits}: use 4 or 8")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"MatMulNBits block={self.block}: use a power of two >= 16")

    @property
    def qmax(self) -> float:
        return float(2 ** (self.bits - 1) - 1)


def pack(w: np.ndarray, cfg: NBitsConfig) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] fp32 -> (q uint8 [N, K // block, block * bits // 8], scales fp32 [N, K // block])."""
    K, N = w.shape
    if K % cfg.block:
        raise ValueError(f"K={K} is not a multiple of the MatMulNBits block {cfg.block}")
    q, s = quantize_blocks(np.ascontiguousarray(w.T, np.float32), cfg.block, qmax=cfg.qmax)   # [N, K]
    u = (q.astype(np.int16) + 2 ** (cfg.bits - 1)).astype(np.uint8).reshape(N, K // cfg.block, cfg.block)
    if cfg.bits == 4:
        u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return u, s.astype(np.float32)


def unpack(q: np.ndarray, s: np.ndarray, cfg: NBitsConfig) -> np.ndarray:
    """The fp32 [K, N] weight ``pack`` encodes (for tests and emulation)."""
    if cfg.bits == 4:
        q = np.stack([q & 15, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)
    w = (q.astype(np.float32) - 2 ** (cfg.bits - 1)) * s[..., None]
    return w.reshape(w.shape[0], -1).T


def matmul_nbits(x: str, w: np.ndarray, out: str, name: str, add_init: Callable[[np.ndarray, str], str],
                 cfg: NBitsConfig, hint: str = "w"):
    """The ``MatMulNBits`` node for ``out = x @ w``; its initializers are added through ``add_init``
    (array, name hint) -> initializer name."""
    K, N = w.shape
    q, s = pack(w, cfg)
    return helper.make_node("MatMulNBits", [x, add_init(q, hint + ".q"), add_init(s, hint + ".s")], [out],
                            name=name, domain=MS, K=K, N=N, bits=cfg.bits, block_size=cfg.block,
                            accuracy_level=cfg.accuracy_level)
