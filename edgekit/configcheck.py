"""Checks of a checkpoint's config.json against its own weights, before anything is allocated.

What: ``check_types(kw)`` rejects config values of the wrong JSON type (``"hidden_size": "256"``,
``true`` for a count, NaN for a float) and negative or zero sizes; ``precheck(d, args, cfg, files)``
builds the model on torch's ``meta`` device (shapes only, no memory), reads tensor shapes from the
safetensors headers (no data) and compares them, so a config whose sizes disagree with the
weights (``intermediate_size`` of 4e8 against 640-wide tensors) fails in milliseconds instead of
allocating hundreds of GB. It also decides which tensors beyond ``num_hidden_layers`` are
multi-token-prediction layers: only layers that carry MTP's own tensors (``eh_proj``, ``enorm``,
``hnorm``) or fall within ``num_nextn_predict_layers``; any other extra layer means config.json has
fewer layers than the weights, which is an error, never a silently smaller model. Tables the
model computes rather than loads (RoPE cos/sin, sized by ``max_position_embeddings``) must fit in
memory.

Invariants: nothing here reads tensor data or allocates a parameter; every failure is an
``EdgekitError`` with one line naming the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from .errors import EdgekitError

# sizes that must be >= 1 (others may be 0: first_k_dense_replace, n_shared_experts, ...)
POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
            "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "num_experts_per_tok",
            "moe_intermediate_size", "moe_layer_freq")
MTP_TENSORS = ("eh_proj", "enorm", "hnorm", "shared_head")
_PY = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}


def check_types(kw: dict) -> None:
    """Each ModelArgs field in ``kw`` has its declared JSON type and a usable value."""
    from .model import ModelArgs

    for f in dataclasses.fields(ModelArgs):
        if f.name not in kw:
            continue
        v, allowed = kw[f.name], str(f.type).replace(" ", "").split("|")
        if v is None and "None" in allowed:
            continue
        ok = any(a in _PY and isinstance(v, _PY[a]) and not (a != "bool" and isinstance(v, bool)) for a in allowed)
        if not ok:
            raise EdgekitError(f"config.json {f.name}={v!r} has the wrong type (expected {f.type}); fix config.json")
        if isinstance(v, float) and not math.isfinite(v):
            raise EdgekitError(f"config.json {f.name}={v!r} is not a finite number; fix config.json")
        if isinstance(v, int) and not isinstance(v, bool) and (v < 0 or (f.name in POSITIVE and v < 1)):
            raise EdgekitError(f"config.json {f.name}={v} must be {'>= 1' if f.name in POSITIVE else '>= 0'}; "
                               "fix config.json")


def header_shapes(files: list[Path]) -> dict[str, tuple]:
    """Tensor name -> shape from safetensors headers (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = tuple(st.get_slice(k).get_shape())
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EdgekitError(f"{f} is corrupt or truncated ({msg}); re-download or re-save it") from None
    return out


def _unfused(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """transformers' fused expert tensors -> per-expert shapes (as checkpoint._unfuse_experts does)."""
    out = dict(shapes)
    for k in [k for k in shapes if k.endswith("mlp.experts.gate_up_proj")]:
        pre = k[: -len("gate_up_proj")]
        gu, down = out.pop(k), out.pop(pre + "down_proj", None)
        if len(gu) != 3 or down is None or len(down) != 3:
            raise EdgekitError(f"{k} has shape {gu}; expected fused experts [E, 2I, D] with a down_proj [E, D, I]")
        for e in range(gu[0]):
            out[f"{pre}{e}.gate_proj.weight"] = out[f"{pre}{e}.up_proj.weight"] = (gu[1] // 2, gu[2])
            out[f"{pre}{e}.down_proj.weight"] = tuple(down[1:])
    return out


def _layer(k: str) -> int | None:
    parts = k.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def precheck(d: Path, args, cfg: dict, files: list[Path]) -> set[str]:
    """Compare config-implied shapes with the weights' headers; returns the MTP tensor names to skip."""
    return check_shapes(d, args, cfg, header_shapes(files))


def check_shapes(d: Path, args, cfg: dict, header: dict[str, tuple]) -> set[str]:
    """``precheck`` on shapes already read from the headers (``edgekit.lazy.CheckpointReader``)."""
    import torch

    from .model import Transformer

    try:
        with torch.device("meta"):
            meta = Transformer(args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise EdgekitError(f"config.json is invalid: {str(e).splitlines()[0][:200]}") from None
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    shapes = _unfused(header)
    n = args.num_hidden_layers
    nextn = cfg.get("num_nextn_predict_layers") or 0
    nextn = nextn if isinstance(nextn, int) and not isinstance(nextn, bool) else 0
    mtp_layers = {i for i in (_layer(k) for k in shapes) if i is not None and i >= n}
    mtp_layers = {i for i in mtp_layers if i < n + nextn or any(
        f"model.layers.{i}.{t}" in k for k in shapes for t in MTP_TENSORS)}
    extra = {i for i in (_layer(k) for k in shapes) if i is not None and i >= n} - mtp_layers
    if extra:
        top = max(extra)
        raise EdgekitError(f"{d}: the weights have layers up to {top} but config.json has num_hidden_layers={n}; "
                           f"set num_hidden_layers={top + 1} (layers beyond it count as multi-token prediction only "
                           "with num_nextn_predict_layers or MTP tensors)")
    for k, shape in shapes.items():
        if k in expected and shape != expected[k]:
            raise EdgekitError(f"{d}: {k} has shape {shape} but config.json implies {expected[k]}; "
                               "fix config.json or use matching weights")
    # tables not stored in the checkpoint (RoPE cos/sin: max_position_embeddings x rope dims); the weights
    # themselves were just checked against the files
    need = sum(v.numel() * v.element_size() for v in meta.buffers())
    ram = _ram_bytes()
    if ram and need > ram:
        raise EdgekitError(f"config.json implies {need / 1e9:.1f} GB of position tables, more than this machine's "
                           f"{ram / 1e9:.1f} GB of memory; check max_position_embeddings in config.json")
    return {k for k in shapes if _layer(k) in mtp_layers}


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
