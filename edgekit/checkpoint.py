"""Hugging Face-format checkpoint I/O for V3 models: ``load(path)`` and ``save(model, path)``.

What: reads ``config.json`` (both the ``rope_theta``/``rope_scaling`` and the newer
``rope_parameters`` spelling), ``model.safetensors`` or sharded ``model-0000k-of-0000n.safetensors``
with ``model.safetensors.index.json``, and ``tokenizer.json``; writes the same layout.

Why: tensor names are Hugging Face's, so a ``save_pretrained`` checkpoint loads here and ours loads
in transformers (when no per-layer pruning overrides are present).

Invariants: weights are read only through safetensors (never unpickled); every tensor the model
expects is present with the configured shape and finite values; writes go to a temp dir renamed
into place when complete, so a failure leaves no half-written checkpoint.

Formats: fp32, bf16, fp16, and fp8 e4m3 with ``weight_scale_inv`` 128x128 block scales
(``quantization_config: {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}``, as
DeepSeek publishes V3), dequantized layer by layer (``edgekit.lazy``, ``edgekit.fp8``).

Failure modes (all ``EdgekitError``, one line naming the fix): missing/empty dir, ``.bin``/``.pt``
weights, corrupt or truncated safetensors, an index naming a missing shard or lacking a tensor,
unknown ``model_type``, missing tensors, shape mismatches, fp8 scales of the wrong shape, NaN/Inf
weights. Multi-token-prediction layers are skipped with a note on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_dir
from .errors import EdgekitError
from .model import ModelArgs, Transformer, rope_tables

SUPPORTED_TYPES = ("deepseek_v3", "deepseek_v2")
_ARG_FIELDS = {f.name for f in dataclasses.fields(ModelArgs)}


def reference_model_dir() -> Path:
    """The shipped, trained reference model v3-nano."""
    return Path(__file__).parent / "data" / "v3-nano"


def resolve(path: str | os.PathLike | None) -> Path:
    """A checkpoint directory; ``None``/``"v3-nano"``/``"v3-mini"`` name the shipped reference models."""
    if path in (None, "", "v3-nano"):
        return reference_model_dir()
    if path == "v3-mini" and not Path(path).exists():
        return reference_model_dir().parent / "v3-mini"
    return Path(path)


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelArgs
# ---------------------------------------------------------------------------------------------
def args_from_config(cfg: dict) -> ModelArgs:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise EdgekitError(f"config.json model_type={mt!r} is not a DeepSeek-V3-family model; "
                           f"edgekit supports {', '.join(SUPPORTED_TYPES)}")
    cfg = dict(cfg)
    rp = cfg.pop("rope_parameters", None)
    if rp:  # newer transformers spelling: theta and scaling in one dict
        rp = dict(rp)
        cfg.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
        if rp.get("rope_type", rp.get("type", "default")) != "default":
            cfg["rope_scaling"] = rp
    if mt == "deepseek_v2":
        cfg.setdefault("scoring_func", "softmax")
        cfg.setdefault("topk_method", "greedy")
        cfg.setdefault("norm_topk_prob", False)
        cfg.setdefault("rope_interleave", True)
    kw = {k: v for k, v in cfg.items() if k in _ARG_FIELDS and v is not None or k == "q_lora_rank"}
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    try:
        return ModelArgs(**kw)
    except (TypeError, ValueError) as e:
        raise EdgekitError(f"config.json is invalid: {e}") from None


def config_from_args(args: ModelArgs) -> dict:
    cfg = dataclasses.asdict(args)
    if not cfg["layer_overrides"]:
        del cfg["layer_overrides"]
    cfg["architectures"] = ["DeepseekV3ForCausalLM" if args.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
    cfg["num_key_value_heads"] = args.num_attention_heads
    cfg["num_nextn_predict_layers"] = 0
    cfg["rope_parameters"] = {"rope_theta": args.rope_theta, **(args.rope_scaling or {"rope_type": "default"})}
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike | None) -> tuple[Path, dict]:
    """The checkpoint dir (None: v3-nano) and its parsed config.json."""
    d = resolve(path)
    if not d.is_dir():
        raise EdgekitError(f"{d} is not a directory; pass a Hugging Face checkpoint directory")
    if not (d / "config.json").exists():
        raise EdgekitError(f"{d} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except ValueError as e:
        raise EdgekitError(f"{d / 'config.json'} is not valid JSON ({e}); fix or re-save it") from None
    return d, cfg


def load(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a DeepSeek-V3-family Hugging Face checkpoint directory (default: the shipped v3-nano).

    fp32, bf16, fp16 and fp8 (e4m3, block scales) weights, single-file or sharded; read tensor by
    tensor through ``edgekit.lazy.CheckpointReader`` (one layer at a time, fp8 dequantized per
    layer), so peak memory is the model plus one layer."""
    from .lazy import CheckpointReader

    r = CheckpointReader(path, dtype=dtype)
    with torch.device("meta"):
        model = Transformer(r.args)
    model.load_state_dict(r.global_state(), strict=False, assign=True)
    for i in range(r.args.num_hidden_layers):
        model.model.layers[i].load_state_dict(
            {k.split(".", 3)[3]: v for k, v in r.layer_state(i).items()}, strict=True, assign=True)
    if r.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    cos, sin = rope_tables(r.args)
    model.rope_cos, model.rope_sin = cos, sin
    model.name = r.name
    return model.to(dtype).eval()


def load_tokenizer(path: str | os.PathLike | None = None):
    """The ``tokenizer.json`` beside a checkpoint (or inside a bundle)."""
    from tokenizers import Tokenizer

    f = resolve(path) / "tokenizer.json"
    if not f.exists():
        raise EdgekitError(f"{f} not found; copy the model's tokenizer.json next to its weights")
    return Tokenizer.from_file(str(f))


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def save(model: Transformer, path: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None,
         dtype: torch.dtype | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) atomically."""
    out = Path(path)
    with atomic_dir(out) as tmp:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.args.tie_word_embeddings:
            sd.pop("lm_head.weight")
        if dtype is not None:  # router weights and bias stay fp32 (selection is sensitive)
            sd = {k: v if ".gate." in k or not v.is_floating_point() else v.to(dtype) for k, v in sd.items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_from_args(model.args), indent=2) + "\n")
        if tokenizer_from is not None:
            shutil.copy(resolve(tokenizer_from) / "tokenizer.json", tmp / "tokenizer.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out
