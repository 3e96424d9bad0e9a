"""Run an ``edgekit export`` directory on onnxruntime CPU, without torch.

What: ``OrtModel(export_dir, threads=None, spinning=None, parallel=False)``
- ``logits(ids [B, T]) -> [B, T, V]``: full-sequence prefill logits (what ``edgekit.evaluate`` scores);
- ``prefill(ids) -> (logits [B, V] of the last position, cache)`` and
  ``decode(tokens [B], cache) -> logits [B, V]``: incremental generation with the latent cache;
- ``generate_greedy(ids, n) -> [B, T + n]``, through ``greedy(model, ids, n)``: the one greedy
  loop, for any model with this ``prefill``/``decode`` pair (``edgekit.export.parity`` runs the
  torch model through it too);
- ``prefill_rows(rows)``: prompts of different lengths in one call (left-padded; ``cache.pad``
  holds each row's padding), and ``LatentCache.take`` / ``LatentCache.join``: rows leave a
  running batch and new ones join it, whatever their cache lengths (continuous batching).

Why it is shaped like this (per-token overhead decides decode speed at this model size): the cache
lives in one preallocated buffer per layer
[B, capacity, W]. The graph reads ``past_latent.i`` straight from the first P rows of that buffer
and writes ``new_latent.i`` straight into the next rows, through IO binding on raw pointers, so no
cache tensor is copied, concatenated or allocated per token (for B = 1; with B > 1 the row slices
are strided and are copied). Capacity doubles on demand up to ``max_position_embeddings``.
Measured (benchmarks/expert_scaling.py --design, v3-nano, loaded 2-core VM, 5 rounds): no
difference from ``session.run`` + ``np.concatenate`` at this size (1.55 vs 1.46 ms/token at
ctx 128, 1.84 vs 1.85 at ctx 1024; the concatenation copies only ~2 MB/token there). The copy
grows with layers x width x context, so the zero-copy path is kept for larger models.

The cache's element type is the graph's: fp32, or fp16 for bundles quantized with
``[quantize] cache = "fp16"`` (``cache_dtype``; edgekit/quantize/cache_fp16.py), half the memory.

Batching rows of different lengths (graphs with the ``left_pad`` input, see
edgekit/export/graph.py): a row's cache is right-aligned at column ``length``; its first
``pad[r]`` columns are padding the graph masks out. Joining rows right-aligns the shorter cache
(copy), and columns that are padding in every row are dropped (``trim``), so ``pad.min() == 0``
and ``length`` is the longest row's length. With B > 1 the graph's past input is a copy of the
filled columns (B x length x W floats per layer per step; the cache buffer's rows are strided).

Invariants: positions are the cache length minus the row's padding; P + T <= max_position_embeddings
is checked before every call, and exceeding it raises ``EdgekitError`` naming the limit (the
graph's RoPE table ends there). Batch-1 callers never pass padding (the graph's default is none).
Imports only numpy, onnxruntime and the stdlib (plus ``edgekit.errors``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..bundle import read_export_spec
from ..errors import EdgekitError


def greedy(model, ids: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding: ids [B, T] -> [B, T + n], the prompt and n argmax tokens, with n - 1 cached
    steps (T + n - 1 positions). ``model`` has ``prefill(ids, capacity) -> (logits [B, V], cache)``
    and ``decode(tokens [B], cache) -> logits [B, V]``."""
    ids = np.asarray(ids, dtype=np.int64)
    if n < 1:
        return ids
    logits, cache = model.prefill(ids, capacity=ids.shape[1] + n - 1)
    out = [ids, np.asarray(logits).argmax(-1)[:, None]]
    for _ in range(n - 1):
        out.append(np.asarray(model.decode(out[-1], cache)).argmax(-1)[:, None])
    return np.concatenate(out, axis=1)


