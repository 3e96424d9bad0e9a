"""Measurement primitives shared by the benchmark runner and its per-variant worker processes.

What: memory bandwidth (a large numpy copy, 1 and N threads), latency loops over a ``Runner``
(prefill p50/p95, decode ms/token at a given context), peak RSS, and the decode "bandwidth floor"
arithmetic (bytes of weights + cache read per token / bandwidth).

Why: decode of a small LM on CPU is memory-bound, so the floor says how far each runtime is from
what the machine allows; all variants are timed by the same loops so only the runtime differs.

Invariants: no torch import here (the ORT and llama.cpp workers must not pay for it in RSS);
timings use ``time.perf_counter`` around one call, after warm-up calls.

Failure modes: none specific; a runner that raises propagates to the worker, which records it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edgekit.latency import peak_rss_mb  # noqa: F401  (the workers' memory figure, same as edgekit validate's)


# ---------------------------------------------------------------------------------------------
# Pure arithmetic (unit-tested)
# ---------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


@dataclass
class ActiveParams:
    """Parameters read to decode one token (MoE: only the routed experts chosen)."""

    total: int          # every parameter of the model
    per_token: int      # embedding row + attention + dense/shared FFN + top-k experts + router + head
    cache_elems_per_token: int  # latent KV cache elements per cached token, all layers


def active_params(cfg: dict) -> ActiveParams:
    """Count from a Hugging Face DeepSeek-V3 ``config.json`` dict (no per-layer overrides)."""
    d, v, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    h, ql, kvl = cfg["num_attention_heads"], cfg.get("q_lora_rank") or 0, cfg["kv_lora_rank"]
    nope, rope, vh = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qk = nope + rope
    q = (d * ql + ql + ql * h * qk) if ql else d * h * qk
    attn = q + d * (kvl + rope) + kvl + kvl * h * (nope + vh) + h * vh * d + 2 * d  # + 2 norms
    n_exp, k = cfg.get("n_routed_experts") or 0, cfg["num_experts_per_tok"]
    mi, shared = cfg["moe_intermediate_size"], cfg.get("n_shared_experts") or 0
    dense_ffn = 3 * d * cfg["intermediate_size"]
    expert = 3 * d * mi
    total = 2 * v * d + d    # embedding + head + final norm
    per_tok = d + v * d + d  # one embedding row + head + final norm
    for i in range(L):
        moe = n_exp and i >= cfg.get("first_k_dense_replace", 0) and i % cfg.get("moe_layer_freq", 1) == 0
        if moe:
            router = n_exp * d + n_exp
            total += attn + router + (n_exp + shared) * expert
            per_tok += attn + router + (k + shared) * expert
        else:
            total += attn + dense_ffn
            per_tok += attn + dense_ffn
    return ActiveParams(total, per_tok, L * (kvl + rope))


def decode_floor_ms(weight_bytes_per_token: float, cache_bytes_per_token: float, ctx: int,
                    bandwidth_gbs: float) -> float:
    """Lower bound on decode time: bytes that must stream from memory for one token / bandwidth.
    weight_bytes_per_token: active weights; cache_bytes_per_token: cache bytes per cached position
    (all layers); ctx: cached positions read."""
    total = weight_bytes_per_token + cache_bytes_per_token * ctx
    return total / (bandwidth_gbs * 1e9) * 1e3


def floor_fraction(floor_ms: float | None, measured_ms: float | None) -> float | None:
    """Share of the bandwidth floor reached (1.0 = at the limit)."""
    if not floor_ms or not measured_ms:
        return None
    return floor_ms / measured_ms


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------
def memory_bandwidth_gbs(threads: int = 1, mib: int = 512, repeats: int = 5) -> float:
    """Best-of-``repeats`` copy bandwidth (read + write bytes / s) of a ``mib`` MiB float32 array,
    split over ``threads`` threads (numpy releases the GIL inside large copies)."""
    n = mib * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def copy(c):
        np.copyto(dst[c[0]:c[1]], src[c[0]:c[1]])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, chunks))  # touch pages
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(copy, chunks))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


# ---------------------------------------------------------------------------------------------
# Latency loops over a Runner
# ---------------------------------------------------------------------------------------------
class Runner:
    """What each variant implements (see benchmarks/runners.py and llamacpp.py).

    prefill(ids [1, T]) -> None: one forward over T tokens (the prompt), building the cache.
    start(ids [1, T]) -> state: prefill returning the decode state (the KV cache).
    step(state, token int) -> state: decode one token after ``state``.
    logits(ids [B, T]) -> np [B, T, V]: for accuracy (edgekit.evaluate).
    """


def time_prefill(runner, ids: np.ndarray, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        runner.prefill(ids)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.prefill(ids)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_decode(runner, ctx_ids: np.ndarray, tokens: list[int], warmup: int = 2) -> list[float]:
    """ms for each of ``tokens`` decoded one at a time after a prefill of ``ctx_ids`` [1, ctx]."""
    state = runner.start(ctx_ids)
    for t in tokens[:warmup]:
        state = runner.step(state, t)
    state = runner.start(ctx_ids)  # restart so every timed token sees ctx .. ctx+len(tokens)
    out = []
    for t in tokens:
        t0 = time.perf_counter()
        state = runner.step(state, t)
        out.append((time.perf_counter() - t0) * 1e3)
    return out
