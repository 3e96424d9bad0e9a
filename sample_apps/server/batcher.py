"""Continuous batching for the HTTP sample app: requests join the running batch at every step.

What: ``Batcher(engine, max_batch, batch_wait_ms, queue_size, workers=1)`` runs ``workers`` worker
threads, each a ``Lane``: its own onnxruntime session (``OrtModel.replicas``: the engine's threads
split between them, at least one each) and its share of ``max_batch`` rows. ``submit(job)`` puts a
``Job`` on one bounded queue all lanes take from (``queue.Full`` when it is full: the server
answers 503 with ``retry_after_s()``). Every step a lane
1. drops rows whose client went away (``Job.cancelled``) and rows that finished;
2. admits queued jobs while it has fewer rows than its share (when idle it first waits up to
   ``batch_wait_ms`` for more to arrive) and prefills them, left-padded
   (``OrtModel.prefill_rows``), sampling each one's first token. Jobs are grouped by prompt length
   (``prefill_groups``): one call per group, the grouping that minimises padded token-rows plus
   ``prefill_call_tokens`` per call (a call's fixed cost, in token-rows), so a 10-token prompt is
   not padded to the length of a 500-token one that arrived with it;
3. joins their cache rows to its running batch (``LatentCache.join``: rows of any cache length)
   and runs one decode call for every row it holds.
Jobs report text pieces and a final summary through their own ``out`` queue; ``Job.results``
is what an HTTP handler iterates (it notices a closed client and cancels the job).
``max_batch=1`` runs one request at a time: the no-batching baseline of benchmarks/load_test.py.

Why several one-thread sessions instead of one session on every thread: onnxruntime runs a
v3-nano decode step as ~1,000-2,000 small nodes; with one thread per session nothing waits on a
thread pool, the lanes' calls run at once (onnxruntime releases the GIL), and, on the loaded
2-core dev VM, server CPU per generated token fell from 3.4 to 2.0 ms with two lanes of one
thread vs one lane of two (48 requests, 16 concurrent). Each lane holds its own copy of the
weights (9 MB for v3-nano).

Why a row's answer does not depend on its neighbours: the graph computes a padded row's attention
on the row's own columns and everything else per token (edgekit/export/graph.py), and int8 graphs
quantize activations per token; so on int8 bundles with grouped experts and one-thread sessions
a row's logits equal the request served alone (on a session like the lane's) bit for bit, and
greedy answers are identical (tests/test_sample_apps.py sends prompts of different lengths
together and compares; benchmarks/load_test.py checks every answer of its run). Two things break
it, and ``inexact_batching`` names them (``/health`` "exact_batching"): onnxruntime's QMoE expert
kernel, 4-bit units (its MatMulNBits: 91 of 100 batched answers equal alone with 4-bit grouped
experts, benchmarks/load_test.py), and sessions of more than one thread (onnxruntime splits one
row's long MatMul over the key axis across threads, but not a batch of rows, so the rounding of a
row alone differs).

Time split (``seconds`` in ``/health``, ``edgekit_worker_seconds_total{part}``): seconds in
prefill graph calls, in decode graph calls, and the rest of a step (scheduling, sampling, text),
summed over lanes.

Metrics (``metrics.text()``, Prometheus format): queue depth, active rows, rows per decode and
prefill call (histograms), requests by finish reason (and rejected), prompt and generated
tokens, tokens/s over the last 10 s, time to first token (histogram).

Failure modes: an exception in a call ends the jobs of that call with finish_reason "error"
(the message goes to the client) and the worker keeps serving.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from metrics import Counter, Gauge, Histogram, Rate, Registry

from edgekit.runtime import GenerationConfig, TextStream, sample
from edgekit.runtime.session import LatentCache

POLL_S = 0.1                 # how often a waiting handler checks whether its client went away
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Job:
    ids: list[int]                       # prompt ids, already fitted to the context
    cfg: GenerationConfig
    out: queue.Queue = field(default_factory=queue.Queue)   # str pieces, then a dict summary
    cancelled: bool = False              # set by the HTTP thread when the client goes away
    done: bool = False
    n: int = 0                           # tokens generated
    last: int = -1                       # the token to feed at the next decode step
    text: TextStream | None = None
    rng: np.random.Generator | None = None
    submitted: float = 0.0               # time.monotonic() at submit

    def results(self, timeout_s: float, gone=None):
        """Yield text pieces, then the summary dict. Raises ``queue.Empty`` after ``timeout_s``
        without output; ``gone()`` (polled every ``POLL_S``) True -> cancel the job and stop."""
        last_item = checked = time.monotonic()
        while True:
            try:
                item = self.out.get(timeout=POLL_S)
            except queue.Empty:
                item = None
            now = time.monotonic()
            if gone is not None and now - checked >= POLL_S:
                checked = now
                if gone():
                    self.cancelled = True
                    return
            if item is None:
                if now - last_item >= timeout_s:
                    self.cancelled = True
                    raise queue.Empty
                continue
            last_item = now
            yield item
            if isinstance(item, dict):
                return


def prefill_groups(lengths: list[int], call_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` split into prefill calls, shortest first: the split of the sorted
    lengths into runs that minimises sum(rows x longest) + call_tokens x calls (exact, O(n^2))."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)       # best[k]: cost of the first k
    for k in range(1, n + 1):
        for j in range(k):                                      # last group = order[j:k]
            c = best[j] + (k - j) * lengths[order[k - 1]] + call_tokens
            if c < best[k]:
                best[k], cut[k] = c, j
    groups, k = [], n
    while k > 0:
        groups.append(order[cut[k]:k])
        k = cut[k]
    return groups[::-1]


def inexact_batching(model, rows: int) -> str:
    """Why a row's answer could depend on the rows batched with it on ``model`` ('' = it cannot):
    onnxruntime's QMoE expert kernel and its 4-bit MatMulNBits do not compute rows independently, and
    a session with more than one thread splits a single row's long MatMuls (the attention's key axis) across threads,
    which it does not do for several rows, so one row's rounding differs from the same row in a
    batch."""
    if rows <= 1:
        return ""
    qmoe = sorted({v for v in ((model.spec.get("quantization") or {}).get("moe") or {}).values() if v != "grouped"})
    why = [f"the routed experts run on onnxruntime's QMoE kernel ({', '.join(qmoe)}); build the bundle with "
           "grouped experts (--target cpu4-serve)"] if qmoe else []
    int4 = (model.spec.get("quantization") or {}).get("int4") or {}
    n4 = len(int4.get("linears") or []) + len(int4.get("moe") or [])
    if n4:
        why.append(f"{n4} unit(s) are 4-bit (onnxruntime's MatMulNBits does not compute a row in a batch as it "
                   "does alone); build the bundle without 4-bit units (--target cpu4-serve)")
    if (model.threads or 0) != 1:
        why.append(f"sessions run {model.threads or 'all'} threads; one thread per worker (--workers = --threads) "
                   "keeps rows independent")
    return "; ".join(why)


def client_gone(sock) -> bool:
    """True when the peer closed the connection (readable with no data) or the socket is dead."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Lane:
    """One worker's share of the batch: its own onnxruntime session and running batch (``rows`` in
    cache row order, ``cache``)."""

    def __init__(self, model, max_rows: int):
        self.model, self.max_rows = model, max_rows
        self.rows: list[Job] = []
        self.cache: LatentCache | None = None
        self.decode_calls = self.rows_decoded = 0