@dataclass
class LatentCache:
    """All layers' latent rows in one buffer ``store`` [layers, B, capacity, W]; columns [:length]
    are filled; row r's first ``pad[r]`` of them are left padding (``pad`` None: no padding)."""
    store: np.ndarray
    length: int = 0
    binding: object = None     # the onnxruntime IOBinding reused across steps
    pad: np.ndarray | None = None   # [B] int64

    @property
    def buffers(self) -> list[np.ndarray]:
        """Per-layer views [B, capacity, W]."""
        return list(self.store)

    @property
    def capacity(self) -> int:
        return self.store.shape[2]

    @property
    def batch(self) -> int:
        return self.store.shape[1]

    def row_lengths(self) -> np.ndarray:
        """[B] tokens cached per row."""
        return self.length - (self.pad if self.pad is not None else np.zeros(self.batch, np.int64))

    def take(self, rows) -> None:
        """Keep only ``rows`` (indices, in that order), in place; drops padding they all share."""
        rows = np.asarray(rows, np.int64)
        self.store = self.store[:, rows]
        if self.pad is not None:
            self.pad = self.pad[rows]
        self.trim()

    def trim(self) -> None:
        """Drop leading columns that are padding in every row (so the longest row has no padding)."""
        if self.pad is None or not len(self.pad):
            return
        cut = int(self.pad.min())
        if cut > 0:
            self.store = np.ascontiguousarray(self.store[:, :, cut:])
            self.length -= cut
            self.pad = self.pad - cut
        if not self.pad.any():
            self.pad = None

    @staticmethod
    def join(a: LatentCache, b: LatentCache, capacity: int = 0) -> LatentCache:
        """a's rows then b's rows in one cache (a new buffer, at least ``capacity`` columns): the
        shorter one is right-aligned, its rows get the difference as extra left padding."""
        n = max(a.length, b.length)
        cap = max(capacity, n, 1)
        L, W = a.store.shape[0], a.store.shape[3]
        store = np.zeros((L, a.batch + b.batch, cap, W), a.store.dtype)
        pads = []
        for c, lo, hi in ((a, 0, a.batch), (b, a.batch, a.batch + b.batch)):
            shift = n - c.length
            store[:, lo:hi, shift:n] = c.store[:, :, :c.length]
            pads.append((c.pad if c.pad is not None else np.zeros(c.batch, np.int64)) + shift)
        out = LatentCache(store, n, a.binding, np.concatenate(pads).astype(np.int64))
        out.trim()
        return out


