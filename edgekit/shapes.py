"""Named V3 model shapes (``v3-nano``, ``v3-50m``, ``v3-400m``, ``v3-1.6b``) as data.

What: the shapes live in ``edgekit/data/shapes.toml`` (config.json keys per name). ``shape_names()``
lists them, ``shape_config(name)`` is the config.json dict of one, ``shape_args(name)`` its
``ModelArgs``, ``meta_model(args)`` a ``Transformer`` on torch's meta device (every parameter's
name and shape, no memory), and ``tensor_specs(args)`` the (name, shape) of every tensor a
checkpoint of that config holds, in Hugging Face's order.

Why data: the scale runs (benchmarks, device runs, ``edgekit synth``) must use the same shapes,
and adding one is a TOML table, not code.

Invariants: a shape's config round-trips through ``args_from_config``; ``tensor_specs`` equals the
keys and shapes of ``Transformer(args).state_dict()`` (tied ``lm_head`` left out).

Failure modes: an unknown name raises ``EdgekitError`` listing the known ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import EdgekitError

SHAPES_FILE = Path(__file__).parent / "data" / "shapes.toml"


def _table() -> dict[str, dict]:
    return tomllib.loads(SHAPES_FILE.read_text())


def shape_names() -> list[str]:
    return list(_table())


def is_shape(name) -> bool:
    return isinstance(name, str) and name in _table()


def shape_config(name: str) -> dict:
    """config.json dict (``model_type`` deepseek_v3) of the named shape."""
    table = _table()
    if name not in table:
        raise EdgekitError(f"unknown model shape {name!r}; choose one of {', '.join(table)}")
    cfg = {k: v for k, v in table[name].items() if k != "note"}
    return {"model_type": "deepseek_v3", **cfg}


def shape_args(name: str):
    from .hfconfig import args_from_config

    return args_from_config(shape_config(name))


def meta_model(args):
    """``Transformer(args)`` on the meta device: names, shapes and module structure, no storage."""
    import torch

    from .model import Transformer

    with torch.device("meta"):
        return Transformer(args)


def tensor_specs(args) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every checkpoint tensor, embeddings first, layers in order, head last."""
    sd = meta_model(args).state_dict()
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return [(k, tuple(v.shape)) for k, v in sd.items()]
