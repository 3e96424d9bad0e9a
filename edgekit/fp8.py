"""FP8 (e4m3) weights with 128x128 block scales, the storage of DeepSeek's official V3 releases.

What: ``dequantize(q, scale_inv, block)`` -> fp32 ``q * scale_inv`` broadcast over blocks of
``block`` = (rows, cols) (the last block of each dim may be ragged: a [N, K] weight has
``ceil(N / 128) x ceil(K / 128)`` scales); ``quantize(w, block)`` is the inverse used to write such
checkpoints (``edgekit synth --dtype fp8``, tests): per block ``scale_inv = max|w| / 448`` (e4m3's
largest finite value), ``q = w / scale_inv`` rounded to e4m3. ``fp8_config(cfg)`` validates a
config.json ``quantization_config`` and returns the block size (None for unquantized checkpoints).

Why here: the checkpoint layout is ``<name>.weight`` (float8_e4m3fn) beside
``<name>.weight_scale_inv`` (fp32); transformers dequantizes the same way
(``weight * scale_inv`` per block), so logits equal transformers' on the dequantized weights.

Invariants: ``dequantize(*quantize(w))`` is within e4m3's relative rounding (2^-4) of ``w`` per
element; scale shapes are checked before use.

Failure modes: a ``quantization_config`` other than fp8/e4m3 with 2-D blocks, or a scale tensor of
the wrong shape -> ``EdgekitError`` naming the fix.
"""

from __future__ import annotations

import math

import torch

from .errors import EdgekitError

E4M3_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """The config.json entry DeepSeek-V3's releases carry."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def fp8_config(cfg: dict) -> tuple[int, int] | None:
    """Block size of an fp8 checkpoint's ``quantization_config``; None when there is none."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise EdgekitError(f"config.json quantization_config quant_method={method!r} is not supported; edgekit "
                           "reads fp8 (e4m3, block scales), bf16, fp16 and fp32 checkpoints: dequantize it first")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise EdgekitError(f"config.json quantization_config fmt={qc.get('fmt')!r}: edgekit reads fp8 e4m3 only")
    block = qc.get("weight_block_size") or list(DEFAULT_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise EdgekitError(f"config.json quantization_config weight_block_size={block!r}: use two positive "
                           "integers such as [128, 128]")
    return int(block[0]), int(block[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    n, k = shape
    return math.ceil(n / block[0]), math.ceil(k / block[1])


def check_scale(name: str, shape: tuple[int, ...], s_shape: tuple[int, ...], block: tuple[int, int]) -> None:
    want = scale_shape(tuple(shape), block) if len(shape) == 2 else None
    if want is None or tuple(s_shape) != want:
        raise EdgekitError(f"{name}{SCALE_SUFFIX} has shape {tuple(s_shape)} but {name} {tuple(shape)} with "
                           f"{block[0]}x{block[1]} blocks needs {want}; the checkpoint's scales do not match its "
                           "weights (re-download it, or fix weight_block_size in config.json)")


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    n, k = shape
    return scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
               name: str = "weight") -> torch.Tensor:
    """fp8 [N, K] x block scales [ceil(N/bn), ceil(K/bk)] -> fp32 [N, K]."""
    check_scale(name, tuple(q.shape), tuple(scale_inv.shape), block)
    return q.to(torch.float32) * _expand(scale_inv.to(torch.float32), tuple(q.shape), block)


def quantize(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (float8_e4m3fn [N, K], fp32 scale_inv [ceil(N/bn), ceil(K/bk)])."""
    n, k = w.shape
    sn, sk = scale_shape((n, k), block)
    pad = torch.zeros(sn * block[0], sk * block[1], dtype=torch.float32)
    pad[:n, :k] = w.float()
    amax = pad.view(sn, block[0], sk, block[1]).abs().amax(dim=(1, 3))            # [sn, sk]
    scale_inv = (amax / E4M3_MAX).clamp_min(1e-12)
    q = (w.float() / _expand(scale_inv, (n, k), block)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


def fp8_eligible(name: str, t: torch.Tensor) -> bool:
    """Which tensors DeepSeek's fp8 releases store as fp8: every 2-D ``*_proj`` linear weight
    (attention, dense FFN, shared and routed experts); embeddings, lm_head, norms and routers stay
    bf16/fp32."""
    return t.dim() == 2 and name.endswith("_proj.weight")
