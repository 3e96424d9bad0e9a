"""Calibration statistics for structured pruning, collected with forward hooks on the torch model.

What: ``collect_stats(model, tokens)`` runs the model over calibration windows once and returns one
``LayerStats`` per decoder layer with everything the importance criteria in ``importance.py`` need:

- per attention head: mean norm of the head's contribution to the residual stream, i.e. of
  ``o_proj.weight[:, head] @ attn_out[head]`` (heads talk to the residual only through ``o_proj``);
- per FFN hidden channel (dense MLP, shared experts, each routed expert): mean squared activation
  ``E[(silu(gate) * up)_j^2]`` at the input of ``down_proj``, over the tokens that reach that FFN;
- per routed expert: how many tokens the router sends it, the sum of its (scaled) gate weights and
  the sum of ``gate_weight * ||expert_out||`` (REAP's quantity);
- per layer: Block Influence ``mean_t(1 - cos(x_in, x_out))`` (ShortGPT).

Why hooks: the model code stays untouched, and the statistics are those of the exact forward that
will be exported (same routing, same dispatch).

``layer_hooks(layer, acc)`` attaches the same hooks to one layer, so a streamed pass (one layer
in memory at a time, ``edgekit.stream``) collects identical statistics.

Invariants: the model is unchanged (hooks are removed even on error); statistics are fp32 means
over calibration tokens, on CPU; a routed expert that no token reaches has count 0 and zero stats.
Under torchrun each rank runs its contiguous share of the windows (``dist.shard_range``) and the
running sums are added over ranks (``dist.all_reduce_sums``) before the means, so every rank gets
the statistics of all windows, equal to one process's up to fp32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist
from ..data import windows
from ..model import MLA, MLP, MoE, Transformer


@dataclass
class LayerStats:
    """Means over calibration tokens for one decoder layer (routed-expert fields empty when dense)."""
    tokens: int
    block_influence: float
    head_norm: torch.Tensor                    # [H] mean ||o_proj contribution of head h||
    ffn_act_sq: torch.Tensor | None = None     # [I] dense MLP hidden, E[act^2]
    shared_act_sq: torch.Tensor | None = None  # [I_shared]
    expert_act_sq: torch.Tensor | None = None  # [E, I] over each expert's routed tokens
    expert_count: torch.Tensor | None = None   # [E] routed tokens (a token counts once per expert)
    expert_gate_sum: torch.Tensor | None = None  # [E] sum of scaled gate weights
    expert_reap_sum: torch.Tensor | None = None  # [E] sum of gate_weight * ||expert_out||


class _Acc:
    """Running sums for one layer; written by hooks, turned into LayerStats by ``finish``."""

    SUMS = ("n", "bi", "head", "ffn", "shared", "e_sq", "e_cnt", "e_gate", "e_reap")

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.n, self.bi = 0, 0.0
        self.head = torch.zeros(attn.n_heads)
        self.routing = None                      # (weights [N,k], indices [N,k]) of the current batch
        if isinstance(mlp, MoE):
            E, inter = len(mlp.experts), mlp.experts[0].down_proj.in_features if len(mlp.experts) else 0
            self.ffn = None
            self.shared = (torch.zeros(mlp.shared_experts.down_proj.in_features)
                           if mlp.shared_experts is not None else None)
            self.e_sq, self.e_cnt = torch.zeros(E, inter), torch.zeros(E)
            self.e_gate, self.e_reap = torch.zeros(E), torch.zeros(E)
        else:
            self.ffn, self.shared = torch.zeros(mlp.down_proj.in_features), None
            self.e_sq = self.e_cnt = self.e_gate = self.e_reap = None

    def finish(self) -> LayerStats:
        n = max(self.n, 1)
        st = LayerStats(self.n, self.bi / n, self.head / n)
        if self.ffn is not None:
            st.ffn_act_sq = self.ffn / n
        if self.shared is not None:
            st.shared_act_sq = self.shared / n
        if self.e_sq is not None:
            st.expert_act_sq = self.e_sq / self.e_cnt.clamp(min=1)[:, None]
            st.expert_count, st.expert_gate_sum, st.expert_reap_sum = self.e_cnt, self.e_gate, self.e_reap
        return st


def _sq_sum(x: torch.Tensor) -> torch.Tensor:
    """[..., I] -> [I] sum of squares over all leading dims, fp32 on CPU."""
    return x.detach().float().reshape(-1, x.shape[-1]).pow(2).sum(0).cpu()


def layer_hooks(layer, acc: _Acc) -> list:
    """Forward hooks on one decoder layer that fill ``acc`` (returns the handles to remove)."""
    handles = []
    attn: MLA = layer.self_attn
    mlp = layer.mlp

    def on_block(mod, inp, out, acc=acc):
        x_in, x_out = inp[0].detach().float(), out[0].detach().float()   # [B, T, D]
        acc.bi += float((1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum())
        acc.n += x_in.shape[0] * x_in.shape[1]

    def on_o_proj(mod, inp, acc=acc, attn=attn):
        a = inp[0].detach().float()                                        # [B, T, H*v]
        H = attn.n_heads
        w = mod.weight.detach().float().view(mod.out_features, H, -1)      # [D, H, v]
        for chunk in a.reshape(-1, a.shape[-1]).split(1024):               # bounded memory
            contrib = torch.einsum("nhv,dhv->nhd", chunk.view(len(chunk), H, -1), w)
            acc.head += contrib.norm(dim=-1).sum(0).cpu()

    handles.append(layer.register_forward_hook(on_block))
    handles.append(attn.o_proj.register_forward_pre_hook(on_o_proj))
    # pre-hooks must return None: a returned value would replace the module's input
    if isinstance(mlp, MLP):
        def on_ffn(mod, inp, acc=acc):
            acc.ffn += _sq_sum(inp[0])

        handles.append(mlp.down_proj.register_forward_pre_hook(on_ffn))
        return handles
    if mlp.shared_experts is not None:
        def on_shared(mod, inp, acc=acc):
            acc.shared += _sq_sum(inp[0])

        handles.append(mlp.shared_experts.down_proj.register_forward_pre_hook(on_shared))

    def on_gate(mod, inp, out, acc=acc):
        acc.routing = (out[0].detach().float(), out[1].detach())           # [N, k] each

    handles.append(mlp.gate.register_forward_hook(on_gate))
    for e, expert in enumerate(mlp.experts):
        def on_down(mod, inp, acc=acc, e=e):
            acc.e_sq[e] += _sq_sum(inp[0])

        def on_expert(mod, inp, out, acc=acc, e=e):
            weights, indices = acc.routing
            token, slot = torch.where(indices == e)                        # same order as MoE.forward
            g = weights[token, slot]                                       # [n_e]
            acc.e_cnt[e] += len(token)
            acc.e_gate[e] += float(g.sum())
            acc.e_reap[e] += float((g * out.detach().float().norm(dim=-1)).sum())

        handles.append(expert.down_proj.register_forward_pre_hook(on_down))
        handles.append(expert.register_forward_hook(on_expert))
    return handles


def _hooks(model: Transformer, accs: list[_Acc]) -> list:
    return [h for acc, layer in zip(accs, model.model.layers) for h in layer_hooks(layer, acc)]


def calib_rows(tokens: np.ndarray, seq_len: int, max_positions: int, max_tokens: int = 0) -> np.ndarray:
    """[N, seq_len] calibration inputs (windows without their last target)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    seq_len = min(seq_len, max_positions)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    return windows(tokens, seq_len)[:, :-1]


