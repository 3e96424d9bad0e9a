"""The torch module that is traced into the ONNX decoder graph: ids + latent cache in, logits + new
cache entries out, with weight-absorbed MLA attention; rows of any prompt and cache length share a call.

What: ``LatentDecoder(model, moe)`` wraps a ``Transformer`` (sharing its weights) and adds, per
layer, two derived constants: ``w_uk`` [H, nope, kv_lora] (kv_b_proj's K rows) and ``w_uv``
[H, kv_lora, v] (kv_b_proj's V rows, applied to the latent part of the attention output),
W = kv_lora_rank + qk_rope_head_dim. ``forward(input_ids, *past)`` is the whole graph.

Why absorbed, and why past and new entries are kept apart:
- the cache row of a token is ``[norm(c_kv) | rope(k_pe)]`` (W values), shared by all heads. The
  query is mapped into that space once (``q_nope @ w_uk`` next to ``q_pe``), so scores are one
  matmul against the cache and the per-head K/V of past tokens is never materialised (decode cost
  O(S * W * H) instead of O(S * kv_lora * H * (nope + v)) for re-expanding the cache);
- attention runs over ``past`` and ``new`` separately (scores concatenated, then split), so the
  graph never concatenates or copies the cache. It returns only the T new rows; the caller writes
  them behind the past rows of a preallocated buffer (see ``edgekit.runtime.OrtModel``). With
  P = 0 (empty ``past``) the same graph is the prefill.

Batching rows of different lengths: LEFT padding, one optional input ``left_pad`` [B] (int64; its
default, a [1] zero initializer, means "no padding" and broadcasts over any batch). Row b's real
tokens are the last ``P + T - left_pad[b]`` of the concatenated ``[past | new]`` columns, and its
query t sits at position ``P + t - left_pad[b]``. Why left and not right padding:
- every row appends at the same column P, so the caller writes all T new rows with one slice per
  layer (``edgekit.runtime.OrtModel``) and the graph keeps one scalar P;
- the last input position is real for every row, so ``logits_keep=1`` still yields each row's
  next-token logits (right padding would need a per-row gather of the last real position).
The attention core of a batch with padding runs row by row on each row's own columns
(``row_attention.py``: a Scan, behind an ``If`` that keeps the batched core when no row is
padded), so a padded row gets the same float operations on the same shapes as the row run alone:
its logits are bit-identical, not just close (masking instead changes summation order, which int8
re-quantization turns into visible differences). Everything else in the graph is per token. The
price: padded columns are carried in the cache; the runtime trims padding every row shares
(``LatentCache.trim``). Pad positions compute finite garbage that no real position reads.

Per-token cost at small sizes is largely onnxruntime's per-node overhead, so values every layer
needs (B, T, P, RoPE rows, causal mask, per-row slice starts) are computed once per call
(``_Shared``, and row_attention's shared nodes): 833 -> 735 nodes on v3-nano, decode ~7-12%
faster (median of 7 interleaved rounds, noisy machine). RoPE runs as three nodes per q/k
(``_rope``), the routing in few nodes (``moe_contrib.router_probs``) and the mask is additive:
737 -> 611 nodes run per call on the int8 v3-nano graph, decode CPU time at ctx 128 -12%
(benchmarks/results/graph_speed_2c.md).

Names: while the graph is traced (``name_keyed_weights``), every ``F.linear`` on a model weight runs
as ``x @ W_t`` with ``W_t`` a transposed view registered on that module as ``weight_t``, so each
linear's MatMul reads an initializer named ``model.<module>.weight_t`` (torch would otherwise fold
the transpose into an anonymous ``onnx::MatMul_N``). ``export.json``'s ``units`` is read off these
names (``onnx_io.graph_units``); the graph and its values are the same either way.

Invariants: logits equal ``Transformer.forward_cached`` (fp32, ~1e-6); a row's logits do not
depend on the other rows of the call, bit for bit, wherever onnxruntime's kernels compute rows
independently (its GEMMs do for >= 2 query rows; a one-token prompt takes a single-row kernel, so
``OrtModel.prefill_rows`` runs those in a call of their own; fp32 MoE kernels do not, so fp32
graphs with routed experts match to ~1e-6 rather than exactly; int8 graphs with grouped experts
match exactly, tests/test_export.py); positions are ``P + arange(T) - left_pad``, so the caller
must keep every row's ``P + T - left_pad`` <= max_position_embeddings. No Python branching on
tensor values.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..model import MoE, Transformer, rope_frequencies
from .moe_contrib import ContribMoE
from .moe_portable import PortableMoE
from .row_attention import MIN, RowAttention


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order."""
    return (["input_ids"] + [f"past_latent.{i}" for i in range(num_layers)] + ["logits_keep", "left_pad"],
            ["logits"] + [f"new_latent.{i}" for i in range(num_layers)])


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    ins, outs = io_names(num_layers)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "logits_seq"}}
    axes.update({n: {0: "batch", 1: "past_seq"} for n in ins[1:-2]})
    axes["left_pad"] = {0: "pad_batch"}          # batch, or 1 (the default broadcasts)
    axes.update({n: {0: "batch", 1: "seq"} for n in outs[1:]})
    return axes


