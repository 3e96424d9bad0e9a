"""``edgekit synth``: a random-init Hugging Face checkpoint of a named shape, written shard by shard.

What: ``synth(shape, out, seed=0, dtype="fp32")`` writes ``config.json``, the weights
(``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
when they exceed ``shard_bytes``), v3-nano's ``tokenizer.json`` and ``synth.json`` (how it was
made). Matrices are N(0, ``std``) (0.02, the usual init), norm weights 1, biases and the router's
correction bias 0. ``dtype``: fp32 or bf16 (routers stay fp32, as ``checkpoint.save`` keeps them).

Why shard by shard: a 6.4 GB checkpoint (``v3-1.6b``) must be writable on a machine with less
free memory than that; at most one shard's tensors are held at a time.

Invariants: each tensor's values depend only on (seed, tensor name, shape), not on sharding or
order, so the same seed gives the same model in any dtype/shard layout (up to rounding). The
output directory appears only when complete (``edgekit.atomic``). It loads with ``edgekit.load``
and with transformers' ``DeepseekV3ForCausalLM`` (fp32/bf16).

Failure modes: unknown shape or dtype, ``shard_bytes`` < 1 -> ``EdgekitError``.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_dir
from .errors import EdgekitError

DTYPES = ("fp32", "bf16")
INDEX_FILE = "model.safetensors.index.json"


def init_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """The fp32 initial value of one tensor, from (seed, name) alone."""
    if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))  # CPU generators use 32 bits
    return torch.empty(shape).normal_(0.0, std, generator=g)


def _stored(name: str, t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors for one fp32 tensor in the chosen storage dtype."""
    keep_fp32 = ".gate." in name or t.dim() < 2
    if dtype == "fp32" or keep_fp32:
        return {name: t}
    return {name: t.to(torch.bfloat16)}


def _nbytes(shape, dtype: str, name: str) -> int:
    n = 1
    for d in shape:
        n *= d
    per = {"fp32": 4, "bf16": 2}[dtype]
    return n * (4 if len(shape) < 2 or ".gate." in name else per)


def synth(shape: str, out: str | os.PathLike, seed: int = 0, dtype: str = "fp32", std: float = 0.02,
          shard_bytes: int = 1 << 30, log=None) -> Path:
    """Write a random-init checkpoint of ``shape`` to ``out`` (replaced when complete)."""
    from . import __version__
    from .checkpoint import config_from_args, reference_model_dir
    from .shapes import shape_args, tensor_specs

    if dtype not in DTYPES:
        raise EdgekitError(f"synth dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if shard_bytes < 1:
        raise EdgekitError(f"synth shard size {shard_bytes} bytes: use a positive size")
    args = shape_args(shape)
    specs = tensor_specs(args)
    shards, cur, size = [], [], 0
    for name, shp in specs:
        b = _nbytes(shp, dtype, name)
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += b
    shards.append(cur)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    out = Path(out)
    with atomic_dir(out) as tmp:
        weight_map, total = {}, 0
        for fname, shard in zip(files, shards):
            tensors = {}
            for name, shp in shard:
                tensors.update(_stored(name, init_tensor(name, shp, seed, std), dtype))
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            for k, t in tensors.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
            del tensors
            if log:
                log(f"wrote {fname}")
        if n > 1:
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        cfg = config_from_args(args)
        cfg["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copy(reference_model_dir() / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "synth.json").write_text(json.dumps({
            "shape": shape, "seed": seed, "dtype": dtype, "init": f"normal(0, {std}); norms 1; biases 0",
            "tokenizer": "v3-nano", "edgekit_version": __version__, "weight_bytes": total}, indent=2) + "\n")
    return out
