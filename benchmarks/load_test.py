"""Load test of sample_apps/server on loopback, side by side with llama.cpp's ``llama-server``.

    python benchmarks/load_test.py --bundle DIR [--llama-checkpoint CKPT | --gguf FILE [--llama-server BIN]]
        [--threads 2] [--requests 200 --concurrency 16 --max-batch 16 --max-tokens 64 --cap-s 300] [--out PREFIX]

The committed comparison (v3-nano, servers pinned to two cores of an otherwise idle host; compress
exits 1 on v3-nano's relative accuracy gate, the bundle is written all the same):

    EDGEKIT_CACHE=lt-cache edgekit compress --target cpu4-serve -o lt-bundle; python benchmarks/load_test.py
    --bundle lt-bundle --llama-checkpoint lt-cache/prune/*/ --threads 2 --cpus 2,3
    --machine "HOST, servers pinned to 2 cores" --out benchmarks/results/load_test

Modes, one after another, each server a subprocess on a free loopback port (127.0.0.1 only):
- ``edgekit-1``: sample_apps/server with ``--max-batch 1`` (one request at a time: no batching; one
  session on all ``--threads``);
- ``edgekit``: the same server with continuous batching (``--max-batch N --workers W``: W lanes, each
  a one-session worker on threads / W threads with its share of the N rows; default one per thread);
- ``llama-server`` (with ``--gguf``, or ``--llama-checkpoint`` converted to Q8_0 by llama.cpp's own
  converter): llama.cpp built from its pinned source (benchmarks/llamacpp.py, once; ``--llama-server``
  names another binary), ``benchmarks.llamacpp.server_command``: loopback only, ``-t T -tb T
  --parallel <concurrency> -cb``, a context of ``--ctx-per-slot`` tokens per slot, no web UI; it is
  sent the same requests on its OpenAI-compatible streaming ``/v1/completions``. When it exits at
  start with the weight-repacking abort llama-bench also hits on some models
  (``benchmarks.llamacpp.REPACK_ABORT``), it is started again with ``--no-repack`` and the result's
  ``note`` (and the table) say so.
Every mode gets the same request mix: ``--requests`` streaming greedy completions (temperature 0,
``max_tokens`` fixed), sent by ``--concurrency`` client threads in the same order; prompt i is a
slice of v3-nano's held-out eval text starting at a line, of 48/160/320/640 characters in turn
(token counts printed), so prompt lengths differ within every batch. No new request is sent
after ``--cap-s`` seconds (every loop and read is bounded; a stuck stream is an error).

Per request: TTFT (send -> first streamed event with text), inter-token latency (gaps between
consecutive text events; both servers stream one event per token), end-to-end latency and
completion tokens (the final ``usage``, else the count of text events). Per mode: errors
(anything but a complete 200 stream), throughput (completion tokens / wall seconds), p50/p95 of
TTFT, ITL and latency, and (edgekit) the workers' seconds in prefill calls, decode calls and the
rest. Exactness: every ``edgekit`` answer is compared, text for text, with the same request served
alone in-process on a session like a lane's (threads / W threads; the exit code is 1 unless all
are equal), and with ``edgekit-1``'s answer (a session on all threads: onnxruntime splits a single
row's long MatMuls across threads, so its last bits may differ). Writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.llamacpp import REPACK_ABORT, stop_server  # noqa: E402
from edgekit.data import load_text  # noqa: E402

PROMPT_CHARS = (48, 160, 320, 640)
READY_S = 180.0                 # a server must answer within this long after start


def make_prompts(n: int) -> list[str]:
    text = load_text("eval")
    out = []
    for i in range(n):
        start = text.find("\n", (i * 7919) % (len(text) - 4000)) + 1
        out.append(text[start:start + PROMPT_CHARS[i % len(PROMPT_CHARS)]])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


class ServerExited(SystemExit):
    """The server process ended before it answered /health; ``log`` is its output's tail."""

    def __init__(self, msg: str, log: str):
        super().__init__(msg)
        self.log = log