def _sum_over_ranks(accs: list[_Acc]) -> None:
    """Add every rank's running sums (one collective for all layers; a no-op in one process)."""
    flat = dist.all_reduce_sums([getattr(a, f) for a in accs for f in _Acc.SUMS])
    for i, a in enumerate(accs):
        for j, f in enumerate(_Acc.SUMS):
            setattr(a, f, flat[i * len(_Acc.SUMS) + j])


@torch.no_grad()
def collect_stats(model: Transformer, tokens: np.ndarray, seq_len: int = 256, batch_size: int = 8,
                  max_tokens: int = 0, progress: bool = False) -> list[LayerStats]:
    """Run ``model`` over ``tokens`` (1-D ids) in windows of ``seq_len``; one LayerStats per layer."""
    rows = calib_rows(tokens, seq_len, model.args.max_position_embeddings, max_tokens)   # [N, seq_len]
    rows = rows[dist.shard_range(len(rows))]                                   # this rank's share
    accs = [_Acc(layer) for layer in model.model.layers]
    handles = _hooks(model, accs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        it = range(0, len(rows), batch_size)
        if progress and dist.world().is_main:
            from tqdm import tqdm
            it = tqdm(it, desc="calibrate", unit="batch", leave=False)
        for i in it:
            model(torch.from_numpy(rows[i: i + batch_size]).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    _sum_over_ranks(accs)
    return [a.finish() for a in accs]
