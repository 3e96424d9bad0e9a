"""``latency.merge_rounds``: the figures a latency gate reads when the worker ran in several rounds."""

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.latency import _stats, measure, merge_rounds


def _round(prefill: list[float], decode: list[float], rss: float) -> dict:
    return {"prefill_ms": _stats(prefill), "decode_ms": _stats(decode), "peak_rss_mb": rss, "session_load_s": 1.0,
            "threads": 4, "runs": len(prefill)}


def test_one_slow_round_of_three_does_not_decide_the_p95():
    rng = np.random.default_rng(0)
    calm = [list(100 + rng.random(20) * 10) for _ in range(2)]
    slow = list(180 + rng.random(20) * 40)                         # a bad minute on a shared host
    rounds = [_round(p, [18.0] * 5, rss) for p, rss in zip([calm[0], slow, calm[1]], [900.0, 950.0, 910.0])]
    m = merge_rounds(rounds)
    per = [float(np.percentile(p, 95)) for p in (calm[0], slow, calm[1])]
    assert m["prefill_ms"]["p95"] == pytest.approx(float(np.median(per))), (m["prefill_ms"]["p95"], per)
    assert m["prefill_ms"]["p95"] < 115 < float(np.percentile(calm[0] + slow + calm[1], 95)), per
    assert [r["p95"] for r in m["prefill_ms"]["rounds"]] == pytest.approx(per, abs=1e-4)
    assert len(m["prefill_ms"]["samples"]) == 60 and m["peak_rss_mb"] == 950.0 and m["rounds"] == 3
    assert m["prefill_ms"]["min"] == min(calm[0] + slow + calm[1])


def test_a_graph_slow_in_two_rounds_still_reads_slow():
    fast, slow = [100.0] * 10, [200.0] * 10
    m = merge_rounds([_round(p, [20.0] * 3, 1.0) for p in (slow, fast, slow)])
    assert m["prefill_ms"]["p95"] == 200.0 and m["decode_ms"]["p50"] == 20.0


def test_one_round_is_the_worker_result_unchanged():
    r = _round([1.0, 2.0], [3.0, 4.0], 5.0)
    assert merge_rounds([r]) is r


def test_zero_rounds_names_the_fix():
    with pytest.raises(EdgekitError, match="use 1 or more"):
        measure("nowhere", threads=1, rounds=0)