def no_repack_retry(name: str, cmd: list[str], log: str) -> list[str] | None:
    """The command that starts llama-server again without weight repacking when its log shows the
    repacking abort llama-bench also hits (``REPACK_ABORT``); None for any other exit or mode."""
    if name != "llama-server" or REPACK_ABORT not in log or "--no-repack" in cmd:
        return None
    return [*cmd, "--no-repack"]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start a server and wait (bounded) until GET /health answers 200."""
    f = open(log, "w")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    f.close()
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if p.poll() is not None:
            tail = log.read_text()[-2000:]
            raise ServerExited(f"server exited ({p.returncode}): {' '.join(cmd)}\n{tail}", tail)
        try:
            if _get(port, "/health", timeout=2)[0] == 200:
                return p
        except OSError:
            pass
        time.sleep(0.25)
    p.kill()
    raise SystemExit(f"server not ready after {READY_S:.0f} s: {' '.join(cmd)}\n{log.read_text()[-2000:]}")


def one_request(port: int, body: dict, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        times, pieces, tokens, done = [], [], None, False
        for raw in r:                                    # bounded: the socket timeout ends a stuck stream
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            choice = (ev.get("choices") or [{}])[0]
            if choice.get("text"):
                times.append(time.perf_counter() - t0)
                pieces.append(choice["text"])
            if choice.get("finish_reason") == "error" or "error" in ev:
                return {"error": str(ev.get("error", "generation error"))[:200]}
            if ev.get("usage"):
                tokens = ev["usage"].get("completion_tokens", tokens)
        c.close()
        if not done:
            return {"error": "stream ended without [DONE]"}
        end = time.perf_counter() - t0
        return {"latency_s": end, "ttft_s": times[0] if times else end, "gaps_s": np.diff(times).tolist(),
                "tokens": tokens if tokens is not None else len(times), "text": "".join(pieces)}
    except Exception as e:  # any client-side failure is an error of the run
        return {"error": f"{type(e).__name__}: {e}"}


def _safe(arg: str) -> str:
    """Results name no path outside the project: an absolute path outside it becomes ``.../NAME``."""
    if not arg.startswith("/"):
        return arg
    try:
        return str(Path(arg).resolve().relative_to(ROOT))
    except ValueError:
        return f".../{Path(arg).name}"


def pct(a, q):
    return round(float(np.percentile(a, q)) * 1e3, 2) if len(a) else None


def alone_texts(bundle: str, prompts: list[str], max_tokens: int, threads: int) -> dict[int, str]:
    """Every request's greedy answer served alone, in-process, on one session like one of the
    batched server's workers (``threads`` each): the reference the batched answers must equal."""
    from edgekit.runtime import Engine

    eng = Engine.from_bundle(bundle, threads=threads, spinning=False)
    return {i: eng.generate(p, max_new_tokens=max_tokens, temperature=0) for i, p in enumerate(prompts)}


