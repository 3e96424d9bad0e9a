"""Latency and memory of an exported model or bundle on onnxruntime CPU, measured in a clean process.

What: ``measure(dir, threads, ...)`` starts ``python -m edgekit.latency`` in a subprocess (so the
numbers are not polluted by torch's threads or the build process's memory) and returns
``{"prefill_ms": {"p50", "p95", "mean", "samples"}, "decode_ms": {...}, "peak_rss_mb", ...}``.
Prefill = one ``prefill_tokens`` prompt (batch 1); decode = per generated token after that prompt,
with the latent cache (``OrtModel.decode``). Both after ``warmup`` untimed runs.

``rounds=R`` runs that worker R times, one fresh process after another, and reports each
percentile as the median over rounds of the round's figure (every round's p50/p95 under
``"rounds"``, all samples pooled under ``"samples"``, peak RSS the largest). Why: on a shared host
the same graph's prefill p50 moved from 118 to 190 ms within minutes (16-core Xeon, nothing else of
ours running); one process's p95 then reports the minute it ran in, and a gate on it passes or
fails by luck. The median of three rounds ignores one bad minute and still fails a graph that is
slow in two of them.

No torch: this runs on devices (``edgekit validate``) with only onnxruntime + numpy.
Failure modes: the worker's error (e.g. the graph cannot load) comes back as ``EdgekitError``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from .errors import EdgekitError


def _stats(samples: list[float]) -> dict:
    a = np.asarray(samples)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()), "min": float(a.min()), "samples": [round(float(x), 4) for x in a]}


def peak_rss_mb() -> float:
    """Peak resident memory of this process. Linux: VmHWM (reset by exec; ru_maxrss is not, so a
    worker forked from a large parent would report the parent's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: ``5`` to /proc/self/clear_refs),
    so ``peak_rss_mb`` measures from here on; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_worker(d: str, threads: int, spinning: bool, prefill_tokens: int, decode_tokens: int,
               runs: int, warmup: int, seed: int = 0, parallel: bool = False,
               session_config: dict | None = None) -> dict:
    from .runtime.session import OrtModel

    t0 = time.perf_counter()
    m = OrtModel(d, threads=threads, spinning=spinning, parallel=parallel, session_config=session_config)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, m.vocab_size, (1, prefill_tokens))
    prefill, decode = [], []
    for r in range(warmup + runs):
        t = time.perf_counter()
        logits, cache = m.prefill(ids, capacity=prefill_tokens + decode_tokens)
        dt = (time.perf_counter() - t) * 1e3
        tok = logits.argmax(-1)
        steps = []
        for _ in range(decode_tokens):
            t = time.perf_counter()
            tok = m.decode(tok, cache).argmax(-1)
            steps.append((time.perf_counter() - t) * 1e3)
        if r >= warmup:
            prefill.append(dt)
            decode.extend(steps[1:])  # the first step after prefill also warms the decode shapes
    return {"prefill_ms": _stats(prefill), "decode_ms": _stats(decode), "peak_rss_mb": round(peak_rss_mb(), 1),
            "session_load_s": round(load_s, 3), "threads": threads, "spinning": spinning, "parallel": parallel,
            "session_config": dict(session_config or {}),
            "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens, "runs": runs, "warmup": warmup}


def merge_rounds(rounds: list[dict]) -> dict:
    """One worker result per round -> one result: p50/p95/mean = the median over rounds of each
    round's figure, min the smallest, samples pooled, ``"rounds"`` = each round's p50/p95, peak RSS
    the largest."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[0])
    for key in ("prefill_ms", "decode_ms"):
        per = [r[key] for r in rounds]
        out[key] = {**{s: float(np.median([p[s] for p in per])) for s in ("p50", "p95", "mean")},
                    "min": min(p["min"] for p in per), "samples": [x for p in per for x in p["samples"]],
                    "rounds": [{"p50": round(p["p50"], 4), "p95": round(p["p95"], 4)} for p in per]}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    out["session_load_s"] = round(float(np.median([r["session_load_s"] for r in rounds])), 3)
    out["rounds"] = len(rounds)
    return out


def measure(d, threads: int, spinning: bool = True, prefill_tokens: int = 128, decode_tokens: int = 32,
            runs: int = 20, warmup: int = 3, timeout: float = 900, parallel: bool = False,
            session_config: dict | None = None, rounds: int = 1) -> dict:
    """Latency of ``d`` measured in ``rounds`` fresh worker processes (see the module doc)."""
    if rounds < 1:
        raise EdgekitError(f"latency rounds={rounds}: use 1 or more")
    return merge_rounds([_measure_once(d, threads, spinning, prefill_tokens, decode_tokens, runs, warmup, timeout,
                                       parallel, session_config) for _ in range(rounds)])


def _measure_once(d, threads, spinning, prefill_tokens, decode_tokens, runs, warmup, timeout, parallel,
                  session_config) -> dict:
    cmd = [sys.executable, "-m", "edgekit.latency", str(d), "--threads", str(threads),
           "--spinning", str(int(spinning)), "--prefill-tokens", str(prefill_tokens),
           "--decode-tokens", str(decode_tokens), "--runs", str(runs), "--warmup", str(warmup)]
    cmd += ["--parallel"] if parallel else []
    for k, v in (session_config or {}).items():
        cmd += ["--session-config", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgekitError(f"latency measurement of {d} failed: {last}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Measure prefill/decode latency of an edgekit export or bundle.")
    ap.add_argument("dir")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--spinning", type=int, default=1)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--parallel", action="store_true", help="onnxruntime's parallel executor (inter-op threads)")
    ap.add_argument("--session-config", action="append", default=[], metavar="KEY=VALUE",
                    help="an onnxruntime session config entry, e.g. session.dynamic_block_base=4 (repeatable)")
    a = ap.parse_args(argv)
    bad = [kv for kv in a.session_config if "=" not in kv]
    if bad:
        ap.error(f"--session-config {bad[0]!r}: use KEY=VALUE, e.g. session.dynamic_block_base=4")
    res = run_worker(a.dir, a.threads, bool(a.spinning), a.prefill_tokens, a.decode_tokens, a.runs, a.warmup,
                     parallel=a.parallel, session_config=dict(kv.split("=", 1) for kv in a.session_config))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
