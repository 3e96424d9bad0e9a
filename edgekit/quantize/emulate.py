"""Torch emulation of the int8 graph, for sensitivity ranking, the precision search and routing
agreement without building an ONNX graph per trial.

What: ``units(model)`` names the quantizable units (a ``Linear``, a layer's routed experts, the
embedding); ``emulated(model, int8_units, ...)`` is a context manager under which the model
computes what the rewritten ONNX graph computes (see rewrite.py):
- ``Linear`` unit: activations symmetric int8 with one scale per token (``max|x| / 127`` over the
  last axis; or the calibrated static scale), weights symmetric int8 per output channel;
- routed experts: grouped int8 GEMMs (``experts_as_linears``: each expert Linear as a Linear unit,
  as on the portable path), or QMoE weights int8 per row (weights only), or per block of K with
  int8 activations per token and block when ``moe_block`` > 0; on the portable path
  (``expert_act_int8=False``) int8 per output column, weights only;
- embedding: int8 per row;
- units in ``int4`` (4-bit weights in blocks of ``int4_block`` along K, ``edgekit/quantize/nbits.py``):
  a ``Linear`` as ``MatMulNBits`` at accuracy level 4 (input int8 per row and block, weights 4-bit
  per block); routed experts on the QMoE path as 4-bit ``QMoE`` (weights only: the kernel
  dequantizes and computes in fp32; per block, or per row with ``int4_moe_rows``), as linears
  (grouped) like a ``Linear``.
``routing(model, ids)`` returns each MoE layer's chosen expert indices; ``agreement`` compares two.

Why emulate: one forward pass per trial on the calibration tokens instead of an export + session;
trials are scored like everything else (``edgekit.evaluate.score_rows``); the planned int8 graph is
still scored on onnxruntime (``edgekit.quantize.mixed``) and its top-1 agreement is reported.

Invariants: weights are restored and hooks removed on exit, even on error.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch
from torch import nn

from ..int8 import QMAX, fake_quant, fake_quant_blocks

QMAX_4BIT = 7.0


def fq(x: torch.Tensor, dim=None, scale: float | None = None, qmax: float = QMAX) -> torch.Tensor:
    """Symmetric int8 fake quantization (``edgekit.int8.fake_quant``): max-abs scale over ``dim``
    (None: whole tensor) or the fixed calibrated range ``scale``; ``qmax`` 63 for 7-bit weights
    (reduce_range)."""
    return fake_quant(x, dim, scale, qmax)


def fq_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per block of ``block`` along the last dim (weights [N, K] or activations [.., K])."""
    return fake_quant_blocks(x, block)


def units(model) -> dict[str, nn.Module]:
    """Quantizable units by name: every Linear outside routed experts and routers, each MoE
    layer's routed experts (``...mlp.experts``), the embedding, the routers (``...mlp.gate``)."""
    out = {}
    for name, mod in model.named_modules():
        if name.endswith("mlp.experts"):
            out[name] = mod
        elif isinstance(mod, nn.Linear) and ".experts." not in name:
            out[name] = mod
        elif type(mod).__name__ == "Gate":
            out[name] = mod
        elif isinstance(mod, nn.Embedding):
            out[name] = mod
    return out


@contextlib.contextmanager
def emulated(model, int8: set[str], static_scales: dict[str, float] | None = None, moe_block: int = 0,
             experts_as_linears: bool = False, wmax: float = QMAX, expert_act_int8: bool = True,
             expert_scales: dict | None = None, int4: set[str] | frozenset = frozenset(), int4_block: int = 32,
             int4_moe_rows: bool = False):
    """Run ``model`` as the int8 graph would (see module doc) for the units in ``int8``; those also
    in ``int4`` with 4-bit block weights (``int4_block``; see ``int4_fits`` for which can be);
    ``int4_moe_rows``: 4-bit QMoE experts (not ``experts_as_linears``) with one scale per row instead.
    ``experts_as_linears``: grouped or portable experts, where each expert Linear is an int8 matmul;
    ``expert_act_int8=False`` (portable.py): expert activations stay fp32. ``expert_scales``: MoE
    unit -> (x amax, per-expert h amax), static activation scales of grouped experts
    (``expert_absmax``); absent units quantize expert activations per token."""
    static_scales, expert_scales = static_scales or {}, expert_scales or {}
    saved, hooks = [], []

    def swap(p: nn.Parameter, new: torch.Tensor):
        saved.append((p, p.data))
        p.data = new

    def act_hook(scale):
        def pre(_m, args):
            return (fq(args[0], -1 if scale is None else None, scale),) + tuple(args[1:])
        return pre

    try:
        with torch.no_grad():
            for name, mod in units(model).items():
                if name not in int8:
                    continue
                if name in int4:
                    lins = [m for m in mod.modules() if isinstance(m, nn.Linear)] if name.endswith("mlp.experts") \
                        else [mod]
                    rows = int4_moe_rows and name.endswith("mlp.experts") and not experts_as_linears
                    for lin in lins:
                        swap(lin.weight, fake_quant(lin.weight.data, 1, qmax=QMAX_4BIT) if rows
                             else fake_quant_blocks(lin.weight.data, int4_block, qmax=QMAX_4BIT))
                        if experts_as_linears or not name.endswith("mlp.experts"):   # MatMulNBits: int8 input blocks
                            hooks.append(lin.register_forward_pre_hook(
                                lambda _m, a, b=int4_block: (fq_blocks(a[0], b),) + tuple(a[1:])))
                    continue
                if name.endswith("mlp.experts") and experts_as_linears:
                    xs = expert_scales.get(name)
                    for e, expert in enumerate(mod):
                        for part in ("gate_proj", "up_proj", "down_proj"):
                            lin = getattr(expert, part)
                            swap(lin.weight, fq(lin.weight.data, dim=1, qmax=wmax))
                            if expert_act_int8:
                                amax = None if xs is None else xs[1][e] if part == "down_proj" else xs[0]
                                hooks.append(lin.register_forward_pre_hook(act_hook(amax)))
                elif name.endswith("mlp.experts"):
                    for lin in (m for m in mod.modules() if isinstance(m, nn.Linear)):
                        if moe_block and lin.weight.shape[1] % moe_block == 0:
                            swap(lin.weight, fq_blocks(lin.weight.data, moe_block))
                            hooks.append(lin.register_forward_pre_hook(
                                lambda _m, a, b=moe_block: (fq_blocks(a[0], b),)))
                        else:
                            swap(lin.weight, fq(lin.weight.data, dim=1))
                elif isinstance(mod, nn.Embedding):
                    swap(mod.weight, fq(mod.weight.data, dim=1))
                elif isinstance(mod, nn.Linear) or hasattr(mod, "weight"):
                    swap(mod.weight, fq(mod.weight.data, dim=1, qmax=wmax))
                    hooks.append(mod.register_forward_pre_hook(act_hook(static_scales.get(name))))
        yield model
    finally:
        for h in hooks:
            h.remove()
        for p, data in reversed(saved):
            p.data = data


