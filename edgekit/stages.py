"""The records and the runner the compress pipeline's stages share (``edgekit.pipeline`` and its
streamed walk, ``edgekit.pipeline_streamed``): the texts they read, what one build produced, the
stage runner with its timing, device and peak-memory rows, and the cache keys both walks use.

Invariants: a stage row records its name, seconds, where torch ran (``device``, when it ran torch)
and, on Linux, this process's peak resident memory during the stage (``peak_rss_mb``: VmHWM reset
when the stage starts; subprocesses such as latency workers are not included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .latency import peak_rss_mb, reset_peak_rss
from .stagecache import dir_digest


@dataclass
class Texts:
    """The token ids the stages read, loaded once (``load_texts``); ``dev`` only with --auto."""
    calib: np.ndarray
    recover: np.ndarray
    eval: np.ndarray
    dev: np.ndarray | None
    calib_name: str
    recover_name: str
    dev_name: str = ""


@dataclass
class Built:
    """The artifacts of one ``build`` (stage cache directories) and what it measured."""
    pruned: Path
    smoothed: Path
    exported: Path
    planned: Path
    quantized: Path
    pruned_accuracy: float        # on the scoring tokens
    int8_budget: float


class Stages:
    """Runs and times the stages, printing one line per stage (inner loops show their own bars)."""

    def __init__(self, console, total: int, device: str = "cpu"):
        self.console, self.total, self.i, self.rows = console, total, 0, []
        self.device = device               # torch device of the stages that run torch (``edgekit.device``)

    def log(self, msg: str) -> None:
        if self.console:
            self.console.print(f"      {msg}")

    def skip(self, name: str, why: str) -> None:
        """A stage not run because an earlier one already gives its result: numbered and reported as such."""
        self.i += 1
        if self.console:
            self.console.print(f"[bold cyan][{self.i}/{self.total}][/] {name}: skipped, {why}")
        self.rows.append({"name": name, "skipped": why, "seconds": 0.0})

    def run(self, name: str, fn, **row):
        self.i += 1
        if self.console:
            self.console.print(f"[bold cyan][{self.i}/{self.total}][/] {name} ...")
        measured = reset_peak_rss()
        t = time.perf_counter()
        out = fn()
        row = {"name": name, **row, "seconds": round(time.perf_counter() - t, 2)}
        if measured:  # this process's peak during the stage (subprocesses, e.g. latency workers, not included)
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.rows.append(row)
        if self.console:
            self.console.print(f"      done in {row['seconds']:.1f}s")
        return out


def tokens_hash(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int64).tobytes()).hexdigest()[:20]


def prune_key(src: Path, recipe, texts: Texts) -> list:
    """The prune stage's cache key: the checkpoint, the texts it reads, its config."""
    return [dir_digest(src), tokens_hash(texts.calib), tokens_hash(texts.recover), dataclasses.asdict(recipe.prune)]


def pruned_accuracy(st: Stages, name: str, pruned: Path, fp32_accuracy: float, score, **row) -> float:
    """The pruned fp32 model's accuracy: ``score()`` run as stage ``name``, or, when the prune stage
    removed nothing and distilled nothing (``prune.removed_nothing`` of ``pruned``), the unpruned
    ``fp32_accuracy`` with the stage shown as skipped (the model is the same; scoring it again is waste)."""
    from .prune import removed_nothing

    if removed_nothing(pruned):
        st.skip(name, "nothing pruned or distilled: the fp32 accuracy is this model's")
        return fp32_accuracy
    return st.run(name, score, **row)
