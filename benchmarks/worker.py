"""Measure ONE variant in its own process, so peak RSS is that variant's alone.

Run by benchmarks/run.py as ``python -m benchmarks.worker SPEC.json OUT.json`` (cwd = repo root).
SPEC keys: variant, artifact, threads, prompt (path to .npy 1-D ids, >= max ctx + decode tokens),
prefill_tokens, prefill_warmup, prefill_reps, decode_ctx (list), decode_tokens, eval (path to .npy
ids or null), eval_windows (int or null = all), seq_len.

Order: load -> prefill loop -> decode loops -> peak RSS snapshot -> accuracy (batch 1) -> size.
RSS is read before the accuracy pass so it reflects serving, not [B, 512, V] scoring logits.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks import measure
from benchmarks.runners import make_runner


def run(spec: dict) -> dict:
    out: dict = {}
    t0 = time.perf_counter()
    runner = make_runner(spec["variant"], Path(spec["artifact"]), spec["threads"])
    out["load_s"] = round(time.perf_counter() - t0, 3)
    prompt = np.load(spec["prompt"]).astype(np.int64)

    ids = prompt[None, : spec["prefill_tokens"]]
    ms = measure.time_prefill(runner, ids, spec["prefill_warmup"], spec["prefill_reps"])
    out["prefill_p50_ms"] = measure.percentile(ms, 50)
    out["prefill_p95_ms"] = measure.percentile(ms, 95)

    n = spec["decode_tokens"]
    for ctx in spec["decode_ctx"]:
        follow = [int(t) for t in prompt[ctx: ctx + n]]
        ms = measure.time_decode(runner, prompt[None, :ctx], follow)
        out[f"decode_ms_ctx{ctx}"] = measure.percentile(ms, 50)
    out["peak_rss_mb"] = measure.peak_rss_mb()

    out["accuracy"] = None
    if spec.get("eval"):
        out.update(accuracy(runner, np.load(spec["eval"]).astype(np.int64), spec["seq_len"], spec.get("eval_windows")))
    if hasattr(runner, "size_mb"):
        out["size_mb"] = runner.size_mb()
    return out


def accuracy(runner, toks: np.ndarray, seq_len: int, k: int | None) -> dict:
    """Top-1 next-token accuracy over all windows, or ``k`` evenly spaced ones (a fixed subset)."""
    from edgekit.data import windows
    from edgekit.evaluate import evaluate

    rows = windows(toks, seq_len)
    if k and k < len(rows):
        rows = rows[np.linspace(0, len(rows) - 1, k).round().astype(int)]
    correct = n = 0
    for row in rows:  # batch 1: the runtime's serving shape
        res = evaluate(runner, row, seq_len=seq_len, batch_size=1, progress=False)
        correct += res.accuracy * res.tokens
        n += res.tokens
    return {"accuracy": correct / n, "accuracy_tokens": n, "eval_windows": len(rows)}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        res = run(spec)
    except Exception as e:  # recorded in the row; the run goes on with the other variants
        res = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "traceback": traceback.format_exc()}
    Path(argv[1]).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
