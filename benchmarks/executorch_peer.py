"""ExecuTorch peer: v3-nano through ExecuTorch's XNNPACK backend with 8-bit dynamic activations /
8-bit per-channel weights (the CPU recipe of ExecuTorch's XNNPACK docs), measured like the rest of
benchmarks/: .pte size, prefill-128, decode, next-token accuracy. Every stage that fails is recorded
with its error instead of a number.

Needs its own environment (ExecuTorch pins its own torch/torchao; not a dependency of edgekit):

    python3 -m venv /tmp/et && /tmp/et/bin/pip install executorch torch transformers
    PYTHONPATH=. /tmp/et/bin/python benchmarks/executorch_peer.py [--threads 1] \
        [--out benchmarks/results/executorch_v3-nano.json]

Model: edgekit's own v3-nano (``edgekit.checkpoint.load``: the DeepSeek-V3 architecture, fp32), one
``forward(input_ids) -> logits`` graph (no KV cache: ExecuTorch's LLM export path for a KV-cache model
is per-architecture code that has no DeepSeek-V3/MLA entry), so "decode" is one forward over the
last ``--ctx`` tokens per new token.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _err(e: BaseException) -> str:
    """The error and the innermost frames where it was raised (what failed, and where)."""
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return ("".join(traceback.format_exception_only(type(e), e)).strip() + f" [at {where}]")[:2000]


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/executorch_v3-nano.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res: dict = {"threads": a.threads, "host": {"machine": platform.machine(), "python": platform.python_version(),
                                                  "torch": torch.__version__}}
    try:
        import executorch
        res["host"]["executorch"] = getattr(executorch, "__version__", None) or _dist_version("executorch")
    except ImportError as e:
        res["error"] = {"stage": "import executorch", "error": _err(e)}
        return _write(a.out, res)

    from edgekit.checkpoint import load, load_tokenizer
    from edgekit.data import load_tokens

    model = load(None).eval()
    tok = load_tokenizer(None)
    ids = torch.from_numpy(np.asarray(load_tokens("eval", tok, a.eval_tokens + 1), np.int64))

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    wrapped = Logits(model).eval()
    example = (ids[None, : a.ctx],)
    stages = res["stages"] = {}
    t0 = time.perf_counter()
    try:
        from torch.export import Dim, export
        seq = Dim("seq", min=1, max=model.args.max_position_embeddings)
        ep = export(wrapped, example, dynamic_shapes=({1: seq},), strict=False)
        stages["torch.export (dynamic seq)"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # the failure is the finding
        stages["torch.export (dynamic seq)"] = {"ok": False, "error": _err(e)}
        try:
            t0 = time.perf_counter()
            ep = export(wrapped, example, strict=False)
            stages["torch.export (static seq)"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e2:
            stages["torch.export (static seq)"] = {"ok": False, "error": _err(e2)}
            return _write(a.out, res)
    try:
        t0 = time.perf_counter()
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
        gm = prepare_pt2e(ep.module(), q)
        gm(*example)
        gm = convert_pt2e(gm)
        ep8 = export(gm, example, strict=False)
        prog = to_edge_transform_and_lower(ep8, partitioner=[XnnpackPartitioner()]).to_executorch()
        pte = prog.buffer
        stages["8da8w quantize + XNNPACK lower"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1),
                                                    "pte_bytes": len(pte)}
        res["size_mb"] = len(pte) / 1e6
    except Exception as e:
        stages["8da8w quantize + XNNPACK lower"] = {"ok": False, "error": _err(e)}
        try:   # ExecuTorch's LLM path instead: torchao 8-bit dynamic activation / 8-bit weight, then export
            t0 = time.perf_counter()
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            quantize_(wrapped, Int8DynamicActivationInt8WeightConfig())
            ep8 = export(wrapped, example, strict=False)
            pte = to_edge_transform_and_lower(ep8, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
            stages["torchao 8da8w + export + XNNPACK lower"] = {"ok": True, "pte_bytes": len(pte),
                                                                "seconds": round(time.perf_counter() - t0, 1)}
            res["size_mb"] = len(pte) / 1e6
        except Exception as e2:
            stages["torchao 8da8w + export + XNNPACK lower"] = {"ok": False, "error": _err(e2)}
            return _write(a.out, res)
    try:
        from executorch.runtime import Runtime
        method = Runtime.get().load_program(pte).load_method("forward")
        run = lambda x: method.execute([x])[0]  # noqa: E731
        x = ids[None, : a.ctx]
        for _ in range(2):
            run(x)
        ts = []
        for _ in range(a.runs):
            t = time.perf_counter()
            run(x)
            ts.append((time.perf_counter() - t) * 1e3)
        res["prefill_128_ms"] = {"p50": float(np.percentile(ts, 50)), "p95": float(np.percentile(ts, 95))}
        res["decode_ms_per_token_recompute"] = res["prefill_128_ms"]
        correct = n = 0
        for i in range(0, len(ids) - 1 - a.ctx + 1, a.ctx):
            w = ids[i: i + a.ctx + 1]
            p = run(w[None, :-1]).argmax(-1)[0]
            correct += int((p == w[1:]).sum())
            n += a.ctx
        res["accuracy"] = correct / max(n, 1)
        res["accuracy_tokens"] = n
        stages["run (executorch.runtime)"] = {"ok": True}
    except Exception as e:
        stages["run (executorch.runtime)"] = {"ok": False, "error": _err(e)}
    return _write(a.out, res)


def _dist_version(name: str):
    from importlib.metadata import version
    return version(name)


def _write(out: str, res: dict):
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
