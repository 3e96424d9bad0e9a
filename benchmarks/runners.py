"""Runners: one small class per runtime, each implementing ``measure.Runner`` for the worker.

What: ``TorchRunner`` (eager fp32, or ``torch.ao.quantization.quantize_dynamic`` int8 on nn.Linear,
latent KV cache via ``forward_cached``), ``OrtEdgekitRunner`` (any graph with the export.json I/O
of ``edgekit.export``: the baselines' plain export, their quantized copies and edgekit bundles,
through ``edgekit.runtime.session.OrtModel``). llama.cpp is timed by its own ``llama-bench``
(benchmarks/llamacpp.py), not through this interface.

Why: the latency loops in measure.py time any runtime the same way.

Invariants: imports happen inside constructors so an ORT worker never imports torch (RSS).
Each runner uses exactly ``threads`` intra-op threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchRunner:

    def __init__(self, ckpt: Path, threads: int, int8: bool = False):
        import torch

        from edgekit import checkpoint

        torch.set_num_threads(threads)
        self.torch = torch
        model = checkpoint.load(ckpt)
        if int8:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.eval()

    def size_mb(self) -> float:
        import io
        buf = io.BytesIO()
        self.torch.save(self.model.state_dict(), buf)
        return buf.tell() / 1e6

    def prefill(self, ids):
        with self.torch.inference_mode():
            self.model.forward_cached(self.torch.from_numpy(ids))

    def start(self, ids):
        with self.torch.inference_mode():
            _, kv, pe = self.model.forward_cached(self.torch.from_numpy(ids))
        return kv, pe

    def step(self, state, tok):
        with self.torch.inference_mode():
            _, kv, pe = self.model.forward_cached(self.torch.tensor([[tok]]), *state)
        return kv, pe

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(ids)).float().numpy()


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def make_runner(variant: str, artifact: Path, threads: int):
    """variant kind -> Runner (llama.cpp is measured by llama-bench: benchmarks/llamacpp.py)."""
    if variant == "torch-fp32":
        return TorchRunner(artifact, threads)
    if variant == "torch-int8":
        return TorchRunner(artifact, threads, int8=True)
    if variant.startswith(("ort-", "nncf-", "edgekit-")):
        return OrtEdgekitRunner(artifact, threads)
    raise ValueError(f"unknown variant {variant!r}")


class OrtEdgekitRunner:
    """An edgekit export or bundle (one graph with the MLA latent cache) through
    ``edgekit.runtime.session.OrtModel``: IO binding into preallocated cache buffers; a bundle runs
    with its target's onnxruntime session config entries, as ``edgekit.runtime.Engine`` runs it."""


    def __init__(self, d: Path, threads: int):
        from edgekit.bundle import read_target
        from edgekit.runtime.session import OrtModel

        self.m = OrtModel(d, threads=threads, session_config=read_target(d).get("session_config", {}))

    def logits(self, ids):
        return self.m.logits(ids)

    def prefill(self, ids):
        self.m.prefill(ids)

    def start(self, ids):
        return self.m.prefill(ids)[1]

    def step(self, cache, tok):
        self.m.decode(np.array([tok], dtype=np.int64), cache)
        return cache
