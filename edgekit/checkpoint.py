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
a config.json that is not an object or has mistyped values, unknown ``model_type``, missing
tensors, shape mismatches (checked from the safetensors headers before anything is allocated,
``edgekit.configcheck``), weights with more layers than the config, shard names leaving the
directory, fp8 scales of the wrong shape, NaN/Inf weights, a corrupt tokenizer.json.
Multi-token-prediction layers (their own tensors, or ``num_nextn_predict_layers``) are skipped with
a note on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_dir
from .hfconfig import (  # noqa: F401 (re-exported: checkpoint is the public face of config I/O)
    SUPPORTED_TYPES,
    args_from_config,
    config_from_args,
    read_config,
    reference_model_dir,
    resolve,
)
from .model import Transformer, rope_tables


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
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
