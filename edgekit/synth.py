"""``edgekit synth``: a random-init Hugging Face checkpoint of a named shape, written shard by shard.

What: ``synth(shape, out, seed=0, dtype="fp32")`` writes ``config.json``, the weights
(``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
when they exceed ``shard_bytes``), v3-nano's ``tokenizer.json`` and ``synth.json`` (how it was
made). Matrices are N(0, ``std``) (0.02, the usual init), norm weights 1, biases and the router's
correction bias 0. ``dtype``: fp32, bf16 (routers stay fp32, as ``checkpoint.save`` keeps them) or fp8 (every
``*_proj`` weight e4m3 with 128x128 ``weight_scale_inv`` block scales and a ``quantization_config``,
the rest bf16 / fp32: the layout of DeepSeek's official V3 releases; see ``edgekit.fp8``).

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
from .fp8 import SCALE_SUFFIX, fp8_eligible, quantization_config, quantize
from .lazy import ShardWriter

DTYPES = ("fp32", "bf16", "fp8")


def init_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """The fp32 initial value of one tensor, from (seed, name) alone."""
    if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))  # CPU generators use 32 bits
    return torch.empty(shape).normal_(0.0, std, generator=g)


def random_model(args, seed: int = 0, std: float = 0.02):
    """The in-memory ``Transformer`` of ``args`` (``model.ModelArgs``) with the values ``synth``
    writes for the same seed (speed experiments on a shape, or a cut of one, without a checkpoint)."""
    from .model import Transformer

    m = Transformer(args).eval()
    with torch.no_grad():
        for name, p in m.state_dict().items():
            p.copy_(init_tensor(name, tuple(p.shape), seed, std))
    return m


def _stored(name: str, t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors for one fp32 tensor in the chosen storage dtype."""
    keep_fp32 = ".gate." in name or t.dim() < 2
    if dtype == "fp32" or keep_fp32:
        return {name: t}
    if dtype == "fp8" and fp8_eligible(name, t):
        q, s = quantize(t)
        return {name: q, name + SCALE_SUFFIX: s}
    return {name: t.to(torch.bfloat16)}


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
    out = Path(out)
    with atomic_dir(out) as tmp:
        w = ShardWriter(tmp, shard_bytes, save=save_file)
        for name, shp in tensor_specs(args):
            for k, t in _stored(name, init_tensor(name, shp, seed, std), dtype).items():
                w.add(k, t)
        files = w.close()
        if log:
            log(f"wrote {len(files)} safetensors file(s), {w.total / 1e9:.2f} GB")
        cfg = config_from_args(args)
        cfg["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}[dtype]
        if dtype == "fp8":
            cfg["quantization_config"] = quantization_config()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copy(reference_model_dir() / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "synth.json").write_text(json.dumps({
            "shape": shape, "seed": seed, "dtype": dtype, "init": f"normal(0, {std}); norms 1; biases 0",
            "tokenizer": "v3-nano", "edgekit_version": __version__, "weight_bytes": w.total}, indent=2) + "\n")
    return out
