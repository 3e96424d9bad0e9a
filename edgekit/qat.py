"""Quantization-aware fine-tuning: train through the int8 rounding with a straight-through estimator.

What: ``with fake_quantized(model, QATConfig()):`` makes ``model`` compute what the int8 graph
computes (``edgekit/quantize/rewrite.py``, emulated without gradients in ``quantize/emulate.py``)
while staying differentiable: every quantizable ``Linear`` outside the routed experts sees its
input rounded to symmetric int8 with one scale per token (``max|x| / 127``, the dynamic mode) and its
weight rounded per output channel (7-bit by default, ``weight_qmax`` 63: quantize's reduce_range);
routed expert weights are rounded per row (QMoE ``moe = "row"``, weights only; ``MoE``'s dense
training path reads them through ``MoE.expert_weights``, patched here too); the embedding per row.
Rounding uses the straight-through estimator ``x + (q(x) - x).detach()``: the forward sees
``q(x)``, the gradient flows as if ``q`` were the identity, so the fp32 latent weights learn to
sit where their rounding costs least.
``distill_`` runs under this when ``DistillConfig.fake_quant == "int8"`` (recipe:
``[prune] recover_fake_quant = "int8"``): recovery after pruning then also recovers the int8 error.

Why: post-training int8 costs little on v3-nano (~0.02 points), but a pruned student that has just
been distilled is exactly where the remaining budget is thinnest; training under the rounding it
will ship with spends the recovery steps on the model that is actually deployed.

Mode ``"int4-experts"``: the same, but the routed experts' weights are rounded to 4 bits in blocks
of ``experts_block`` along K (0: one scale per row, ``[quantize] int4_moe_rows``), as ``[quantize]
int4`` writes them (4-bit ``QMoE``, weights only):
recovery for a plan that puts the experts in 4-bit (recipe: ``recover_fake_quant = "int4-experts"``).

Invariants: routers (``Gate``) stay fp32, as in the shipped int8 graph; on exit every module's
forward is the stock one again and no parameter was replaced (only their values trained), so the
model saves and exports as usual. The weight scale is recomputed from the current weights at every
step, exactly as the int8 rewrite computes it from the final weights. SmoothQuant rescaling after
QAT moves weights off the grid they trained on; recipes using ``recover_fake_quant`` set
``[smooth] enabled = false``.

Failure modes: ``ValueError`` for an unknown mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .int8 import QMAX, QMAX_7BIT, fake_quant, fake_quant_blocks
from .model import MoE

MODES = ("int8", "int4-experts")
QMAX_4BIT = 7.0


@dataclass
class QATConfig:
    mode: str = "int8"
    activations: bool = True          # fake-quantize Linear inputs (dynamic per-token scale), as the graph does
    experts: bool = True              # routed experts' weights per row (QMoE row-wise, weights only)
    embedding: bool = True
    weight_qmax: float = QMAX_7BIT    # 7-bit weights (quantize's default reduce_range); 127: 8-bit
    experts_block: int = 32           # "int4-experts": 4-bit expert weights per block of K ([quantize] int4_block);
                                      # 0: one scale per row ([quantize] int4_moe_rows)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fake_quant={self.mode!r}: use one of {MODES} (or '' for none)")
        if self.experts_block < 0:
            raise ValueError(f"experts_block={self.experts_block}: use a block size along K, "
                             "or 0 for one scale per row")

    def four_bit(self, in_features: int) -> bool:
        """Whether a routed expert's Linear of this input width is rounded to 4 bits."""
        return self.mode == "int4-experts" and (self.experts_block == 0 or in_features % self.experts_block == 0)


def ste_round(x: torch.Tensor, dim: int | None = None, qmax: float = QMAX) -> torch.Tensor:
    """Symmetric int8 fake quantization (max-abs scale over ``dim``; None: whole tensor) with a
    straight-through gradient. The scale is treated as a constant (no gradient through max|x|)."""
    return x + (fake_quant(x.detach(), dim, qmax=qmax) - x).detach()


def ste_round_blocks(w: torch.Tensor, block: int, qmax: float) -> torch.Tensor:
    """``ste_round`` per block of ``block`` along the last dim (4-bit block weights)."""
    return w + (fake_quant_blocks(w.detach(), block, qmax=qmax) - w).detach()


def _rounded_weight(lin: nn.Linear, wmax: float, block: int = 0):
    def weight():
        return ste_round_blocks(lin.weight, block, wmax) if block else ste_round(lin.weight, dim=1, qmax=wmax)
    return weight


def _linear_forward(lin: nn.Linear, act: bool, weight):
    def forward(x):
        return F.linear(ste_round(x, dim=-1) if act else x, weight(), lin.bias)
    return forward


def _embedding_forward(emb: nn.Embedding):
    def forward(ids):
        return F.embedding(ids, ste_round(emb.weight, dim=1), emb.padding_idx)
    return forward


def _stacked_weights(moe: MoE, cfg: QATConfig):
    """``moe.expert_weights`` rounded as the routed experts' Linears are above (per row, or 4-bit per
    block of K): one rounding per stacked [E, out, in] tensor instead of one per expert."""
    first = moe.experts[0]
    four = [cfg.four_bit(getattr(first, n).in_features) for n in ("gate_proj", "up_proj", "down_proj")]
    block = cfg.experts_block

    def weights():
        return tuple(ste_round_blocks(w, block, QMAX_4BIT) if f and block
                     else ste_round(w, dim=-1, qmax=QMAX_4BIT if f else QMAX)
                     for w, f in zip(MoE.expert_weights(moe), four))
    return weights


@contextlib.contextmanager
def fake_quantized(model, config: QATConfig | None = None):
    """Run (and train) ``model`` under int8 fake quantization; see the module docstring."""
    cfg = config or QATConfig()
    patched = []
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):      # routers are Gate modules, not Linear: they stay fp32
                routed = ".experts." in name
                if routed and not cfg.experts:
                    continue
                # QMoE row-wise expert weights are 8-bit; 7-bit (reduce_range) applies to the int8 matmuls
                four = routed and cfg.four_bit(mod.in_features)
                wmax = QMAX_4BIT if four else QMAX if routed else cfg.weight_qmax
                mod.forward = _linear_forward(mod, cfg.activations and not routed,
                                              _rounded_weight(mod, wmax, cfg.experts_block if four else 0))
                patched.append(mod)
            elif isinstance(mod, nn.Embedding) and cfg.embedding:
                mod.forward = _embedding_forward(mod)
                patched.append(mod)
        for mod in model.modules():             # MoE's dense path reads stacked expert weights, not forwards
            if isinstance(mod, MoE) and cfg.experts and len(mod.experts):
                mod.expert_weights = _stacked_weights(mod, cfg)
                patched.append(mod)
        yield model
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("expert_weights", None)