@torch.no_grad()
def input_absmax(model, rows: np.ndarray, names: list[str], batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per unit: max |x| of its input per forward call [n_calls] (for static scales / auto)."""
    mods = units(model)
    seen: dict[str, list[float]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(float(a[0].abs().max())))
             for n in names]
    try:
        for i in range(0, len(rows), batch_size):
            model(torch.from_numpy(rows[i: i + batch_size, :-1]))
    finally:
        for h in hooks:
            h.remove()
    return {n: np.asarray(v) for n, v in seen.items()}


@torch.no_grad()
def expert_absmax(model, rows: np.ndarray, batch_size: int = 8) -> dict[str, tuple[float, tuple[float, ...]]]:
    """Per MoE layer (unit ``...mlp.experts``): (max |x| of the tokens its routed experts see,
    per expert max |h| of its down projection's input) over the calibration ``rows``: the static
    activation scales of the grouped int8 experts. An expert no calibration token reached gets the
    largest max |h| of its layer (a zero range would clip everything it computes to zero)."""
    layers = {n: m for n, m in units(model).items() if n.endswith("mlp.experts")}
    x_max = {n: 0.0 for n in layers}
    h_max = {n: [0.0] * len(m) for n, m in layers.items()}
    hooks = []
    for n, experts in layers.items():
        for e, expert in enumerate(experts):
            def gate_hook(_m, a, n=n):
                x_max[n] = max(x_max[n], float(a[0].abs().max())) if a[0].numel() else x_max[n]

            def down_hook(_m, a, n=n, e=e):
                h_max[n][e] = max(h_max[n][e], float(a[0].abs().max())) if a[0].numel() else h_max[n][e]
            hooks += [expert.gate_proj.register_forward_pre_hook(gate_hook),
                      expert.down_proj.register_forward_pre_hook(down_hook)]
    try:
        for i in range(0, len(rows), batch_size):
            model(torch.from_numpy(rows[i: i + batch_size, :-1]))
    finally:
        for h in hooks:
            h.remove()
    return {n: (x_max[n], tuple(h or max(h_max[n]) for h in h_max[n])) for n in layers}


@torch.no_grad()
def routing(model, rows: np.ndarray, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Per MoE layer index: sorted chosen expert ids [n_tokens, k] over ``rows``."""
    got: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and not isinstance(gate, nn.Linear):
            hooks.append(gate.register_forward_hook(
                lambda _m, _a, out, i=i: got.setdefault(i, []).append(out[1].sort(dim=-1)[0])))
    try:
        for j in range(0, len(rows), batch_size):
            model(torch.from_numpy(rows[j: j + batch_size, :-1]))
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def agreement(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, float]:
    """Fraction of tokens whose chosen expert SET is identical, per layer."""
    return {i: float((a[i] == b[i]).all(dim=-1).float().mean()) for i in a}


def int4_fits(mod: nn.Module, block: int) -> bool:
    """Whether a unit can be written with 4-bit block weights: a ``Linear`` or a layer's routed
    experts whose every input width is a multiple of ``block`` (embeddings and routers cannot)."""
    if isinstance(mod, nn.Embedding) or type(mod).__name__ == "Gate":
        return False
    lins = [m for m in mod.modules() if isinstance(m, nn.Linear)]
    return bool(lins) and all(m.in_features % block == 0 for m in lins)


def match(name: str, pattern: str) -> bool:
    """torchao-style override keys: exact module name, or ``re:<regex>`` (fullmatch)."""
    return bool(re.fullmatch(pattern[3:], name)) if pattern.startswith("re:") else name == pattern