WEIGHT_T = "weight_t"     # the transposed-weight buffer each linear's MatMul reads while tracing


class _NamedLinears(TorchFunctionMode):
    """``F.linear(x, W)`` -> ``x @ W_t`` for the weights in ``table`` (id(W) -> (name, W_t)); records
    the names it replaced in ``used``."""

    def __init__(self, table: dict, used: set):
        super().__init__()
        self.table, self.used = table, used

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and id(args[1]) in self.table:
            name, wt = self.table[id(args[1])]
            self.used.add(name)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = torch.matmul(args[0], wt)
            return y if bias is None else y + bias
        return func(*args, **kwargs)


@contextmanager
def name_keyed_weights(model: nn.Module):
    """While active, linears of ``model`` (nn.Linear, the routers) multiply by ``<module>.weight_t``
    buffers (views, no copy); yields the set of module names whose linear was called. The buffers
    are removed on exit, even on error."""
    table, used, owners = {}, set(), []
    try:
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(mod, nn.Embedding):
                mod.register_buffer(WEIGHT_T, w.detach().t())
                owners.append(mod)
                table[id(w)] = (name, getattr(mod, WEIGHT_T))
        with _NamedLinears(table, used):
            yield used
    finally:
        for mod in owners:
            delattr(mod, WEIGHT_T)


class _Shared(NamedTuple):
    """Computed once per call, used by every layer."""
    B: int
    T: int
    P: int
    cos: torch.Tensor       # [b, T, rope/2], b = B or 1 (per-row positions)
    sin: torch.Tensor
    cs3: torch.Tensor       # [b, T, 2 rope]: [cos | cos | sin | sin], the factors of ``_rope`` (shared key)
    cs4: torch.Tensor       # [b, T, 1, 2 rope] (per-head queries)
    mask: torch.Tensor      # [T, P + T] additive: MIN where query t must not attend (column > P + t), else 0
    pad: torch.Tensor       # [b] left padding of [past | new] per row


def shared(inv_freq: torch.Tensor, rope_scale: float, input_ids: torch.Tensor, past0: torch.Tensor,
           pad: torch.Tensor) -> _Shared:
    """What every layer shares, from the call's ids, first past cache and left padding (also the
    prologue of the layer-by-layer export, ``export.layered``)."""
    (B, T), P = input_ids.shape, past0.shape[1]
    idx = torch.arange(T, device=input_ids.device)
    q_col = idx + P                                                             # [T] query columns
    pos = q_col[None, :] - pad[:, None]                                         # [b, T] positions
    freqs = pos.float()[..., None] * inv_freq                                   # [b, T, rope/2]
    cos, sin = freqs.cos() * rope_scale, freqs.sin() * rope_scale
    cs = torch.cat([cos, cos, sin, sin], dim=-1)                                # [b, T, 2 rope]
    hidden = torch.arange(P + T, device=input_ids.device)[None, :] > q_col[:, None]  # [T, P + T]
    mask = torch.where(hidden, torch.tensor(MIN), torch.tensor(0.0))             # added to the scores
    return _Shared(B, T, P, cos, sin, cs, cs.unsqueeze(2), mask, pad)


