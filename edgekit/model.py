"""The DeepSeek-V3 architecture (MLA attention + DeepSeekMoE) in one file that reads top to bottom.

What: ``ModelArgs`` (one flat dataclass, field names as in a Hugging Face ``config.json``), the
building blocks, ``MLA``, ``MLP``, ``Gate``, ``MoE``, ``Block`` and ``Transformer``. Module names
equal Hugging Face tensor names (``model.layers.3.mlp.experts.5.gate_proj.weight``) so a
checkpoint's ``state_dict`` maps 1:1, with no conversion table.

Why this shape: everything here must export to ONNX and run on onnxruntime CPU, so
- no Python branching on tensor values inside ``forward`` (that bakes one routing into a trace):
  MoE dispatch is ``torch.where`` -> gather -> expert -> ``index_add`` for every expert, whatever
  the routing, and zero-token experts simply do zero-row matmuls;
- RoPE uses real cos/sin tables (no ``view_as_complex``), looked up by position;
- the causal mask is built from ``arange`` comparisons and applied with a finite ``masked_fill``.

Invariants: ``forward(input_ids) -> logits [B, T, vocab]`` in fp32 equals transformers'
``DeepseekV3ForCausalLM`` to <= 1e-4 (tests/test_hf_parity.py). ``forward_cached`` with a latent
cache gives the same logits as a full forward over the concatenated tokens (tests/test_model.py).
The cache holds only MLA's compressed latent (kv_lora_rank) and the shared rotary key
(qk_rope_head_dim) per token and layer.

Per-layer sizes: structured pruning can leave layers with different head / expert / channel counts.
``layer_overrides`` maps a layer index (as a string, JSON-friendly) to the fields that differ for it;
``args.for_layer(i)`` resolves them. A config without overrides is plain Hugging Face.

Failure modes: invalid configs raise ``ValueError`` naming the field to fix (``__post_init__``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Per-layer fields that pruning may change and ``layer_overrides`` may therefore hold.
LAYER_FIELDS = ("num_attention_heads", "intermediate_size", "moe_intermediate_size",
                "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "dense")


@dataclass
class ModelArgs:
    """Defaults are v3-nano's, the shipped reference model."""

    # model
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 6
    intermediate_size: int = 640          # dense FFN width (layers < first_k_dense_replace)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # mla
    num_attention_heads: int = 4
    q_lora_rank: int | None = 96          # 0/None: queries are projected directly (V2-Lite style)
    kv_lora_rank: int = 64                # the cached latent width
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16            # decoupled rotary part, shared by all heads in the cache
    v_head_dim: int = 32
    attention_bias: bool = False
    # rope (yarn when rope_scaling["type"/"rope_type"] == "yarn")
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True          # DeepSeek checkpoints store rotary dims as (x0,x1),(x2,x3)..
    # moe
    n_routed_experts: int | None = 8      # None/0: every layer is dense
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    moe_intermediate_size: int = 160
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"         # V3: sigmoid; V2: softmax
    topk_method: str = "noaux_tc"         # V3: noaux_tc (bias for selection); V2: greedy / group_limited_greedy
    n_group: int | None = 4
    topk_group: int | None = 2
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # edgekit
    model_type: str = "deepseek_v3"
    layer_overrides: dict = field(default_factory=dict)  # {"3": {"n_routed_experts": 6}, ...}

    def __post_init__(self):
        if not self.q_lora_rank:
            self.q_lora_rank = None
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func={self.scoring_func!r}: use 'sigmoid' (V3) or 'softmax' (V2)")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method={self.topk_method!r}: use noaux_tc, greedy or group_limited_greedy")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (DeepSeek's) is supported")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        self.layer_overrides = {str(k): dict(v) for k, v in (self.layer_overrides or {}).items()}
        for i, over in self.layer_overrides.items():
            bad = set(over) - set(LAYER_FIELDS)
            if bad:
                raise ValueError(f"layer_overrides[{i}] has {sorted(bad)}; allowed: {LAYER_FIELDS}")
        for i in range(self.num_hidden_layers):
            la = self.for_layer(i)
            if la.is_moe:
                if la.num_experts_per_tok > la.n_routed_experts:
                    raise ValueError(f"layer {i}: num_experts_per_tok={la.num_experts_per_tok} > "
                                     f"n_routed_experts={la.n_routed_experts}; lower num_experts_per_tok")
                if la.n_routed_experts % (la.n_group or 1):
                    raise ValueError(f"layer {i}: n_routed_experts={la.n_routed_experts} is not divisible "
                                     f"by n_group={la.n_group}; set n_group to a divisor")

    # -- per-layer view -------------------------------------------------------------------------
    def for_layer(self, i: int) -> LayerArgs:
        moe = bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
        la = LayerArgs(self.num_attention_heads, self.intermediate_size, self.moe_intermediate_size,
                       self.n_routed_experts or 0, self.num_experts_per_tok, self.n_group or 1,
                       self.topk_group or 1, not moe)
        over = self.layer_overrides.get(str(i))
        return dataclasses.replace(la, **over) if over else la

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if _rope_type(rs) == "yarn" and rs.get("mscale_all_dim"):
            m = _yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale


@dataclass
class LayerArgs:
    num_attention_heads: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    dense: bool

    @property
    def is_moe(self) -> bool:
        return not self.dense


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rope_type(rs: dict) -> str:
    return (rs or {}).get("rope_type", (rs or {}).get("type", "default"))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """inv_freq [qk_rope_head_dim // 2] and the cos/sin scale (YaRN-corrected if configured)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    attn_factor = 1.0
    rs = args.rope_scaling or {}
    if _rope_type(rs) == "yarn":
        factor, orig = rs["factor"], rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def corr_dim(rot):  # the rotary dim that completes `rot` turns over the original context
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrap) + inv_freq * extrap
        attn_factor = rs.get("attention_factor") or (
            _yarn_mscale(factor, rs.get("mscale") or 1) / _yarn_mscale(factor, rs.get("mscale_all_dim") or 1)
            if rs.get("mscale") and rs.get("mscale_all_dim") else _yarn_mscale(factor))
    return inv_freq, float(attn_factor)


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_position_embeddings, qk_rope_head_dim // 2]."""
    inv_freq, attn_factor = rope_frequencies(args)
    t = torch.arange(args.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos() * attn_factor, freqs.sin() * attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, T, H, R]; cos/sin [T, R/2] (or [B, T, R/2]: per-row positions). Output layout is
    [rotated evens, rotated odds] when interleaved (as transformers does); q and k get the same
    layout, so scores are unchanged."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------
# MLA: multi-head latent attention
# ---------------------------------------------------------------------------------------------
class MLA(nn.Module):
    """Queries: x -> q_a_proj -> norm -> q_b_proj (or q_proj). Keys/values: x -> kv_a_proj_with_mqa ->
    [latent c_kv (kv_lora_rank) | shared rotary key k_pe] ; c_kv -> norm -> kv_b_proj -> per-head
    [k_nope | v]. The cache keeps (norm(c_kv), rotated k_pe) only."""

    def __init__(self, args: ModelArgs, n_heads: int):
        super().__init__()
        self.n_heads, self.args = n_heads, args
        a, qk = args, args.qk_head_dim
        if a.q_lora_rank:
            self.q_a_proj = nn.Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank)
            self.q_b_proj = nn.Linear(a.q_lora_rank, n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(a.hidden_size, n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim,
                                            bias=a.attention_bias)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank)
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, n_heads * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * a.v_head_dim, a.hidden_size, bias=a.attention_bias)

    def project(self, x, cos, sin):
        """x [B, T, D] -> q_nope [B,T,H,nope], q_pe [B,T,H,rope], c_kv [B,T,kv_lora], k_pe [B,T,rope]."""
        a = self.args
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if a.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, a.qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, a.rope_interleave)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, a.rope_interleave).squeeze(2)
        return q_nope, q_pe, self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x, cos, sin, mask, past_kv=None, past_pe=None):
        """x [B, T, D]; mask [T, S] bool (True = may attend), S = past + T.
        past_kv [B, P, kv_lora], past_pe [B, P, rope] or None. Returns (out [B,T,D], kv [B,S,..], pe)."""
        a = self.args
        B, T, _ = x.shape
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if past_kv is not None:
            c_kv = torch.cat([past_kv, c_kv], dim=1)                     # [B, S, kv_lora]
            k_pe = torch.cat([past_pe, k_pe], dim=1)                     # [B, S, rope]
        kv = self.kv_b_proj(c_kv).view(B, -1, self.n_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)  # [B, S, H, *]
        scores = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * a.softmax_scale
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        p = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        out = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, self.n_heads * a.v_head_dim)
        return self.o_proj(out), c_kv, k_pe