class Batcher:
    def __init__(self, engine, max_batch: int = 16, batch_wait_ms: float = 5.0, queue_size: int = 64,
                 prefill_call_tokens: int = 64, workers: int = 1):
        if not 1 <= workers <= max_batch:
            raise ValueError(f"workers={workers}: pass 1..max_batch ({max_batch})")
        self.engine, self.max_batch, self.wait_s = engine, max_batch, batch_wait_ms / 1e3
        self.prefill_call_tokens = prefill_call_tokens
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        models = [engine.model] if workers == 1 else engine.model.replicas(workers)
        self.lanes = [Lane(m, max_batch // workers + (i < max_batch % workers)) for i, m in enumerate(models)]
        self.stats = {"prefill_calls": 0, "decode_calls": 0, "rows_decoded": 0, "jobs": 0, "workers": workers,
                      "threads_per_worker": models[0].threads}
        self.inexact = inexact_batching(models[0], max(lane.max_rows for lane in self.lanes))
        self.seconds = {"prefill": 0.0, "decode": 0.0, "other": 0.0}   # worker time: graph calls vs the rest
        self._lock = threading.Lock()
        self._job_s = 1.0                               # running mean of a job's duration (Retry-After)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(lane,), name=f"batcher-{i}", daemon=True)
                         for i, lane in enumerate(self.lanes)]
        r = self.metrics = Registry()
        r.add(Gauge("edgekit_queue_depth", "Requests waiting for a batch slot.", self.queue.qsize))
        r.add(Gauge("edgekit_active_rows", "Requests being generated (rows of the running batches).",
                    lambda: len(self.rows)))
        self.m_decode_rows = r.add(Histogram("edgekit_decode_batch_rows", "Rows per decode call.", BATCH_BUCKETS))
        self.m_prefill_rows = r.add(Histogram("edgekit_prefill_batch_rows", "Rows per prefill call.", BATCH_BUCKETS))
        self.m_requests = r.add(Counter("edgekit_requests_total", "Finished requests by finish reason "
                                        "(length, stop, cancelled, error; rejected = 503 queue full).", "reason"))
        self.m_prompt = r.add(Counter("edgekit_prompt_tokens_total", "Prompt tokens prefilled."))
        self.m_tokens = r.add(Counter("edgekit_generated_tokens_total", "Tokens generated."))
        self.m_rate = r.add(Rate("edgekit_tokens_per_second", "Generated tokens per second over the last 10 s."))
        self.m_ttft = r.add(Histogram("edgekit_time_to_first_token_seconds",
                                      "From submit to the first generated token.", TTFT_BUCKETS))
        self.m_seconds = r.add(Counter("edgekit_worker_seconds_total", "Worker time by part: prefill and "
                                       "decode graph calls, other (scheduling, sampling, text).", "part"))

    @property
    def rows(self) -> list[Job]:
        """Active rows of every lane."""
        return [j for lane in self.lanes for j in lane.rows]

    def start(self) -> Batcher:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def submit(self, job: Job) -> Job:
        job.text = TextStream(self.engine.tokenizer, job.cfg.stop)
        job.rng = np.random.default_rng(job.cfg.seed)
        job.submitted = time.monotonic()
        try:
            self.queue.put_nowait(job)          # raises queue.Full: the caller answers 503
        except queue.Full:
            self.m_requests.inc(label="rejected")
            raise
        return job

    def retry_after_s(self) -> int:
        """Seconds until a queued request would likely start: queue / batch slots x mean job time."""
        return int(min(60, max(1, round((self.queue.qsize() + 1) / self.max_batch * self._job_s))))

    def health(self) -> dict:
        with self._lock:
            return {"status": "ok", "queued": self.queue.qsize(), "active": len(self.rows),
                    "max_batch": self.max_batch, **self.stats, "exact_batching": not self.inexact,
                    **({"inexact_because": self.inexact} if self.inexact else {}),
                    **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()}}

    def _count(self, **n) -> None:
        with self._lock:
            for k, v in n.items():
                self.stats[k] += v

    # -- worker ----------------------------------------------------------------------------------
    def _loop(self, lane: Lane) -> None:
        while not self._stop.is_set():
            self.step(wait=True, lane=lane)

    def step(self, wait: bool = False, lane: Lane | None = None) -> None:
        """One round of one lane (default: the first): drop cancelled rows, admit + prefill queued
        jobs, decode every active row. ``wait``: when no row is active, block briefly for a job
        (the worker thread's loop)."""
        lane = lane or self.lanes[0]
        new: list[Job] = []
        try:
            self._drop(lane, [j for j in lane.rows if j.cancelled], "cancelled")
            new = self._admit(lane.max_rows - len(lane.rows), wait=wait and not lane.rows)
            t0 = time.perf_counter()
            graph = 0.0
            if new:
                graph += self._prefill(lane, new)
            if lane.rows:
                graph += self._decode(lane)
            if new or lane.rows:
                self._spent("other", time.perf_counter() - t0 - graph)
        except Exception as e:   # a failed call ends its jobs, never the worker
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            for j in lane.rows + new:
                self._finish(j, "error", msg)
            lane.rows, lane.cache = [], None

    def _spent(self, part: str, s: float) -> None:
        with self._lock:
            self.seconds[part] += s
        self.m_seconds.inc(s, label=part)

    def _admit(self, room: int, wait: bool) -> list[Job]:
        jobs: list[Job] = []
        if room <= 0:
            return jobs
        try:
            jobs.append(self.queue.get(timeout=0.05) if wait else self.queue.get_nowait())
        except queue.Empty:
            return jobs
        deadline = time.monotonic() + (self.wait_s if wait else 0)
        while len(jobs) < room:
            left = deadline - time.monotonic()
            try:
                jobs.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _prefill(self, lane: Lane, jobs: list[Job]) -> float:
        """Prefill ``jobs`` into ``lane``; returns the seconds spent in graph calls."""
        for j in jobs:
            if j.cancelled:
                self._finish(j, "cancelled")
        jobs = [j for j in jobs if not j.cancelled]
        return sum(self._prefill_group(lane, [jobs[i] for i in group])
                   for group in prefill_groups([len(j.ids) for j in jobs], self.prefill_call_tokens))

    def _prefill_group(self, lane: Lane, jobs: list[Job]) -> float:
        need = max(len(j.ids) + j.cfg.max_new_tokens for j in jobs)
        t0 = time.perf_counter()
        logits, cache = lane.model.prefill_rows([j.ids for j in jobs], capacity=need)
        took = time.perf_counter() - t0
        self._spent("prefill", took)
        self._count(prefill_calls=1, jobs=len(jobs))
        self.m_prefill_rows.observe(len(jobs))
        self.m_prompt.inc(sum(len(j.ids) for j in jobs))
        keep = self._advance(jobs, logits)
        if not keep:
            return took
        cache.take(keep)
        jobs = [jobs[r] for r in keep]
        if lane.cache is None:
            lane.rows, lane.cache = jobs, cache
        else:
            left = max(j.cfg.max_new_tokens - j.n for j in lane.rows + jobs)
            lane.cache = LatentCache.join(lane.cache, cache, max(lane.cache.length, cache.length) + left)
            lane.rows = lane.rows + jobs
        return took

    def _decode(self, lane: Lane) -> float:
        """One decode call for every row of ``lane``; returns the seconds spent in it."""
        tokens = np.fromiter((j.last for j in lane.rows), np.int64, len(lane.rows))
        t0 = time.perf_counter()
        logits = lane.model.decode(tokens, lane.cache)                               # [B, V]
        took = time.perf_counter() - t0
        self._spent("decode", took)
        self._count(decode_calls=1, rows_decoded=len(lane.rows))
        lane.decode_calls += 1
        lane.rows_decoded += len(lane.rows)
        self.m_decode_rows.observe(len(lane.rows))
        keep = self._advance(lane.rows, logits)
        if len(keep) < len(lane.rows):
            self._keep(lane, keep)
        return took

    def _drop(self, lane: Lane, jobs: list[Job], reason: str) -> None:
        if not jobs:
            return
        for j in jobs:
            self._finish(j, reason)
        self._keep(lane, [r for r, j in enumerate(lane.rows) if not j.done])

    def _keep(self, lane: Lane, keep: list[int]) -> None:
        lane.rows = [lane.rows[r] for r in keep]
        if lane.rows:
            lane.cache.take(keep)
        else:
            lane.cache = None

    def _advance(self, jobs: list[Job], logits: np.ndarray) -> list[int]:
        """Sample one token per row, report text, finish rows that are done; returns the rows kept."""
        keep, eos, now, made = [], self.engine.eos_token_id, time.monotonic(), 0
        # greedy rows: one argmax call for the batch (numpy releases the GIL in each call, and taking it
        # back can wait for an HTTP thread's switch interval: per-row calls made that a cost per row)
        best = logits.argmax(-1).tolist() if any(j.cfg.temperature == 0 for j in jobs) else None
        for r, j in enumerate(jobs):
            if j.cancelled:
                self._finish(j, "cancelled")
                continue
            tok = best[r] if j.cfg.temperature == 0 else sample(logits[r], j.cfg, j.rng)
            if j.n == 0:
                self.m_ttft.observe(now - j.submitted)
            reason = None
            if j.cfg.stop_at_eos and tok == eos:
                reason = "stop"
            else:
                j.n += 1
                made += 1
                piece = j.text.push(tok)
                if piece:
                    j.out.put(piece)
                if j.text.stopped:
                    reason = "stop"
                elif j.n >= j.cfg.max_new_tokens:
                    reason = "length"
            if reason:
                self._finish(j, reason)
            else:
                j.last = tok
                keep.append(r)
        self.m_tokens.inc(made)
        self.m_rate.add(made)
        return keep

    def _finish(self, j: Job, reason: str, error: str | None = None) -> None:
        if j.done:
            return
        j.done = True
        self.m_requests.inc(label=reason)
        with self._lock:
            self._job_s += 0.1 * (time.monotonic() - j.submitted - self._job_s)
        if reason in ("stop", "length"):
            tail = j.text.flush()
            if tail:
                j.out.put(tail)
        j.out.put({"finish_reason": reason, "completion_tokens": j.n, "prompt_tokens": len(j.ids),
                   **({"error": error} if error else {})})
