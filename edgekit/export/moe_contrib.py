"""Routed experts as one onnxruntime ``com.microsoft::MoE`` node (fp32, CPU kernel; sparse).

What: ``ContribMoE(moe, args, la)`` replaces a model ``MoE`` block at export time. The router and
the shared experts stay plain ONNX; the routed experts become one MoE node per layer, emitted by
the TorchScript exporter through ``_MoEOp.symbolic``.

How DeepSeek routing maps onto the op (ORT 1.32 schema, checked by tests/test_export.py):
- the fp32 MoE op has no ``router_weights`` input: it picks the top-k of ``router_probs`` and,
  with ``normalize_routing_weights=1``, weights them by a softmax over those k values. So the
  model's routing picks the experts (bias, group limit, any scoring) and ``router_probs`` is
  ``log(score)`` at the chosen experts and ``-1e4`` elsewhere: the op selects exactly those k,
  and softmax(log s) = s / sum(s), the model's normalised top-k weights (``router_probs``);
- ``routed_scaling_factor`` is folded into the down projection (``fc2``);
- SwiGLU: ``swiglu_fusion=1`` (the only CPU layout): fc1 rows interleave gate and up
  (g0, u0, g1, u1, ...); activation_alpha=1, activation_beta=0, no limit = silu(g) * u.
This needs ``norm_topk_prob`` with k > 1 (softmax always normalises). Plain softmax routing with
un-normalised weights (V2-style ``scoring_func="softmax"``, ``topk_method="greedy"``) maps directly:
the router logits are ``router_probs`` with ``normalize_routing_weights=0`` (softmax over all
experts, then top-k). Other configs must use the portable path (``contrib_routing`` returns None
and ``ExportConfig`` says so).

The routing is written for few graph nodes (onnxruntime's per-node cost is most of a decode step
at small sizes): the chosen groups and experts are the entries at or above the k-th largest value
(``TopK`` values, a compare, a ``Where``) rather than ``Gate``'s scatter of the top-k indices into
a mask, and the op's own softmax does the normalisation and ``routed_scaling_factor`` sits in
``fc2``, so neither is computed here: ~17 nodes per layer, 24 fewer than ``Gate`` + scatter (nodes
run per call, v3-1.6b shape with 16 experts; benchmarks/results/graph_speed_2c.md).
The same experts as ``Gate`` except on exact ties at the k-th value (then every tied entry
passes the threshold; scores are continuous, so a tie means identical experts).

For int8 conversion (QMoE): per layer ``i`` the node is named ``moe.{i}`` and its initializers are
``ffn.{i}.fc1`` [E, 2I, D] and ``ffn.{i}.fc2`` [E, D, I] (export.json lists them). QMoE without
``router_weights`` routes the same way, so only the weights (and scales) change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASKED_LOGIT = -1e4   # router_probs of experts not chosen (never in the op's top-k)
LOG_ROW = 16          # Log runs on rows padded to a multiple of this (the widest SIMD packet, floats)
MIN_LOGIT = -1e3      # floor of log(weight) of a chosen expert, so it stays above MASKED_LOGIT


def contrib_routing(args, la) -> str | None:
    """How a layer's routing maps onto the MoE op: "topk_softmax", "softmax_all" or None (cannot)."""
    if args.norm_topk_prob and la.num_experts_per_tok > 1:
        return "topk_softmax"
    if args.scoring_func == "softmax" and args.topk_method == "greedy":
        return "softmax_all"
    return None


