"""Open anything edgekit can score: a checkpoint, an exported ONNX directory or a bundle.

What: ``open_model(path) -> (scorer, tokenizer, kind)`` where ``scorer`` is a torch ``Transformer``
(kind ``"checkpoint"``) or an onnxruntime runner with ``.logits(ids)`` (kinds ``"onnx"`` and
``"bundle"``), so ``edgekit eval`` scores every stage of the pipeline on the same data.

How a directory is recognised: ``manifest.json`` -> bundle, ``export.json`` -> ONNX export,
``config.json`` -> checkpoint. Anything else is an ``EdgekitError`` that says what was expected.
"""

from __future__ import annotations

import os

from .checkpoint import load, load_tokenizer, resolve
from .errors import EdgekitError


def kind_of(path: str | os.PathLike | None) -> str:
    d = resolve(path)
    if not d.is_dir():
        raise EdgekitError(f"{d} is not a directory; pass a checkpoint, an `edgekit export` dir or a bundle")
    if (d / "manifest.json").exists():
        return "bundle"
    if (d / "export.json").exists():
        return "onnx"
    if (d / "config.json").exists():
        return "checkpoint"
    raise EdgekitError(f"{d} has no config.json, export.json or manifest.json; "
                       "pass a Hugging Face checkpoint, an `edgekit export` dir or a bundle")


def open_model(path: str | os.PathLike | None, threads: int | None = None):
    kind = kind_of(path)
    d = resolve(path)
    if kind == "checkpoint":
        return load(d), load_tokenizer(d), kind
    from .runtime.session import OrtModel

    if kind == "bundle":
        from .bundle import verify

        verify(d)
    return OrtModel(d, threads=threads), load_tokenizer(d), kind