# ---------------------------------------------------------------------------------------------
# FFN: dense MLP, router, MoE
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU FFN; used for dense layers, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: fp32 scores; selection may add e_score_correction_bias (V3) and be limited to the
    best topk_group of n_group expert groups; the weights come from the unbiased scores."""

    def __init__(self, args: ModelArgs, la: LayerArgs):
        super().__init__()
        self.args, self.la = args, la
        self.weight = nn.Parameter(torch.empty(la.n_routed_experts, args.hidden_size))
        if args.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(la.n_routed_experts))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        """x [N, D] -> weights [N, k] (scaled), indices [N, k]."""
        a, la = self.args, self.la
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if a.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if a.topk_method == "noaux_tc" else scores
        if la.n_group > 1 and a.topk_method != "greedy":
            grouped = choice.view(-1, la.n_group, la.n_routed_experts // la.n_group)
            if a.topk_method == "noaux_tc":
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(la.topk_group, dim=-1)[1], 1.0)
            choice = choice.masked_fill(~keep.bool().repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        indices = choice.topk(la.num_experts_per_tok, dim=-1)[1]
        weights = scores.gather(1, indices)
        if a.norm_topk_prob and la.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * a.routed_scaling_factor).to(x.dtype), indices


class MoE(nn.Module):
    """Routed experts (sparse dispatch by default) plus the shared experts.

    ``dense = True`` (set by ``dense_dispatch``, for training on a GPU) runs every expert on every
    token as three GEMMs over the experts' stacked weights, weighted by a dense [N, E] routing
    matrix that is zero where an expert was not chosen: the same sums as the sparse path up to fp
    rounding, with the same gradients (zero for unchosen pairs), and no per-expert gather whose
    size the host must wait for. It costs E/k times the expert FLOPs, which a GPU absorbs and a
    CPU does not; export and inference keep the sparse form."""

    def __init__(self, args: ModelArgs, la: LayerArgs):
        super().__init__()
        self.gate = Gate(args, la)
        self.experts = nn.ModuleList(MLP(args.hidden_size, la.moe_intermediate_size)
                                     for _ in range(la.n_routed_experts))
        self.shared_experts = (MLP(args.hidden_size, la.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts else None)
        self.dense = False

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed experts' stacked weights the dense path computes with: gate and up [E, I, D],
        down [E, D, I] (QAT rounds them here, every expert's rows at once)."""
        return tuple(torch.stack([getattr(e, n).weight for e in self.experts])
                     for n in ("gate_proj", "up_proj", "down_proj"))

    def forward(self, x):
        """x [B, T, D]. Sparse dispatch with no value-dependent Python branching: each expert
        gathers the tokens routed to it (possibly none) and adds its weighted output back."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                    # [N, D]
        weights, indices = self.gate(x)                                 # [N, k]
        if self.dense:
            y = self._dense(x, weights, indices)
        else:
            y = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                token, slot = torch.where(indices == e)                 # [n_e]
                y = y.index_add(0, token, expert(x[token]) * weights[token, slot].unsqueeze(-1))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def _dense(self, x, weights, indices):
        """x [N, D], weights/indices [N, k] -> [N, D]: all experts as one wide SwiGLU of E*I channels."""
        (N, D), E = x.shape, len(self.experts)
        w = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, indices, weights)   # [N, E]
        gate, up, down = self.expert_weights()                                              # [E, I, D] x2, [E, D, I]
        down = down.permute(1, 0, 2).reshape(D, -1)                                         # [D, E*I]
        h = F.silu(F.linear(x, gate.reshape(-1, D))) * F.linear(x, up.reshape(-1, D))       # [N, E*I]
        h = (h.view(N, E, -1) * w.unsqueeze(-1)).view(N, -1)
        return F.linear(h, down)


# ---------------------------------------------------------------------------------------------
# Block and Transformer
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        la = args.for_layer(layer_idx)
        self.self_attn = MLA(args, la.num_attention_heads)
        self.mlp = MoE(args, la) if la.is_moe else MLP(args.hidden_size, la.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_kv=None, past_pe=None):
        h, kv, pe = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv, past_pe)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv, pe


class Decoder(nn.Module):
    """Holds the parts under the ``model.`` prefix of Hugging Face names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)   # [max_pos, rope/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]."""
        return self.forward_cached(input_ids)[0]

    def forward_cached(self, input_ids, past_kv: list | None = None, past_pe: list | None = None,
                       return_hidden: bool = False):
        """Forward over new tokens given a latent cache of P earlier tokens per layer.
        input_ids [B, T]; past_kv[i] [B, P, kv_lora]; past_pe[i] [B, P, rope].
        Returns (logits [B, T, vocab], kv list [B, P+T, kv_lora], pe list [B, P+T, rope][, hiddens])."""
        T = input_ids.shape[1]
        P = past_kv[0].shape[1] if past_kv is not None else 0
        pos = torch.arange(T, device=input_ids.device) + P                     # [T]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]                      # [T, rope/2]
        mask = torch.arange(P + T, device=input_ids.device)[None, :] <= pos[:, None]  # [T, P+T]
        x = self.model.embed_tokens(input_ids)
        kvs, pes, hiddens = [], [], [x]
        for i, layer in enumerate(self.model.layers):
            x, kv, pe = layer(x, cos, sin, mask,
                              past_kv[i] if past_kv is not None else None,
                              past_pe[i] if past_pe is not None else None)
            kvs.append(kv)
            pes.append(pe)
            hiddens.append(x)
        logits = self.lm_head(self.model.norm(x))
        return (logits, kvs, pes, hiddens) if return_hidden else (logits, kvs, pes)


@contextlib.contextmanager
def dense_dispatch(model: nn.Module, on: bool = True):
    """Within the block every ``MoE`` of ``model`` runs its dense path (see ``MoE``) when ``on``;
    afterwards each is as it was."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    before = [m.dense for m in moes]
    try:
        for m in moes:
            m.dense = on
        yield model
    finally:
        for m, b in zip(moes, before):
            m.dense = b


if __name__ == "__main__":
    torch.manual_seed(0)
    args = ModelArgs()
    model = Transformer(args)
    ids = torch.randint(0, args.vocab_size, (2, 16))
    print(model(ids).shape, sum(p.numel() for p in model.parameters()) / 1e6, "M params")
