"""Load test of sample_apps/server on loopback: dynamic batching vs no batching, in one run.

    python benchmarks/load_test.py --bundle DIR [--requests 200 --concurrency 16 --max-batch 16 --cap-s 240]

For each mode (``--max-batch 1`` = no batching, then ``--max-batch N``) it starts the server as a
subprocess on a free port, sends ``--requests`` streaming greedy requests from ``--concurrency``
client threads (stopping new sends after ``--cap-s`` seconds) and records per request the time to
the first streamed piece (TTFT) and to the end. Prompts cycle over a few fixed strings whose token
lengths are fixed (printed), so equal-length requests exist for the batcher to group.
Reports errors (anything but a complete 200 stream), p50/p95 latency and TTFT, request and token
throughput, and the batched/unbatched throughput ratio measured in the same run; writes
benchmarks/results/load_test.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Config:\n    def __init__(self",
           "for i in range(10):\n"]


def start_server(bundle: str, max_batch: int, threads: int | None, wait_ms: float, queue_size: int):
    cmd = [sys.executable, str(ROOT / "sample_apps" / "server" / "app.py"), "--bundle", bundle, "--port", "0",
           "--max-batch", str(max_batch), "--batch-wait-ms", str(wait_ms), "--queue-size", str(queue_size)]
    if threads:
        cmd += ["--threads", str(threads)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if "listening on" not in line:
        p.kill()
        raise SystemExit(f"server did not start: {line}{p.stderr.read()[-2000:]}")
    return p, int(line.split(":")[2].split()[0])


def one_request(port: int, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        ttft, tokens, done = None, 0, False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            if ttft is None and ev["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if "usage" in ev:
                tokens = ev["usage"]["completion_tokens"]
                if ev["choices"][0]["finish_reason"] == "error":
                    return {"error": ev.get("error", "generation error")}
        if not done:
            return {"error": "stream ended without [DONE]"}
        return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft or time.perf_counter() - t0, "tokens": tokens}
    except Exception as e:  # any client-side failure is an error of the run
        return {"error": f"{type(e).__name__}: {e}"}


def run_mode(args, max_batch: int) -> dict:
    proc, port = start_server(args.bundle, max_batch, args.threads, args.batch_wait_ms, args.requests)
    stop_at = time.monotonic() + args.cap_s
    lock, results = threading.Lock(), []

    def client(i: int):
        if time.monotonic() > stop_at:
            return
        r = one_request(port, PROMPTS[i % len(PROMPTS)], args.max_tokens)
        with lock:
            results.append(r)

    try:
        one_request(port, PROMPTS[0], 4)                      # warm-up (not counted)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as ex:
            list(ex.map(client, range(args.requests)))
        wall = time.perf_counter() - t0
        health = json.loads(_get(port, "/health"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ok = [r for r in results if "error" not in r]
    lat = np.array([r["latency_s"] for r in ok]) * 1e3
    ttft = np.array([r["ttft_s"] for r in ok]) * 1e3

    def pct(a, q):
        return round(float(np.percentile(a, q)), 1) if len(a) else None

    return {"max_batch": max_batch, "sent": len(results), "completed": len(ok), "errors": len(results) - len(ok),
            "error_examples": [r["error"] for r in results if "error" in r][:3], "wall_s": round(wall, 2),
            "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95)},
            "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
            "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "mean_rows_per_decode_call": round(health["rows_decoded"] / max(1, health["decode_calls"]), 2),
            "prefill_calls": health["prefill_calls"]}


def _get(port: int, path: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    return c.getresponse().read().decode()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="server intra-op threads (default: min(target, cores))")
    ap.add_argument("--cap-s", type=float, default=240.0, help="per mode: no new requests after this many seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_test"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from edgekit.host import host_facts
    from edgekit.runtime import Engine

    eng = Engine.from_bundle(a.bundle)
    facts = host_facts()
    a.threads = a.threads or min(eng.threads or facts["cores"], facts["cores"])
    lengths = {p: len(eng.encode(p)) for p in PROMPTS}
    del eng
    modes = [run_mode(a, 1), run_mode(a, a.max_batch)]
    base, batched = modes
    res = {"bundle": str(a.bundle), "host": facts, "threads": a.threads, "requests": a.requests,
           "concurrency": a.concurrency, "max_tokens": a.max_tokens, "batch_wait_ms": a.batch_wait_ms,
           "prompt_token_lengths": list(lengths.values()), "modes": modes,
           "batching_throughput_gain": round(batched["tokens_per_s"] / max(base["tokens_per_s"], 1e-9), 2),
           "batching_p95_latency_ratio": round((batched["latency_ms"]["p95"] or 0)
                                               / max(base["latency_ms"]["p95"] or 1, 1e-9), 2)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    rows = ["| max batch | sent | errors | p50 ms | p95 ms | TTFT p50 | TTFT p95 | req/s | tok/s | rows/decode call |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in modes:
        rows.append(f"| {m['max_batch']} | {m['sent']} | {m['errors']} "
                    f"| {m['latency_ms']['p50']} | {m['latency_ms']['p95']} "
                    f"| {m['ttft_ms']['p50']} | {m['ttft_ms']['p95']} | {m['requests_per_s']} | {m['tokens_per_s']} "
                    f"| {m['mean_rows_per_decode_call']} |")
    md = (f"# Load test: sample_apps/server on loopback\n\nBundle `{a.bundle}`; host {facts['cpu_model']}, "
          f"{facts['cores']} cores; server threads {a.threads}; {a.requests} streaming greedy requests, "
          f"{a.concurrency} concurrent, max_tokens {a.max_tokens}; prompts of {sorted(set(lengths.values()))} tokens "
          f"(cycled, so equal lengths arrive together).\n\n" + "\n".join(rows) +
          f"\n\nDynamic batching vs none, same run: **{res['batching_throughput_gain']}x** token throughput, "
          f"p95 latency ratio {res['batching_p95_latency_ratio']}.\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if all(m["errors"] == 0 for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
