"""Model facts for ``edgekit info``: parameters by kind, active parameters per token, cache bytes.

What: ``param_count(module)`` (the one parameter count: tied tensors once);
``model_info(model) -> dict`` with ``params_total``, ``params_active`` (what one token reads:
everything except the routed experts it does not pick), a breakdown into embeddings / attention /
dense FFN / shared experts / routed experts / router / norms, per-layer sizes, and the KV-cache
bytes per token of MLA's latent cache beside what a per-head K/V cache would take.

``describe(model_or_shape)``: the same for a checkpoint directory (headers checked, no weights
read) or a named shape (``edgekit/data/shapes.toml``), computed on torch's meta device.

Invariant: the breakdown sums to ``params_total`` (tested). Tied embeddings are counted once.
"""

from __future__ import annotations

from .model import Transformer


def _kind(name: str) -> str:
    if name.startswith(("model.embed_tokens", "lm_head")):
        return "embeddings"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    return "dense_ffn"


def cache_bytes_per_token(args, dtype_bytes: int = 4) -> dict:
    """Latent cache (kv_lora_rank + qk_rope_head_dim per layer) vs per-head K and V."""
    latent = per_head = 0
    for i in range(args.num_hidden_layers):
        h = args.for_layer(i).num_attention_heads
        latent += args.kv_lora_rank + args.qk_rope_head_dim
        per_head += h * (args.qk_head_dim + args.v_head_dim)
    return {"latent": latent * dtype_bytes, "per_head_kv": per_head * dtype_bytes,
            "ratio": per_head / latent}


def param_count(module) -> int:
    """Parameters of a model or any submodule; ``parameters()`` yields a tied tensor once."""
    return sum(p.numel() for p in module.parameters())


def model_info(model: Transformer) -> dict:
    a = model.args
    breakdown = dict.fromkeys(
        ("embeddings", "attention", "dense_ffn", "shared_experts", "routed_experts", "router", "norms"), 0)
    seen = set()
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        breakdown[_kind(name)] += p.numel()
    total = sum(breakdown.values())
    inactive, layers = 0, []
    for i, layer in enumerate(model.model.layers):
        la = a.for_layer(i)
        row = {"layer": i, "heads": la.num_attention_heads,
               "ffn": "dense" if la.dense else "moe"}
        if la.dense:
            row["intermediate_size"] = layer.mlp.gate_proj.out_features
        else:
            per_expert = [param_count(e) for e in layer.mlp.experts]
            # a token reads its top-k experts; count the average expert size for the rest
            avg = sum(per_expert) / max(len(per_expert), 1)
            inactive += int(round(avg * (len(per_expert) - la.num_experts_per_tok)))
            row.update(experts=len(per_expert), top_k=la.num_experts_per_tok,
                       expert_intermediate=la.moe_intermediate_size)
        layers.append(row)
    return {
        "name": getattr(model, "name", None),
        "architecture": a.model_type,
        "params_total": total,
        "params_active": total - inactive,
        "breakdown": breakdown,
        "layers": layers,
        "kv_cache_bytes_per_token": cache_bytes_per_token(a)["latent"],
        "kv_cache": cache_bytes_per_token(a),
        "config": {k: getattr(a, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
            "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace",
            "max_position_embeddings")},
    }


def shape_info(name: str) -> dict:
    """``model_info`` of a named shape, from its config alone (meta device, no weights)."""
    from .shapes import meta_model, shape_args

    m = meta_model(shape_args(name))
    m.name = name
    return model_info(m)


def describe(model_or_shape=None) -> dict:
    """``model_info`` of a checkpoint dir (None: v3-nano, the trained one) or of a named shape. A
    checkpoint's safetensors headers are checked against its config (one-line errors), but no
    weight is read: a checkpoint larger than memory is described in a second."""
    from pathlib import Path

    from .lazy import CheckpointReader
    from .shapes import is_shape, meta_model

    if is_shape(model_or_shape) and model_or_shape != "v3-nano" and not Path(model_or_shape).exists():
        return shape_info(model_or_shape)
    r = CheckpointReader(model_or_shape)
    m = meta_model(r.args)
    m.name = r.name
    return model_info(m)
