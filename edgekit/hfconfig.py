"""A checkpoint's identity and config: which directory, and ``config.json`` <-> ``ModelArgs``.

What: ``resolve(path)`` (None / "v3-nano" / "v3-mini" name the shipped reference models),
``read_config(path)`` (the directory and its parsed config.json), ``args_from_config(cfg)`` (both
the ``rope_theta``/``rope_scaling`` and the newer ``rope_parameters`` spelling, deepseek_v2
defaults) and ``config_from_args(args)``.

Why its own module: ``edgekit.lazy`` (the header-checked reader every load goes through) and
``edgekit.shapes`` need the config without the loader; ``edgekit.checkpoint`` re-exports these
names and builds ``load`` on the reader, so the import graph has no circle.

Failure modes (``EdgekitError``, one line naming the fix): missing dir or config.json, invalid
JSON or not an object, unknown ``model_type``, mistyped values (``configcheck.check_types``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .configcheck import check_types
from .errors import EdgekitError
from .model import ModelArgs

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


def read_config(path: str | os.PathLike | None) -> tuple[Path, dict]:
    """The checkpoint dir (None: v3-nano) and its parsed config.json."""
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
    return d, cfg
