"""Batch-1 decode latency of two exports of the same model, interleaved in one process.

    python benchmarks/decode_ab.py BEFORE_DIR AFTER_DIR [--threads 1 --rounds 9 --steps 32 --ctx 128 1024]
        [--prefill 128] [--clock cpu] [--config-after session.dynamic_block_base=4] [--spinning]

What: for each context length, each round prefills the same random prompt in both exports (order
alternating per round) and times ``--steps`` single-token ``OrtModel.decode`` calls; a round's
figure is the median ms/token, and the result is the median over rounds plus the after/before
ratio; ``--prefill N`` also times N-token prefills the same way (``--steps`` calls per round).
Also prints the graphs' node counts. Used to show that a graph change (e.g. the
``left_pad`` input) does not slow decode: run it on the export before and after the change.
``--config-before/--config-after KEY=VALUE,...`` give a side onnxruntime session config entries;
with the same directory twice that A/Bs a session setting on one bundle.

Why interleaved rounds: on a shared machine, load drifts over minutes; alternating the two
exports inside every round lets the drift hit both alike (the spread across rounds is printed).
``--clock cpu`` times the process's CPU time (``time.process_time``) instead of wall time: with
``--threads 1`` onnxruntime runs every node on the calling thread, so this is the compute cost of
a call, and it stays stable when other processes take the cores (wall time then measures the
scheduler).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def decode_ms(om, ctx: int, steps: int, seed: int = 0, clock=time.perf_counter) -> float:
    ids = np.random.default_rng(seed).integers(0, om.vocab_size, (1, ctx))
    _, cache = om.prefill(ids, capacity=ctx + steps)
    tok, times = np.array([1]), []
    for _ in range(steps):
        t = clock()
        tok = om.decode(tok, cache).argmax(-1)
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def prefill_ms(om, tokens: int, runs: int, seed: int = 0, clock=time.perf_counter) -> float:
    ids = np.random.default_rng(seed).integers(0, om.vocab_size, (1, tokens))
    times = []
    for _ in range(runs):
        t = clock()
        om.prefill(ids)
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ctx", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--prefill", type=int, default=0, help="also time prefills of this many tokens")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or the process's CPU time (stable on a loaded machine; use --threads 1)")
    ap.add_argument("--config-before", default="", metavar="KEY=VALUE,...",
                    help="onnxruntime session config entries for the before side")
    ap.add_argument("--config-after", default="", metavar="KEY=VALUE,...",
                    help="the same for the after side (e.g. session.dynamic_block_base=4; the same directory "
                         "twice then A/Bs that setting)")
    ap.add_argument("--spinning", action="store_true", help="intra-op thread spinning (as cpu4 bundles run)")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    configs = {}
    for side in ("before", "after"):
        text = getattr(a, f"config_{side}")
        bad = [kv for kv in text.split(",") if kv and "=" not in kv]
        if bad:
            ap.error(f"--config-{side}: {bad[0]!r} is not KEY=VALUE (e.g. session.dynamic_block_base=4)")
        configs[side] = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    sys.path.insert(0, str(ROOT))
    import onnx

    from edgekit.runtime import OrtModel

    models = {k: OrtModel(d, threads=a.threads, spinning=a.spinning, session_config=configs[k])
              for k, d in (("before", a.before), ("after", a.after))}
    nodes = {k: len(onnx.load(str(Path(d) / "model.onnx"), load_external_data=False).graph.node)
             for k, d in (("before", a.before), ("after", a.after))}
    clock = CLOCKS[a.clock]
    import onnxruntime

    res = {"before": Path(a.before).name, "after": Path(a.after).name, "onnxruntime": onnxruntime.__version__,
           "threads": a.threads, "rounds": a.rounds, "steps": a.steps, "clock": a.clock, "nodes": nodes,
           "session_config": configs, "spinning": a.spinning, "ctx": {}}
    for ctx in a.ctx:
        for om in models.values():                       # warm-up
            decode_ms(om, ctx, 4, clock=clock)
        got = {k: [] for k in models}
        for r in range(a.rounds):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                got[k].append(decode_ms(models[k], ctx, a.steps, clock=clock))
        med = {k: statistics.median(v) for k, v in got.items()}
        res["ctx"][ctx] = {"ms_per_token": {k: round(v, 4) for k, v in med.items()},
                           "rounds_ms": {k: [round(x, 4) for x in v] for k, v in got.items()},
                           "after_over_before": round(med["after"] / med["before"], 3)}
        print(f"ctx {ctx}: before {med['before']:.3f} ms/token, after {med['after']:.3f} ms/token, "
              f"ratio {med['after'] / med['before']:.3f} (rounds before {min(got['before']):.3f}-"
              f"{max(got['before']):.3f}, after {min(got['after']):.3f}-{max(got['after']):.3f})", flush=True)
    if a.prefill:
        for om in models.values():
            prefill_ms(om, a.prefill, 2, clock=clock)
        got = {k: [] for k in models}
        for r in range(a.rounds):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                got[k].append(prefill_ms(models[k], a.prefill, a.steps, clock=clock))
        med = {k: statistics.median(v) for k, v in got.items()}
        res["prefill"] = {"tokens": a.prefill, "ms": {k: round(v, 3) for k, v in med.items()},
                          "rounds_ms": {k: [round(x, 3) for x in v] for k, v in got.items()},
                          "after_over_before": round(med["after"] / med["before"], 3)}
        print(f"prefill {a.prefill}: before {med['before']:.2f} ms, after {med['after']:.2f} ms, "
              f"ratio {med['after'] / med['before']:.3f} (rounds before {min(got['before']):.2f}-"
              f"{max(got['before']):.2f}, after {min(got['after']):.2f}-{max(got['after']):.2f})", flush=True)
    print(f"nodes: before {nodes['before']}, after {nodes['after']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
