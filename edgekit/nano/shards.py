"""Split a ``model.safetensors`` into Hugging Face-style shards, and merge shards back.

Why: the device tool returns files of at most 16 MiB, and v3-nano's fp16 weights are ~17.6 MB, so
the training run writes ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
(which ``edgekit.checkpoint.load`` reads); the shipped copy is merged back into one file so every
consumer finds a plain ``model.safetensors``.

Invariants: tensors, dtypes and names are unchanged; shards hold whole tensors in sorted-name order;
the index's ``total_size`` is the sum of tensor bytes. Both operations replace files only after the
new ones are written.

Failure modes: ``FileNotFoundError`` when the input file/index is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _read(files: list[Path]) -> dict:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _groups(sd: dict, max_bytes: int) -> list[list[str]]:
    groups, cur, size = [], [], 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    return groups + ([cur] if cur else [])


def shard(d: Path, max_bytes: int) -> list[Path]:
    """Replace ``d/model.safetensors`` by shards of at most ``max_bytes`` (plus the index)."""
    d = Path(d)
    sd = _read([d / SINGLE])
    groups = _groups(sd, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, keys in zip(names, groups):
        save_file({k: sd[k] for k in keys}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    (d / SINGLE).unlink()
    return [d / n for n in names]


def merge(d: Path) -> Path:
    """Replace the shards named in ``d/model.safetensors.index.json`` by one ``model.safetensors``."""
    d = Path(d)
    names = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
    sd = _read([d / n for n in names])
    save_file(sd, str(d / SINGLE), metadata={"format": "pt"})
    for n in names:
        (d / n).unlink()
    (d / INDEX).unlink()
    return d / SINGLE
