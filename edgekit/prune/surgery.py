"""Physical surgery: slice whole heads, channels, experts and layers out of the tensors.

What: ``prune_state(state_dict, args, plan) -> (state_dict, args)`` is the pure core: it keeps the
units a ``Plan`` names and returns the smaller tensors with the config that describes them.
``apply_plan_(model, plan)`` rebuilds the model's modules from that state (in place: ``model.model``,
``model.lm_head`` and ``model.args`` are replaced) and returns the model.

Slicing rules (Hugging Face tensor names, rows = output features):
- heads h: rows of ``q_b_proj``/``q_proj`` (H x qk_head_dim) and ``kv_b_proj`` (H x (nope + v)),
  columns of ``o_proj`` (H x v). The latent cache (kv_lora_rank, rope key) is shared by all heads
  and does not change.
- FFN channels j: rows of ``gate_proj`` and ``up_proj``, columns of ``down_proj``.
- routed experts: the expert modules (renumbered 0..E'-1), the router's ``gate.weight`` rows and
  ``e_score_correction_bias`` entries. ``num_experts_per_tok`` becomes min(k, E'); group routing
  stays valid via ``regroup``.
- layers: dropped layers vanish and the rest are renumbered; dense/MoE kinds follow the layer.

Invariants: no masks remain; the result loads with ``edgekit.checkpoint.load``; a config with the
same sizes in every layer is plain Hugging Face (sizes differing by layer go to ``layer_overrides``).
Routed experts share one width per layer and the shared experts' width is
``moe_intermediate_size * n_shared_experts`` (the model's convention), so a plan must keep equally
many channels in every expert of a layer and n_shared times that many in the shared experts.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..model import LAYER_FIELDS, LayerArgs, ModelArgs, Transformer


@dataclass
class LayerPlan:
    """Indices to keep in one layer (None: keep all). Indices refer to the unpruned layer."""
    heads: torch.Tensor | None = None
    ffn: torch.Tensor | None = None                 # dense MLP channels
    shared: torch.Tensor | None = None              # shared-expert channels
    experts: torch.Tensor | None = None             # routed experts
    expert_channels: dict[int, torch.Tensor] | None = None  # old expert index -> its channels


@dataclass
class Plan:
    layers: list[int]                               # old layer indices kept, in order
    per_layer: dict[int, LayerPlan] = field(default_factory=dict)


def regroup(kept: list[int], old_experts: int, k: int, n_group: int, topk_group: int) -> tuple[int, int]:
    """(n_group, topk_group) for the routed experts ``kept`` (old indices) of ``old_experts``.

    When the kept experts are whole original groups, those groups stay as they were (routing among
    them is unchanged). Otherwise: the largest divisor of the new count not above the old n_group,
    and topk_group scaled to it but large enough that k experts stay reachable."""
    n_group = max(n_group, 1)
    E, per = len(kept), old_experts // n_group
    groups = {e // per for e in kept}
    if E == old_experts:
        return n_group, topk_group
    if E == len(groups) * per:                     # whole groups kept
        return len(groups), min(topk_group, len(groups))
    g = max(d for d in range(1, n_group + 1) if E % d == 0)
    tg = max(math.ceil(topk_group * g / n_group), math.ceil(k / (E // g)))
    return g, min(g, tg)


def _rows(w: torch.Tensor, n: int, keep: torch.Tensor) -> torch.Tensor:
    """w [n * r, c] viewed as n blocks of r rows -> blocks ``keep`` only."""
    return w.view(n, -1, w.shape[-1])[keep].reshape(-1, w.shape[-1])


def _slice_mlp(sd: dict, old: str, new: str, keep: torch.Tensor | None, out: dict):
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = sd[f"{old}{name}.weight"]
        if keep is not None:
            w = w[:, keep] if name == "down_proj" else w[keep]
        out[f"{new}{name}.weight"] = w.contiguous()


def _slice_layer(sd: dict, args: ModelArgs, i: int, j: int, la: LayerArgs, lp: LayerPlan, out: dict) -> LayerArgs:
    old, new = f"model.layers.{i}.", f"model.layers.{j}."
    mine = {k: v for k, v in sd.items() if k.startswith(old)}
    done = set()
    H = la.num_attention_heads
    if lp.heads is not None:
        q = "q_b_proj" if args.q_lora_rank else "q_proj"
        for name in (q, "kv_b_proj"):
            k = f"{old}self_attn.{name}.weight"
            out[new + k[len(old):]] = _rows(mine[k], H, lp.heads).contiguous()
            done.add(k)
        k = f"{old}self_attn.o_proj.weight"
        w = mine[k]
        out[new + k[len(old):]] = w.view(w.shape[0], H, -1)[:, lp.heads].reshape(w.shape[0], -1).contiguous()
        done.add(k)
        la = dataclasses.replace(la, num_attention_heads=len(lp.heads))
    if la.dense:
        _slice_mlp(mine, f"{old}mlp.", f"{new}mlp.", lp.ffn, out)
        done |= {f"{old}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        if lp.ffn is not None:
            la = dataclasses.replace(la, intermediate_size=len(lp.ffn))
    else:
        experts = lp.experts if lp.experts is not None else torch.arange(la.n_routed_experts)
        widths = set()
        for e_new, e_old in enumerate(experts.tolist()):
            ch = (lp.expert_channels or {}).get(e_old)
            _slice_mlp(mine, f"{old}mlp.experts.{e_old}.", f"{new}mlp.experts.{e_new}.", ch, out)
            widths.add(len(ch) if ch is not None else la.moe_intermediate_size)
        done |= {k for k in mine if k.startswith(f"{old}mlp.experts.")}
        if f"{old}mlp.shared_experts.down_proj.weight" in mine:
            _slice_mlp(mine, f"{old}mlp.shared_experts.", f"{new}mlp.shared_experts.", lp.shared, out)
            done |= {k for k in mine if k.startswith(f"{old}mlp.shared_experts.")}
            shared = mine[f"{old}mlp.shared_experts.down_proj.weight"].shape[1] if lp.shared is None else len(lp.shared)
            widths.add(shared // max(args.n_shared_experts, 1))
        if len(widths) > 1:
            raise ValueError(f"layer {i}: routed experts / shared experts keep widths {sorted(widths)}; "
                             "keep equally many channels per expert and n_shared_experts x that in the shared experts")
        for name in ("gate.weight", "gate.e_score_correction_bias"):
            k = f"{old}mlp.{name}"
            if k in mine:
                out[f"{new}mlp.{name}"] = mine[k][experts].contiguous()
                done.add(k)
        E = len(experts)
        kk = min(la.num_experts_per_tok, E)
        g, tg = regroup(experts.tolist(), la.n_routed_experts, kk, la.n_group, la.topk_group)
        la = dataclasses.replace(la, n_routed_experts=E, num_experts_per_tok=kk, n_group=g, topk_group=tg,
                                 moe_intermediate_size=widths.pop() if widths else la.moe_intermediate_size)
    for k in set(mine) - done:                     # norms, q_a/kv_a projections, biases
        out[new + k[len(old):]] = mine[k]
    return la


def _mode(values: list, default):
    return collections.Counter(values).most_common(1)[0][0] if values else default


def args_for_layers(args: ModelArgs, layers: list[LayerArgs]) -> ModelArgs:
    """The config that gives each layer its LayerArgs: shared values in the plain fields, the rest in
    ``layer_overrides`` (empty when all layers agree, so the config stays plain Hugging Face)."""
    dense = [la.dense for la in layers]
    base = dataclasses.replace(args, num_hidden_layers=len(layers), layer_overrides={})
    lead = next((n for n, d in enumerate(dense) if not d), len(dense))
    if args.moe_layer_freq == 1 and not any(dense[lead:]):
        base.first_k_dense_replace = lead          # dense prefix, then MoE: expressible without overrides
    moe = [la for la in layers if not la.dense] or layers
    base.num_attention_heads = _mode([la.num_attention_heads for la in layers], args.num_attention_heads)
    base.intermediate_size = _mode([la.intermediate_size for la in layers if la.dense], args.intermediate_size)
    for f in ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
        setattr(base, f, _mode([getattr(la, f) for la in moe], getattr(args, f)))
    overrides = {}
    for j, la in enumerate(layers):
        ref = base.for_layer(j)
        diff = {f: getattr(la, f) for f in LAYER_FIELDS if getattr(la, f) != getattr(ref, f)}
        if la.dense:                               # dense layers ignore MoE fields, MoE layers the dense width
            diff = {f: v for f, v in diff.items() if f in ("num_attention_heads", "intermediate_size", "dense")}
        else:
            diff.pop("intermediate_size", None)
        if diff:
            overrides[str(j)] = diff
    return ModelArgs(**{**dataclasses.asdict(base), "layer_overrides": overrides})


def prune_state(sd: dict[str, torch.Tensor], args: ModelArgs, plan: Plan) -> tuple[dict, ModelArgs]:
    """Pure core: the sliced state dict and the config that describes it."""
    out = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    layers = []
    for j, i in enumerate(plan.layers):
        layers.append(_slice_layer(sd, args, i, j, args.for_layer(i), plan.per_layer.get(i, LayerPlan()), out))
    return out, args_for_layers(args, layers)


def apply_plan_(model: Transformer, plan: Plan) -> Transformer:
    """Replace ``model``'s decoder, head and args by the pruned ones (same device and dtype)."""
    p = next(model.parameters())
    sd, args = prune_state(model.state_dict(), model.args, plan)
    new = Transformer(args)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("rope_")]
    if missing or unexpected:
        raise RuntimeError(f"surgery bug: missing {missing[:3]}, unexpected {unexpected[:3]}")
    new.to(device=p.device, dtype=p.dtype)
    model.model, model.lm_head, model.args = new.model, new.lm_head, args
    return model