class OrtModel:
    def __init__(self, export_dir, threads: int | None = None, spinning: bool | None = None,
                 parallel: bool = False, session_config: dict | None = None):
        d = Path(export_dir)
        self.dir, self.threads, self.spinning, self.parallel = d, threads, spinning, parallel
        self.session_config = dict(session_config or {})
        spec_file = d / "export.json"
        if not spec_file.exists():
            raise EdgekitError(f"{d} has no export.json; pass a directory written by `edgekit export`")
        self.spec = spec = read_export_spec(d)
        so = ort.SessionOptions()
        so.log_severity_level = 3   # errors only: ORT warns on every load that logits_keep has a default
        if threads:
            so.intra_op_num_threads = threads
        if spinning is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        for k, v in (session_config or {}).items():   # e.g. the target's session.dynamic_block_base
            so.add_session_config_entry(str(k), str(v))
        if parallel:   # independent branches (a layer's expert If nodes) may run at once on inter-op threads
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            so.inter_op_num_threads = threads or 0
        try:
            self.session = ort.InferenceSession(str(d / spec["graph"]), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # e.g. a contrib-op graph on a runtime build without com.microsoft ops
            fix = ("re-export with moe='portable' for runtimes without contrib ops" if spec.get("moe") != "portable"
                   else "the file is damaged or was not written by edgekit; re-create it with the command that made it")
            raise EdgekitError(f"onnxruntime cannot load {d / spec['graph']} ({str(e).splitlines()[0][:200]}); "
                               + fix) from None
        self.num_layers, self.width = spec["num_layers"], spec["cache"]["width"]
        self.max_positions, self.vocab_size = spec["max_position_embeddings"], spec["vocab_size"]
        self.name = spec.get("model_name") or d.name
        self._past = [i["name"] for i in spec["inputs"] if i["name"].startswith("past_latent.")]
        self._new = [o["name"] for o in spec["outputs"] if o["name"].startswith("new_latent.")]
        # exports since logits_keep: generation asks for the last row only (older graphs: all rows)
        self._keep = np.array(1, np.int64) if any(i["name"] == "logits_keep" for i in spec["inputs"]) else None
        # exports since left_pad: rows of different lengths can share a call
        self.pads_rows = any(i["name"] == "left_pad" for i in spec["inputs"])
        self._no_pad = np.zeros(1, np.int64)
        # the latent cache's element type: fp32, or fp16 in bundles quantized with [quantize] cache = "fp16"
        types = {i.type for i in self.session.get_inputs() if i.name in self._past}
        self.cache_dtype = np.dtype(np.float16 if types == {"tensor(float16)"} else np.float32)

    def replicas(self, n: int) -> list[OrtModel]:
        """``n`` sessions of the same graph that share this one's threads (at least one each): rows
        do not depend on each other, so a server can split its batch across them and run the parts
        at once, each session on its own threads. Each holds its own copy of the weights."""
        per = max(1, (self.threads or os.cpu_count() or 1) // n)
        return [OrtModel(self.dir, threads=per, spinning=self.spinning, parallel=self.parallel,
                         session_config=self.session_config) for _ in range(n)]

    # -- full-sequence logits ------------------------------------------------------------------
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, T] -> logits [B, T, V] (fp32), no cache kept."""
        ids = self._ids(ids)
        self._check_room(0, ids.shape[1])
        empty = np.zeros((ids.shape[0], 0, self.width), self.cache_dtype)
        feed = {"input_ids": ids, **{n: empty for n in self._past}}
        return self.session.run(["logits"], feed)[0]

    # -- incremental generation -----------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int = 256) -> LatentCache:
        capacity = max(1, min(capacity, self.max_positions))
        return LatentCache(np.zeros((self.num_layers, batch, capacity, self.width), self.cache_dtype),
                           binding=self.session.io_binding())

    def prefill(self, ids: np.ndarray, capacity: int | None = None) -> tuple[np.ndarray, LatentCache]:
        """ids [B, T] -> (logits of the last position [B, V], cache holding T rows)."""
        ids = self._ids(ids)
        cache = self.new_cache(ids.shape[0], capacity or ids.shape[1] + 256)
        return self._step(ids, cache)[:, -1], cache

    def prefill_rows(self, rows: list, capacity: int | None = None) -> tuple[np.ndarray, LatentCache]:
        """Prompts of any lengths (lists of ids) in one call, left-padded -> (logits of each row's
        last position [B, V], cache with ``pad`` set). Each row's logits and cache equal its own
        ``prefill`` (graph.py computes padded rows on their own columns). One-token prompts run in
        a call of their own when longer ones are present: onnxruntime's batched MatMul takes a
        different kernel for a single query row, whose rounding differs (checked in tests)."""
        lens = np.array([len(r) for r in rows], np.int64)
        if not len(rows) or lens.min() < 1:
            raise EdgekitError("prefill_rows needs at least one row, each with >= 1 token id")
        if lens.min() == 1 < lens.max():
            ones, rest = np.flatnonzero(lens == 1), np.flatnonzero(lens > 1)
            la, ca = self.prefill_rows([rows[i] for i in rest], capacity)
            lb, cb = self.prefill_rows([rows[i] for i in ones], capacity)
            cache = LatentCache.join(ca, cb, max(ca.capacity, cb.capacity))
            back = np.argsort(np.concatenate([rest, ones]))              # original row order
            cache.take(back)
            return np.concatenate([la, lb])[back], cache
        T = int(lens.max())
        ids = np.zeros((len(rows), T), np.int64)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = r
        cache = self.new_cache(len(rows), capacity or T + 256)
        cache.pad = T - lens
        logits = self._step(ids, cache)[:, -1]
        cache.trim()
        return logits, cache

    def decode(self, tokens: np.ndarray, cache: LatentCache) -> np.ndarray:
        """tokens [B] (or [B, 1]) appended after the cache -> logits [B, V]."""
        return self._step(self._ids(np.asarray(tokens).reshape(-1, 1)), cache)[:, -1]

    def generate_greedy(self, ids: np.ndarray, n: int) -> np.ndarray:
        """ids [B, T] -> [B, T + n]: the prompt and n greedy tokens (needs T + n - 1 <= max positions)."""
        ids = self._ids(ids)
        if n >= 1 and ids.shape[1] + n - 1 > self.max_positions:
            raise EdgekitError(f"a {ids.shape[1]}-token prompt + {n} new tokens need {ids.shape[1] + n - 1} "
                               f"positions, over the model's {self.max_positions}; shorten the prompt or lower n")
        return greedy(self, ids, n)

    # -- internals -----------------------------------------------------------------------------
    def _ids(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise EdgekitError(f"token ids have shape {ids.shape}; pass a [batch, seq] array with seq >= 1")
        return ids

    def _pads_ok(self, cache: LatentCache) -> None:
        if cache.pad is not None and cache.pad.any() and not self.pads_rows:
            raise EdgekitError(f"{self.name} was exported without the left_pad input, so rows of different "
                               "lengths cannot share a call; re-export it with this edgekit version")

    def _check_room(self, past: int, new: int) -> None:
        if past + new > self.max_positions:
            raise EdgekitError(f"{past} cached + {new} new tokens exceed the model's maximum of "
                               f"{self.max_positions} positions; shorten the prompt or generate fewer tokens")

    def _grow(self, cache: LatentCache, need: int) -> None:
        cap = min(self.max_positions, max(need, 2 * cache.capacity))
        store = np.zeros(cache.store.shape[:2] + (cap, cache.store.shape[3]), cache.store.dtype)
        store[:, :, :cache.length] = cache.store[:, :, :cache.length]
        cache.store = store

    def _step(self, ids: np.ndarray, cache: LatentCache) -> np.ndarray:
        """Run ids [B, T] after the cache's rows; writes T new rows; returns logits [B, 1, V] of the
        last position (all T positions for exports without ``logits_keep``)."""
        B, T = ids.shape
        P = cache.length
        self._pads_ok(cache)
        self._check_room(P - (int(cache.pad.min()) if cache.pad is not None else 0), T)
        if P + T > cache.capacity:
            self._grow(cache, P + T)
        bind, f32, cd = cache.binding, np.float32, self.cache_dtype
        bind.bind_input("input_ids", "cpu", 0, np.int64, ids.shape, ids.ctypes.data)
        keep = [ids]                         # arrays whose memory the binding points at
        if B == 1:      # the graph reads and writes the cache buffer itself: row slices are contiguous
            past, new = cache.store[:, :, :P], cache.store[:, :, P:P + T]
        else:           # one copy of every layer's filled columns, one copy back of the new rows
            past, new = np.ascontiguousarray(cache.store[:, :, :P]), np.empty((len(self._new), B, T, self.width), cd)
        keep += [past, new]
        for name, x in zip(self._past, past):
            bind.bind_input(name, "cpu", 0, cd, x.shape, x.ctypes.data)
        for name, x in zip(self._new, new):
            bind.bind_output(name, "cpu", 0, cd, x.shape, x.ctypes.data)
        if self._keep is not None:
            bind.bind_input("logits_keep", "cpu", 0, np.int64, (), self._keep.ctypes.data)
        if self.pads_rows:       # always bound: the binding outlives this call (reused per cache)
            pad = np.ascontiguousarray(cache.pad, np.int64) if cache.pad is not None else self._no_pad
            keep.append(pad)
            bind.bind_input("left_pad", "cpu", 0, np.int64, pad.shape, pad.ctypes.data)
        logits = np.empty((B, T if self._keep is None else 1, self.vocab_size), f32)
        bind.bind_output("logits", "cpu", 0, f32, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(bind)
        if B > 1:
            cache.store[:, :, P:P + T] = new
        cache.length = P + T
        del keep
        return logits
