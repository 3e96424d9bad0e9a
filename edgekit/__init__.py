"""edgekit: compress DeepSeek-V3-family models for 4-core CPUs, phones and browsers.

Public API (lazy: importing edgekit does not import torch; ``edgekit.runtime`` never needs it):
``load``, ``save``, ``evaluate``, ``prune_``, ``quantize_``, ``compress``, ``get_version_info``;
the exporter is ``edgekit.export.export(model, dir)`` (``edgekit.export`` is its package).

The device side -- ``edgekit.runtime``, ``latency``, ``host``, ``bundle``, ``report``,
``report_text``, ``recipes`` (target/goals; stage tables stay data), ``validate``, ``evaluate``,
``data``, ``devices`` and the ``edgekit validate`` command -- never imports torch
(tests/test_device_side.py runs it with torch blocked).
"""

from importlib import import_module

__version__ = "0.1.0"

# Eager (numpy only): the submodule shares the function's name, and a lazy lookup would be
# shadowed by the submodule once anything imports ``edgekit.evaluate``.
from .evaluate import evaluate  # noqa: E402

_API = {
    "load": ".checkpoint", "save": ".checkpoint", "load_tokenizer": ".checkpoint",
    "ModelArgs": ".model", "Transformer": ".model",
    "EdgekitError": ".errors",
    "prune_": ".prune", "quantize_": ".quantize",
    "compress": ".pipeline", "get_version_info": ".bundle",
}


def __getattr__(name):
    if name in _API:
        value = getattr(import_module(_API[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")


__all__ = sorted(_API) + ["__version__", "evaluate"]
