"""Hugging Face-format checkpoint I/O for V3 models: ``load(path)`` and ``save(model, path)``.

What: reads ``config.json`` (both the ``rope_theta``/``rope_scaling`` and the newer
``rope_parameters`` spelling), ``model.safetensors`` or sharded ``model-0000k-of-0000n.safetensors``
with ``model.safetensors.index.json``, and ``tokenizer.json``; writes the same layout.

Why: tensor names are Hugging Face's, so a ``save_pretrained`` checkpoint loads here and ours loads
in transformers (when no per-layer pruning overrides are present).

Invariants: weights are read only through safetensors (never unpickled); every tensor the model
expects is present with the configured shape and finite values; writes go to a temp dir renamed
into place when complete, so a failure leaves no half-written checkpoint.

Failure modes (all ``EdgekitError``, one line naming the fix): missing/empty dir, ``.bin``/``.pt``
weights, corrupt or truncated safetensors, a config.json that is not an object or has mistyped
values, unknown ``model_type``, missing tensors, shape mismatches (checked from the safetensors
headers before anything is allocated, ``edgekit.configcheck``), weights with more layers than the
config, shard names leaving the directory, NaN/Inf weights, a corrupt tokenizer.json.
Multi-token-prediction layers (their own tensors, or ``num_nextn_predict_layers``) are skipped with
a note on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_dir
from .bundle import member
from .configcheck import check_types, precheck
from .errors import EdgekitError
from .model import ModelArgs, Transformer

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
    check_types(kw)
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
def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EdgekitError(f"{index} is corrupt; re-save the checkpoint with save_pretrained") from None
        for n in names:  # shard names must stay inside the checkpoint directory
            member(d, n, "model.safetensors.index.json")
        missing = [n for n in names if not (d / n).exists()]
        if missing:
            raise EdgekitError(f"{d} lacks shard {missing[0]} named in model.safetensors.index.json; copy all shards")
        return [d / n for n in names]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    pickled = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise EdgekitError(
            f"{d} holds pickle weights ({pickled[0]}), which edgekit never unpickles; convert with "
            "`python -c \"import torch,safetensors.torch as s; s.save_file(torch.load('IN', weights_only=True), "
            "'model.safetensors')\"` or transformers' save_pretrained(safe_serialization=True)")
    raise EdgekitError(f"{d} has no model.safetensors; point to a Hugging Face checkpoint directory")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EdgekitError(f"{f} is corrupt or truncated ({msg}); re-download or re-save it") from None
    return out


def _unfuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory fused experts (gate_up_proj [E, 2I, D], down_proj [E, D, I]) -> per expert."""
    for k in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:
        pre = k[: -len("gate_up_proj")]
        gu, down = sd.pop(k), sd.pop(pre + "down_proj")
        for e in range(gu.shape[0]):
            g, u = gu[e].chunk(2, dim=0)
            sd[f"{pre}{e}.gate_proj.weight"], sd[f"{pre}{e}.up_proj.weight"] = g, u
            sd[f"{pre}{e}.down_proj.weight"] = down[e]
    return sd


def load(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a DeepSeek-V3-family Hugging Face checkpoint directory (default: the shipped v3-nano)."""
    d = resolve(path)
    if not d.is_dir():
        raise EdgekitError(f"{d} is not a directory; pass a Hugging Face checkpoint directory")
    if not (d / "config.json").exists():
        raise EdgekitError(f"{d} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{d / 'config.json'} is not valid JSON ({e}); fix or re-save it") from None
    if not isinstance(cfg, dict):
        raise EdgekitError(f"{d / 'config.json'} is a JSON {type(cfg).__name__}, not an object; fix or re-save it")
    args = args_from_config(cfg)
    files = _weight_files(d)
    mtp = precheck(d, args, cfg, files)  # shapes from headers vs config, before anything is allocated
    sd = _unfuse_experts(read_tensors(files))
    model = Transformer(args)
    expected = model.state_dict()
    n = args.num_hidden_layers
    if mtp:
        print(f"note: skipped {len(mtp)} multi-token-prediction tensors (layers >= {n}); "
              "edgekit runs the main model only", file=sys.stderr)
    extra = set(sd) - set(expected) - mtp - {"lm_head.weight"}
    if extra:
        raise EdgekitError(f"{d}: tensor {sorted(extra)[0]} does not fit this config "
                           f"({len(extra)} unexpected); check config.json matches the weights")
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    for k, ref in expected.items():
        t = sd.get(k)
        if t is None:
            if k.endswith("e_score_correction_bias"):
                continue  # older checkpoints: bias 0
            raise EdgekitError(f"{d} lacks tensor {k}; the checkpoint is incomplete or config.json is wrong")
        if tuple(t.shape) != tuple(ref.shape):
            raise EdgekitError(f"{d}: {k} has shape {tuple(t.shape)} but config.json implies "
                               f"{tuple(ref.shape)}; fix config.json or use matching weights")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise EdgekitError(f"{d}: {k} contains NaN/Inf values; re-export the checkpoint from a healthy run")
    model.load_state_dict({k: sd[k] for k in expected if k in sd}, strict=False)
    model.name = d.name
    return model.to(dtype).eval()


def load_tokenizer(path: str | os.PathLike | None = None):
    """The ``tokenizer.json`` beside a checkpoint (or inside a bundle)."""
    from .bundle import read_tokenizer

    return read_tokenizer(resolve(path))


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
