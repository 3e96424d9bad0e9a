"""Dynamic batching for the HTTP sample app: concurrent requests stepped together through one graph.

What: ``Batcher(engine, max_batch, batch_wait_ms, queue_size)`` owns the engine on one worker
thread. ``submit(job)`` puts a ``Job`` on a bounded queue (``queue.Full`` when it is full: the
server answers 503). The worker admits jobs while fewer than ``max_batch`` rows are active (when
idle it waits up to ``batch_wait_ms`` for more to arrive), prefills jobs of equal prompt length
together as one [B, T] batch, then runs one decode step per group per round; jobs report text
pieces and a final summary through their own ``out`` queue.

Why equal lengths (exactness): the graph has no attention mask and takes positions from the cache
length, so every row of a call must have the same number of cached tokens; padding would attend
to pad rows. A group is a set of rows with the same cache length. Rows leave a group when they
finish (their cache rows are dropped), and two groups whose cache lengths meet (a 20-token prompt
admitted when an older 16-token group has decoded 4 tokens) are merged, so later arrivals join
running batches when lengths allow. With ``max_batch=1`` the worker runs one request at a time:
the no-batching baseline of benchmarks/load_test.py.

Caveat: int8 graphs with per-tensor dynamic activation scales take the scale over the whole batch,
so a row's logits can differ slightly from the same request run alone (fp32 graphs: float noise).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgekit.runtime import GenerationConfig, TextStream, sample
from edgekit.runtime.session import LatentCache


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


@dataclass
class Group:
    jobs: list[Job]
    cache: LatentCache


class Batcher:
    def __init__(self, engine, max_batch: int = 8, batch_wait_ms: float = 10.0, queue_size: int = 64):
        self.engine, self.max_batch, self.wait_s = engine, max_batch, batch_wait_ms / 1e3
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.groups: list[Group] = []
        self.stats = {"prefill_calls": 0, "decode_calls": 0, "rows_decoded": 0, "jobs": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> Job:
        job.text = TextStream(self.engine.tokenizer, job.cfg.stop)
        job.rng = np.random.default_rng(job.cfg.seed)
        self.queue.put_nowait(job)          # raises queue.Full: the caller answers 503
        return job

    # -- worker ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            active = sum(len(g.jobs) for g in self.groups)
            new = self._admit(self.max_batch - active, wait=active == 0)
            try:
                self._prefill(new)
                for g in list(self.groups):
                    self._decode(g)
                self._merge()
            except Exception as e:   # a failed call ends its jobs, never the worker
                for g in self.groups:
                    for j in g.jobs:
                        self._finish(j, "error", str(e).splitlines()[0][:300])
                for j in new:
                    self._finish(j, "error", str(e).splitlines()[0][:300])
                self.groups = []

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

    def _prefill(self, jobs: list[Job]) -> None:
        by_len = defaultdict(list)
        for j in jobs:
            if not j.cancelled:
                by_len[len(j.ids)].append(j)
        for T, js in by_len.items():
            ids = np.asarray([j.ids for j in js], np.int64)                       # [B, T]
            logits, cache = self.engine.model.prefill(ids, capacity=T + max(j.cfg.max_new_tokens for j in js))
            self.stats["prefill_calls"] += 1
            self.stats["jobs"] += len(js)
            g = Group(js, cache)
            if self._advance(g, logits):
                self.groups.append(g)

    def _decode(self, g: Group) -> None:
        tokens = np.asarray([j.last for j in g.jobs], np.int64)                   # [B]
        logits = self.engine.model.decode(tokens, g.cache)                        # [B, V]
        self.stats["decode_calls"] += 1
        self.stats["rows_decoded"] += len(g.jobs)
        if not self._advance(g, logits):
            self.groups.remove(g)

    def _advance(self, g: Group, logits: np.ndarray) -> bool:
        """Sample one token per row, report text, drop finished rows; False when none is left."""
        keep = []
        eos = self.engine.eos_token_id
        for r, j in enumerate(g.jobs):
            tok = sample(logits[r], j.cfg, j.rng)
            reason = None
            if j.cancelled:
                reason = "cancelled"
            elif j.cfg.stop_at_eos and tok == eos:
                reason = "stop"
            else:
                j.n += 1
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
        if len(keep) < len(g.jobs):
            g.jobs = [g.jobs[r] for r in keep]
            if keep:
                g.cache.buffers = [b[keep] for b in g.cache.buffers]          # [B', cap, W] copies
        return bool(keep)

    def _finish(self, j: Job, reason: str, error: str | None = None) -> None:
        if j.done:
            return
        j.done = True
        if reason in ("stop", "length"):
            tail = j.text.flush()
            if tail:
                j.out.put(tail)
        j.out.put({"finish_reason": reason, "completion_tokens": j.n, "prompt_tokens": len(j.ids),
                   **({"error": error} if error else {})})

    def _merge(self) -> None:
        """Join groups whose cache lengths are equal (up to max_batch rows)."""
        by_len = defaultdict(list)
        for g in self.groups:
            by_len[g.cache.length].append(g)
        merged = []
        for gs in by_len.values():
            cur = gs[0]
            for g in gs[1:]:
                if len(cur.jobs) + len(g.jobs) > self.max_batch:
                    merged.append(cur)
                    cur = g
                    continue
                cap = max(cur.cache.capacity, g.cache.capacity)
                bufs = []
                for a, b in zip(cur.cache.buffers, g.cache.buffers):
                    m = np.zeros((a.shape[0] + b.shape[0], cap, a.shape[2]), np.float32)
                    m[:a.shape[0], :cur.cache.length] = a[:, :cur.cache.length]
                    m[a.shape[0]:, :cur.cache.length] = b[:, :cur.cache.length]
                    bufs.append(m)
                cur.cache.buffers = bufs
                cur.jobs = cur.jobs + g.jobs
            merged.append(cur)
        self.groups = merged