def run_mode(name: str, cmd: list[str], port: int, prompts: list[str], a, log: Path) -> dict:
    proc = start(cmd, port, log)
    stop_at = time.monotonic() + a.cap_s
    results: dict[int, dict] = {}
    lock = threading.Lock()

    def client(i: int):
        if time.monotonic() > stop_at:
            return
        r = one_request(port, {"prompt": prompts[i], "max_tokens": a.max_tokens, "temperature": 0, "stream": True},
                        a.request_timeout_s)
        with lock:
            results[i] = r

    try:
        one_request(port, {"prompt": prompts[0], "max_tokens": 4, "temperature": 0, "stream": True}, 60)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as ex:
            list(ex.map(client, range(len(prompts))))
        wall = time.perf_counter() - t0
        extra = {}
        if name.startswith("edgekit"):
            h = json.loads(_get(port, "/health")[1])
            extra = {"mean_rows_per_decode_call": round(h["rows_decoded"] / max(1, h["decode_calls"]), 2),
                     "prefill_calls": h["prefill_calls"], "decode_calls": h["decode_calls"],
                     "workers": h["workers"], "threads_per_worker": h["threads_per_worker"],
                     "worker_seconds": {k: h[f"{k}_s"] for k in ("prefill", "decode", "other")}}
    finally:
        stop_server(proc)
    ok = {i: r for i, r in results.items() if "error" not in r}
    ttft = np.array([r["ttft_s"] for r in ok.values()])
    lat = np.array([r["latency_s"] for r in ok.values()])
    gaps = np.array([g for r in ok.values() for g in r["gaps_s"]])
    tokens = sum(r["tokens"] for r in ok.values())
    return {"mode": name, "command": " ".join(map(_safe, cmd)), "sent": len(results), "completed": len(ok),
            "errors": len(results) - len(ok),
            "error_examples": [r["error"] for r in results.values() if "error" in r][:3],
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(len(ok) / wall, 2),
            "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
            "itl_ms": {"p50": pct(gaps, 50), "p95": pct(gaps, 95)},
            "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95)}, **extra,
            "texts": {i: r["text"] for i, r in sorted(ok.items())}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--llama-server", default=None,
                    help="path of a llama-server binary (default: the one benchmarks/llamacpp.py builds)")
    ap.add_argument("--gguf", default=None, help="the same model as GGUF, for the llama-server mode")
    ap.add_argument("--llama-checkpoint", default=None,
                    help="an HF checkpoint to convert to Q8_0 GGUF for the llama-server mode (instead of --gguf)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=None,
                    help="edgekit batched mode: worker sessions sharing the threads (default: one per thread)")
    ap.add_argument("--threads", type=int, default=None, help="compute threads of every server (default: cores)")
    ap.add_argument("--ctx-per-slot", type=int, default=1024, help="llama-server context per parallel slot")
    ap.add_argument("--cap-s", type=float, default=300.0, help="per mode: no new requests after this many seconds")
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--modes", default="edgekit-1,edgekit,llama-server")
    ap.add_argument("--cpus", default=None,
                    help="pin every server to these CPUs (taskset -c LIST, e.g. 0,1); the clients run unpinned")
    ap.add_argument("--machine", default=None, help="a name for the machine, written into the results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_test"))
    a = ap.parse_args(argv)
    if a.gguf and a.llama_checkpoint:
        ap.error("give --gguf or --llama-checkpoint, not both")
    if a.llama_server and not (a.gguf or a.llama_checkpoint):
        ap.error("--llama-server needs --gguf or --llama-checkpoint (the model it serves)")
    if a.cpus and not shutil.which("taskset"):
        ap.error("--cpus needs taskset (util-linux); install it or leave --cpus out")
    sys.path.insert(0, str(ROOT))
    llama_info = None
    if "llama-server" in a.modes.split(",") and (a.gguf or a.llama_checkpoint):
        from benchmarks import llamacpp
        try:
            if not a.llama_server:
                llama_info = llamacpp.ensure_built()
                a.llama_server = str(Path(llama_info["bin"]) / "llama-server")
            if a.llama_checkpoint:
                ck = Path(a.llama_checkpoint)
                a.gguf = str(llamacpp.convert(ck, llamacpp.HOME / "work" / f"{ck.resolve().name}-q8_0.gguf",
                                              llamacpp.ensure_source()))
        except (llamacpp.LlamaCppError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from edgekit.host import host_facts
    from edgekit.runtime import Engine

    facts = host_facts()
    a.threads = a.threads or facts["cores"]
    a.workers = a.workers or min(a.threads, a.max_batch)
    eng = Engine.from_bundle(a.bundle)
    prompts = make_prompts(a.requests)
    lengths = [len(eng.encode(p)) for p in prompts]
    del eng
    print(f"{a.requests} requests, prompt tokens {min(lengths)}-{max(lengths)} (mean {np.mean(lengths):.0f}), "
          f"max_tokens {a.max_tokens}, {a.concurrency} concurrent, {a.threads} threads", flush=True)
    app = str(ROOT / "sample_apps" / "server" / "app.py")
    modes = [m for m in a.modes.split(",") if m != "llama-server" or a.llama_server]
    runs, tmp = [], tempfile.TemporaryDirectory(prefix="load_test.")
    logs = Path(tmp.name)
    for name in modes:
        port = free_port()
        if name == "llama-server":
            from benchmarks.llamacpp import server_command
            cmd = server_command(Path(a.llama_server).parent, a.gguf, port, a.threads, a.concurrency, a.ctx_per_slot)
            cmd[0] = a.llama_server
        else:
            cmd = [sys.executable, app, "--bundle", a.bundle, "--port", str(port), "--threads", str(a.threads),
                   "--max-batch", "1" if name == "edgekit-1" else str(a.max_batch), "--batch-wait-ms",
                   str(a.batch_wait_ms), "--queue-size", str(a.requests), "--max-tokens", str(a.max_tokens),
                   "--workers", "1" if name == "edgekit-1" else str(a.workers)]
        if a.cpus:
            cmd = ["taskset", "-c", a.cpus, *cmd]
        try:
            r = run_mode(name, cmd, port, prompts, a, logs / f"{name}.log")
        except ServerExited as e:
            again = no_repack_retry(name, cmd, e.log)
            if again is None:
                raise
            r = run_mode(name, again, port, prompts, a, logs / f"{name}.log")
            r["note"] = ("llama-server's default weight repacking aborts on this model "
                         "(GGML_ASSERT(*cur_backend_id != -1)); served with --no-repack")
        if r["errors"]:
            r["server_log_tail"] = (logs / f"{name}.log").read_text()[-1500:]
        print(f"{name}: {r['completed']}/{r['sent']} ok, {r['errors']} errors, {r['tokens_per_s']} tok/s, "
              f"TTFT p50/p95 {r['ttft_ms']['p50']}/{r['ttft_ms']['p95']} ms, "
              f"ITL p50/p95 {r['itl_ms']['p50']}/{r['itl_ms']['p95']} ms", flush=True)
        runs.append(r)
    tmp.cleanup()
    by = {r["mode"]: r for r in runs}
    exact = {}

    def compare(alone: dict, batched: dict) -> dict:
        common = sorted(set(alone) & set(batched))
        diff = [i for i in common if alone[i] != batched[i]]
        return {"compared": len(common), "equal": len(common) - len(diff), "mismatches": diff[:20]}

    per_worker = max(1, a.threads // a.workers)
    if "edgekit" in by:
        print(f"exactness reference: each request alone on a {per_worker}-thread session ...", flush=True)
        exact["alone_same_session"] = compare(alone_texts(a.bundle, prompts, a.max_tokens, per_worker),
                                              by["edgekit"]["texts"])
    if "edgekit" in by and "edgekit-1" in by:
        exact["one_at_a_time_server"] = compare(by["edgekit-1"]["texts"], by["edgekit"]["texts"])
    ratios = {}
    def ratio(x, y):
        return round(x / y, 3) if x is not None and y else None

    if "edgekit" in by and "edgekit-1" in by:
        ratios["batching_throughput_gain"] = round(by["edgekit"]["tokens_per_s"] / by["edgekit-1"]["tokens_per_s"], 2)
    if "edgekit" in by and "llama-server" in by:
        e, ll = by["edgekit"], by["llama-server"]
        ratios["throughput_vs_llama_server"] = ratio(e["tokens_per_s"], ll["tokens_per_s"])
        ratios["ttft_p95_vs_llama_server"] = ratio(e["ttft_ms"]["p95"], ll["ttft_ms"]["p95"])
        ratios["itl_p95_vs_llama_server"] = ratio(e["itl_ms"]["p95"], ll["itl_ms"]["p95"])
    command = "python benchmarks/load_test.py " + " ".join(map(_safe, argv or sys.argv[1:]))
    res = {"machine": a.machine, "command": command,
           "bundle": _safe(str(a.bundle)), "gguf": a.gguf and Path(a.gguf).name,
           "llama_cpp": llama_info and llama_info["version"], "host": facts, "threads": a.threads,
           "requests": a.requests, "cpus": a.cpus,
           "concurrency": a.concurrency, "max_tokens": a.max_tokens, "max_batch": a.max_batch, "workers": a.workers,
           "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": round(float(np.mean(lengths)), 1)},
           "exact_vs_alone": exact, "ratios": ratios,
           "modes": [{k: v for k, v in r.items() if k != "texts"} for r in runs]}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    rows = ["| server | workers x threads | sent | errors | tok/s | TTFT p50 ms | TTFT p95 ms "
            "| ITL p50 ms | ITL p95 ms "
            "| latency p95 ms | rows/decode call | worker s: prefill / decode / other |", "|---" * 12 + "|"]
    for r in runs:
        ws = r.get("worker_seconds")
        wt = f"{r['workers']} x {r['threads_per_worker']}" if "workers" in r else f"{a.threads} threads"
        rows.append(f"| {r['mode']} | {wt} | {r['sent']} "
                    f"| {r['errors']} | {r['tokens_per_s']} | {r['ttft_ms']['p50']} | {r['ttft_ms']['p95']} "
                    f"| {r['itl_ms']['p50']} | {r['itl_ms']['p95']} | {r['latency_ms']['p95']} "
                    f"| {r.get('mean_rows_per_decode_call', '')} "
                    f"| {' / '.join(str(ws[k]) for k in ('prefill', 'decode', 'other')) if ws else ''} |")
    md = (f"# Load test: edgekit sample server vs llama-server on loopback\n\n"
          f"Machine: {a.machine or facts['cpu_model']} ({facts['cpu_model']}, {facts['cores']} cores, "
          f"onnxruntime {facts.get('onnxruntime')}); every server {a.threads} compute threads"
          f"{f' pinned to CPUs {a.cpus}' if a.cpus else ''}. Command: "
          f"`{res['command']}`.\n\n{a.requests} streaming greedy requests, {a.concurrency} concurrent, max_tokens "
          f"{a.max_tokens}, prompts of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}).\n\n"
          + "\n".join(rows) + "\n\n"
          + (f"Exactness: {exact['alone_same_session']['equal']} of {exact['alone_same_session']['compared']} "
             f"batched answers equal the same request served alone on a session like the batched server's "
             f"workers ({per_worker} thread(s) each)"
             + (f"; {exact['one_at_a_time_server']['equal']} of {exact['one_at_a_time_server']['compared']} equal "
                f"edgekit-1's ({a.threads} threads)" if "one_at_a_time_server" in exact else "")
             + ".\n\n" if exact else "")
          + "".join(f"- {k}: {v}\n" for k, v in ratios.items())
          + "".join(f"\nNote ({r['mode']}): {r['note']}\n" for r in runs if r.get("note")))
    out.with_suffix(".md").write_text(md)
    print(md)
    same = exact.get("alone_same_session")
    bad = any(r["errors"] for r in runs) or (same and same["equal"] != same["compared"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