def _row_log(w: torch.Tensor, k: int) -> torch.Tensor:
    """log(w) for w [N, k], computed on rows padded with ones to a multiple of ``LOG_ROW`` columns.
    onnxruntime's CPU Log vectorizes over the flattened tensor and computes its last few elements
    with a scalar routine of different rounding, so a token's log would depend on where it sits in
    the batch; with whole packets per row it does not (batched rows equal rows alone, bit for bit)."""
    width = -(-k // LOG_ROW) * LOG_ROW                  # k: a Python int, so the pad is a constant
    if width == k:                                      # whole packets already: no Pad/Slice nodes
        return w.log()
    return F.pad(w, (0, width - k), value=1.0).log()[:, :k]


def router_probs(gate, args, la, x: torch.Tensor) -> torch.Tensor:
    """x [N, D] (fp32) -> router_probs [N, E] for the op: log(score) (floored at ``MIN_LOGIT``) at
    the experts ``Gate`` chooses, ``MASKED_LOGIT`` elsewhere (see the module doc)."""
    E = la.n_routed_experts
    logits = F.linear(x, gate.weight)                                   # the router unit's MatMul
    scores = logits.sigmoid() if args.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores + gate.e_score_correction_bias if args.topk_method == "noaux_tc" else scores
    if la.n_group > 1 and args.topk_method != "greedy":
        grouped = choice.view(-1, la.n_group, E // la.n_group)                         # [N, G, E/G]
        if args.topk_method == "noaux_tc":
            group = grouped.topk(min(2, E // la.n_group), dim=-1)[0].sum(dim=-1, keepdim=True)
        else:
            group = grouped.amax(dim=-1, keepdim=True)                                 # [N, G, 1]
        kth_group = group.topk(la.topk_group, dim=1)[0][:, -1:]                        # [N, 1, 1]
        choice = grouped.masked_fill(group < kth_group, float("-inf")).view(-1, E)
    kth = choice.topk(la.num_experts_per_tok, dim=-1)[0][:, -1:]                        # [N, 1]
    logs = _row_log(scores, E).clamp_min(MIN_LOGIT)
    return torch.where(choice >= kth, logs, torch.tensor(MASKED_LOGIT, dtype=logs.dtype))


class _MoEOp(torch.autograd.Function):
    """Torch reference (eager) + ONNX symbolic of ``com.microsoft::MoE`` with interleaved SwiGLU."""

    @staticmethod
    def forward(ctx, x, router_probs, fc1, fc2, k: int, normalize: int):
        """x [N, D], router_probs [N, E], fc1 [E, 2I, D], fc2 [E, D, I] -> [N, D]."""
        top, idx = router_probs.topk(k, dim=-1)                             # [N, k]
        w = top.softmax(dim=-1) if normalize else router_probs.softmax(dim=-1).gather(1, idx)
        y = torch.zeros_like(x)
        for e in range(fc1.shape[0]):
            token, slot = torch.where(idx == e)
            h = F.linear(x[token], fc1[e])                                  # [n_e, 2I]
            h = F.silu(h[:, 0::2]) * h[:, 1::2]
            y = y.index_add(0, token, F.linear(h, fc2[e]) * w[token, slot].unsqueeze(-1))
        return y

    @staticmethod
    def symbolic(g, x, router_probs, fc1, fc2, k: int, normalize: int):
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor as none
        out = g.op("com.microsoft::MoE", x, router_probs, fc1, none(g), fc2,
                   k_i=k, activation_type_s="swiglu", swiglu_fusion_i=1, normalize_routing_weights_i=normalize,
                   activation_alpha_f=1.0, activation_beta_f=0.0)
        out.setType(x.type())
        return out


class ContribMoE(nn.Module):
    def __init__(self, moe, args, la):
        super().__init__()
        self.gate, self.shared_experts, self.k = moe.gate, moe.shared_experts, la.num_experts_per_tok
        self.args, self.la = args, la
        self.routing = contrib_routing(args, la)
        ex = moe.experts
        w = ex[0].gate_proj.weight                   # filled expert by expert: no stacked temporaries (memory)
        gate_up = w.new_empty(len(ex), w.shape[0], 2, w.shape[1])                                        # [E, I, 2, D]
        down = w.new_empty(len(ex), w.shape[1], w.shape[0])                                              # [E, D, I]
        with torch.no_grad():
            for j, e in enumerate(ex):
                gate_up[j, :, 0], gate_up[j, :, 1] = e.gate_proj.weight, e.up_proj.weight
                torch.mul(e.down_proj.weight, args.routed_scaling_factor, out=down[j])
        self.register_buffer("fc1", gate_up.flatten(1, 2))                                               # [E, 2I, D]
        self.register_buffer("fc2", down)

    def forward(self, x):
        """x [B, T, D] -> [B, T, D]."""
        x3, x = x, x.reshape(-1, self.fc1.shape[2])                         # [N, D]: D a constant
        if self.routing == "softmax_all":
            probs = F.linear(x, self.gate.weight)                           # [N, E] router logits
        else:
            probs = router_probs(self.gate, self.args, self.la, x)          # [N, E]
        y = _MoEOp.apply(x, probs, self.fc1, self.fc2, self.k, int(self.routing == "topk_softmax"))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view_as(x3)
