"""Prometheus text-format metrics for the HTTP sample app (stdlib only, like the server).

What: ``Counter``, ``Gauge`` (a value, or a function read at scrape time), ``Histogram``
(cumulative ``le`` buckets, ``_sum``, ``_count``) and ``Rate`` (events per second over a trailing
window, exposed as a gauge), collected in a ``Registry`` whose ``render()`` returns the text
exposition format 0.0.4 (``# HELP`` / ``# TYPE`` lines, then samples; label values escaped).

Why not prometheus_client: the sample server depends on nothing but the stdlib and edgekit's
runtime, and the few metric kinds it needs fit in this file.

Invariants: every method takes the registry's lock, so the worker thread can update while HTTP
threads render; counters only go up; histogram buckets are fixed at construction and sorted.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) < 1e15 else repr(float(x))


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list = []

    def add(self, metric):
        self.metrics.append(metric)
        metric.lock = self.lock
        return metric

    def render(self) -> str:
        with self.lock:
            lines = []
            for m in self.metrics:
                lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.samples()]
        return "\n".join(lines) + "\n"


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str, label: str | None = None):
        self.name, self.help, self.label, self.values = name, help, label, {}
        self.lock = threading.Lock()

    def inc(self, n: float = 1, label: str | None = None) -> None:
        with self.lock:
            self.values[label] = self.values.get(label, 0) + n

    def value(self, label: str | None = None) -> float:
        with self.lock:
            return self.values.get(label, 0)

    def samples(self):
        if not self.values:
            return [f"{self.name} 0"] if self.label is None else []
        return [f"{self.name}{_labels({self.label: k} if self.label else {})} {_num(v)}"
                for k, v in sorted(self.values.items(), key=lambda kv: str(kv[0]))]


class Gauge:
    kind = "gauge"

    def __init__(self, name: str, help: str, fn=None):
        self.name, self.help, self.fn, self.v = name, help, fn, 0.0
        self.lock = threading.Lock()

    def set(self, v: float) -> None:
        with self.lock:
            self.v = v

    def samples(self):
        return [f"{self.name} {_num(self.fn() if self.fn else self.v)}"]


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets):
        self.name, self.help = name, help
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)      # last: above every bound (+Inf only)
        self.sum, self.count = 0.0, 0
        self.lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.sum += v
            self.count += 1

    def samples(self):
        out, acc = [], 0
        for b, c in zip(self.bounds + [math.inf], self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {acc}')
        return out + [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]


class Rate:
    """Events per second over the trailing ``window_s`` (a gauge at scrape time)."""
    kind = "gauge"

    def __init__(self, name: str, help: str, window_s: float = 10.0, clock=time.monotonic):
        self.name, self.help, self.window, self.clock = name, help, window_s, clock
        self.events: deque = deque()                      # (time, n)
        self.lock = threading.Lock()

    def add(self, n: float) -> None:
        with self.lock:
            self.events.append((self.clock(), n))

    def samples(self):
        now = self.clock()
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()
        return [f"{self.name} {_num(round(sum(n for _, n in self.events) / self.window, 3))}"]