def _rope(x: torch.Tensor, rot: torch.Tensor, fold: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """``model.apply_rope`` as three nodes: ``x @ rot`` = [x1 | x2 | -x2 | x1] (``x @ pick`` =
    the halves ``apply_rope`` rotates, de-interleaved or not, then ``x @ swap``), times ``cs`` =
    [cos | cos | sin | sin] ([b, T, 1, 2 rope], shared by all layers), then ``@ fold`` adds the two
    halves: [x1 cos - x2 sin | x2 cos + x1 sin]. Each MatMul output is one input times +-1 plus
    exact zeros (the second: one rounded sum of the same two products), so the values are
    bit-identical to the slicing form, without its strided slices and concatenation, and two nodes
    fewer than ``* cos + * sin`` (onnxruntime's per-node cost, once per q and k per layer)."""
    return torch.matmul(torch.matmul(x, rot) * cs, fold)


def rope_matrices(rope: int, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rot [rope, 2 rope] = [pick | swap] and fold [2 rope, rope] = [I ; I] for ``_rope``."""
    half = rope // 2
    src1 = torch.arange(0, rope, 2) if interleave else torch.arange(half)        # where x1 sits in x
    src2 = src1 + 1 if interleave else torch.arange(half, rope)
    pick, swap = torch.zeros(rope, rope), torch.zeros(rope, rope)
    out1, out2 = torch.arange(half), torch.arange(half, rope)
    pick[src1, out1], pick[src2, out2] = 1.0, 1.0
    swap[src2, out1], swap[src1, out2] = -1.0, 1.0
    return torch.cat([pick, swap], dim=1), torch.cat([torch.eye(rope), torch.eye(rope)], dim=0)


class _Absorbed(nn.Module):
    """Per-layer constants derived from kv_b_proj (ONNX initializers ``absorbed.{i}.w_uk/w_uv``)."""

    def __init__(self, w_uk: torch.Tensor, w_uv: torch.Tensor):
        super().__init__()
        self.register_buffer("w_uk", w_uk)   # [H, nope, kv_lora]
        self.register_buffer("w_uv", w_uv)   # [H, kv_lora, v]


class LatentDecoder(nn.Module):
    def __init__(self, model: Transformer, moe: str = "portable", attention: str = "absorb"):
        super().__init__()
        self.model, a = model, model.args
        self.attend = self.attention if attention == "absorb" else self.attention_expanded
        self.absorbed, self.ffn = nn.ModuleList(), nn.ModuleList()
        # RoPE angles are computed per call from inv_freq (rope/2 floats) instead of gathering from
        # [max_positions, rope/2] cos/sin tables: the same values, and no tables in the graph
        inv_freq, self.rope_scale = rope_frequencies(a)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        rot, fold = rope_matrices(a.qk_rope_head_dim, a.rope_interleave)
        self.register_buffer("rope_rot", rot, persistent=False)
        self.register_buffer("rope_fold", fold, persistent=False)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            H, nope, v, kvl = attn.n_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
            wkv = attn.kv_b_proj.weight.detach().view(H, nope + v, kvl)          # [H, nope+v, kvl]
            w_uv = wkv[:, nope:].transpose(1, 2).contiguous()                    # [H, kvl, v]
            self.absorbed.append(_Absorbed(wkv[:, :nope].contiguous(), w_uv))  # w_uk [H, nope, kvl]
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                mlp = (ContribMoE if moe == "contrib" else PortableMoE)(mlp, a, a.for_layer(i))
            self.ffn.append(mlp)

    def attention(self, attn, ab, x, ctx, past):
        """x [B, T, D], past [B, P, W] -> (out [B, T, D], new [B, T, W]). ``ctx`` holds what every
        layer shares (B, T, P, RoPE rows, attention mask), computed once so that the graph's shape
        plumbing is not repeated per layer (onnxruntime's per-node cost matters per token)."""
        a = self.model.args
        B, T = ctx.B, ctx.T
        H = attn.n_heads
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))) if a.q_lora_rank else attn.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, a.qk_head_dim).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        q_pe = _rope(q_pe, self.rope_rot, self.rope_fold, ctx.cs4)              # [B, T, H, rope]
        k_pe = _rope(k_pe, self.rope_rot, self.rope_fold, ctx.cs3)              # [B, T, rope]
        new = torch.cat([attn.kv_a_layernorm(c_kv), k_pe], dim=-1)              # [B, T, W]
        q_lat = torch.matmul(q_nope.transpose(1, 2), ab.w_uk)                   # [B, H, T, kvl]
        q = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1) * a.softmax_scale  # [B, H, T, W]
        past4, new4 = past.unsqueeze(1), new.unsqueeze(1)                       # [B, 1, S, W]
        o = RowAttention.apply(q, past4, new4, ctx.mask, ctx.pad, a.kv_lora_rank)  # [B, H, T, kvl]
        o = torch.matmul(o, ab.w_uv)                                            # [B, H, T, v]
        o = o.transpose(1, 2).reshape(B, T, H * a.v_head_dim)
        return attn.o_proj(o), new

    def attention_expanded(self, attn, ab, x, ctx, past):
        """The model's own MLA (re-expands all P + T latent rows to per-head K/V through kv_b_proj).
        Kept to measure the absorbed graph against (benchmarks/expert_scaling.py --design)."""
        kvl, P, T = self.model.args.kv_lora_rank, ctx.P, ctx.T
        col, q_col = torch.arange(P + T, device=x.device), torch.arange(T, device=x.device) + P
        visible = (col[None, None, :] <= q_col[None, :, None]) & (col[None, None, :] >= ctx.pad[:, None, None])
        out, c_kv, k_pe = attn(x, ctx.cos, ctx.sin, visible.unsqueeze(1), past[..., :kvl], past[..., kvl:])
        return out, torch.cat([c_kv[:, P:], k_pe[:, P:]], dim=-1)

    def forward(self, input_ids: torch.Tensor, *past_keep_pad: torch.Tensor):
        """input_ids [B, T]; past[i] [B, P, W]; logits_keep [] int64; left_pad [B] (or [1]) int64 ->
        (logits [B, min(T, logits_keep), vocab] of the last positions, *new[i] [B, T, W]).
        Generation asks for 1 row (the lm_head over a whole prompt is wasted work and memory)."""
        m = self.model
        past, keep, pad = past_keep_pad[:-2], past_keep_pad[-2], past_keep_pad[-1]
        T = input_ids.shape[1]
        idx = torch.arange(T, device=input_ids.device)
        ctx = shared(self.inv_freq, self.rope_scale, input_ids, past[0], pad)
        x = m.model.embed_tokens(input_ids)
        news = []
        for layer, ab, ffn, past_i in zip(m.model.layers, self.absorbed, self.ffn, past):
            h, new = self.attend(layer.self_attn, ab, layer.input_layernorm(x), ctx, past_i)
            x = x + h
            x = x + ffn(layer.post_attention_layernorm(x))
            news.append(new)
        rows = torch.where(idx >= T - keep)[0]                                  # last `keep` positions
        return (m.lm_head(m.model.norm(x).index_select(1, rows)), *news)
