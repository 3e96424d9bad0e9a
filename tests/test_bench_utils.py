"""Pure logic of benchmarks/: parameter counting, the bandwidth floor, ratios and the table."""

import json
from pathlib import Path

import pytest

from benchmarks.measure import ActiveParams, active_params, decode_floor_ms, floor_fraction
from benchmarks.tables import add_floor, add_ratios, markdown, merge_rounds, paired_note, paired_ratios

NANO = Path(__file__).resolve().parent.parent / "edgekit" / "data" / "v3-nano" / "config.json"


def _cfg(**over):
    from edgekit.checkpoint import config_from_args
    from edgekit.model import ModelArgs

    return config_from_args(ModelArgs(**over))


@pytest.mark.parametrize("over", [{}, dict(q_lora_rank=0, first_k_dense_replace=2, n_shared_experts=0)])
def test_active_params_total_matches_model(over):
    from edgekit.model import ModelArgs, Transformer

    cfg = _cfg(vocab_size=512, hidden_size=64, num_hidden_layers=3, **over)
    model = Transformer(ModelArgs(**{k: v for k, v in cfg.items() if k in ModelArgs.__dataclass_fields__}))
    n = sum(t.numel() for t in model.state_dict().values())
    ap = active_params(cfg)
    assert ap.total == n, f"counted {ap.total} params, model has {n}"
    # per token: all but the unchosen routed experts and all but one embedding row
    a = model.args
    moe_layers = sum(a.for_layer(i).is_moe for i in range(a.num_hidden_layers))
    unused = moe_layers * (a.n_routed_experts - a.num_experts_per_tok) * 3 * a.hidden_size * a.moe_intermediate_size
    assert ap.per_token == n - unused - (a.vocab_size - 1) * a.hidden_size
    assert ap.cache_elems_per_token == a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim)


def test_active_params_v3_nano_config():
    ap = active_params(json.loads(NANO.read_text()))
    assert ap.total == 8_808_680, ap  # 8,808,640 params + 40 router bias buffers
    assert ap.cache_elems_per_token == 6 * (64 + 16)


def test_decode_floor_arithmetic():
    # 24 MB of weights + 1024 positions x 3840 B of cache at 30 GB/s
    f = decode_floor_ms(24e6, 3840, 1024, 30.0)
    assert f == pytest.approx((24e6 + 3840 * 1024) / 30e9 * 1e3)
    assert floor_fraction(f, 2 * f) == pytest.approx(0.5)
    assert floor_fraction(None, 1.0) is None and floor_fraction(1.0, None) is None


def _rows():
    rows = [{"model": "m", "variant": "ort-fp32", "size_mb": 40.0, "prefill_p50_ms": 20.0, "prefill_p95_ms": 25.0,
             "decode_ms_ctx128": 4.0, "decode_ms_ctx1024": 5.0, "peak_rss_mb": 200.0, "accuracy": 0.6},
            {"model": "m", "variant": "int8", "size_mb": 10.0, "prefill_p50_ms": 10.0, "prefill_p95_ms": 30.0,
             "decode_ms_ctx128": 1.0, "decode_ms_ctx1024": None, "peak_rss_mb": 100.0, "accuracy": 0.59},
            {"model": "m", "variant": "broken", "error": "build failed: boom"},
            {"model": "other", "variant": "int8", "size_mb": 1.0}]  # no baseline for this model
    return add_ratios(rows)


def test_ratios_are_per_model_and_tolerate_gaps():
    r = _rows()
    assert r[0]["vs_ort_fp32"]["size_mb"] == 1.0
    assert r[1]["vs_ort_fp32"]["size_mb"] == pytest.approx(0.25)
    assert r[1]["vs_ort_fp32"]["prefill_p95_ms"] == pytest.approx(1.2)
    assert r[1]["vs_ort_fp32"]["decode_ms_ctx1024"] is None
    assert all(v is None for v in r[3]["vs_ort_fp32"].values())


def test_add_floor_uses_artifact_bytes_per_param():
    ap = ActiveParams(total=10_000_000, per_token=4_000_000, cache_elems_per_token=480)
    row = add_floor({"size_mb": 40.0, "decode_ms_ctx128": 1.0, "decode_ms_ctx1024": 2.0}, ap, 20.0, 4)
    fl = row["floor"]
    assert fl["weight_mb_per_token"] == pytest.approx(16.0)      # 4 B/param x 4M active
    want = (16e6 + 480 * 4 * 128) / 20e9 * 1e3
    assert fl["floor_ms_ctx128"] == pytest.approx(want)
    assert fl["fraction_ctx128"] == pytest.approx(want / 1.0)


def test_markdown_table_shape_and_marks():
    rows = _rows()
    md = markdown(rows, {"cpu_model": "X", "arch": "x86_64", "cores": 2, "isa": ["avx2"], "onnxruntime": "1"},
                  2, {"gbs_1t": 20.0, "gbs": 30.0}, note="note line")
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows), md
    assert all(line.count("|") == table[0].count("|") for line in table), md
    assert "10.0 (0.25×)" in md and "1.00 (0.25×)" in md, md
    assert "failed: build failed: boom" in md and "note line" in md and "30.0 GB/s" in md


def test_rounds_merge_to_medians_and_pair_round_by_round():
    """Interleaved rounds (run.py --rounds): timings are medians over the rounds, RSS the largest,
    accuracy from the round that measured it; a failed round is left out. Paired ratios divide
    within a round: a machine twice as slow in round 2 leaves them at 0.5 while the ratio of
    the medians would mix rounds."""
    ek = [{"prefill_p50_ms": 10.0, "decode_ms_ctx128": 1.0, "peak_rss_mb": 100, "accuracy": 0.5, "size_mb": 7},
          {"prefill_p50_ms": 20.0, "decode_ms_ctx128": 2.0, "peak_rss_mb": 120, "accuracy": None, "size_mb": 7},
          {"error": "timed out"},
          {"prefill_p50_ms": 40.0, "decode_ms_ctx128": 4.0, "peak_rss_mb": 90, "accuracy": None, "size_mb": 7}]
    row = merge_rounds(ek)
    assert row["prefill_p50_ms"] == 20.0 and row["decode_ms_ctx128"] == 2.0 and row["peak_rss_mb"] == 120
    assert row["accuracy"] == 0.5 and row["rounds"][2] is None and len(row["rounds"]) == 4
    assert merge_rounds([{"error": "boom"}, {"error": "again"}])["error"] == "boom"
    assert "rounds" not in merge_rounds(ek[:1])                    # one round: the row as measured
    ll = [{"prefill_p50_ms": 20.0, "decode_ms_ctx128": 4.0}, {"prefill_p50_ms": 40.0, "decode_ms_ctx128": 1.0},
          {"prefill_p50_ms": 1.0, "decode_ms_ctx128": 1.0}, {"prefill_p50_ms": 80.0, "decode_ms_ctx128": 8.0}]
    rows = [{"model": "m", "variant": "edgekit-cpu4", **row},
            {"model": "m", "variant": "llama-q8_0", **merge_rounds(ll)}]
    p = paired_ratios(rows, "edgekit-cpu4", "llama-q8_0")["m"]          # round 3 failed on one side: unpaired
    assert p["prefill_p50_ms"] == {"median": 0.5, "min": 0.5, "max": 0.5, "rounds": 3}
    assert p["decode_ms_ctx128"]["median"] == 0.5 and p["decode_ms_ctx128"]["max"] == 2.0
    assert "prefill_p95_ms" not in p                              # not measured: no ratio
    assert "prefill p50 0.50 [0.50-0.50]" in paired_note({"m": p}, "edgekit-cpu4", "llama-q8_0")
    rows[1]["rounds"] = rows[1]["rounds"][:2]                      # rounds that do not line up: no pairing
    assert paired_ratios(rows, "edgekit-cpu4", "llama-q8_0") == {}


def test_rounds_plot_draws_rounds_and_refuses_a_run_without_them(tmp_path):
    from benchmarks.rounds_plot import main, plot

    rounds = [{"prefill_p50_ms": 10.0, "decode_ms_ctx128": 1.0}, None, {"prefill_p50_ms": 12.0}]
    doc = {"threads": 4, "settings": {"rounds": 3}, "host": {"cpu_model": "X"},
           "rows": [{"model": "m", "variant": "edgekit-cpu4", "rounds": rounds}],
           "paired_ratios": {"m": {"prefill_p50_ms": {"median": 0.5, "min": 0.4, "max": 0.6, "rounds": 2}}}}
    out = tmp_path / "r.png"
    assert plot(doc, out) and out.read_bytes()[:4] == b"\x89PNG"
    assert not plot({"rows": [{"model": "m", "variant": "v"}]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    src = tmp_path / "one.json"
    src.write_text(json.dumps({"rows": [{"model": "m", "variant": "v"}]}))
    assert main([str(src)]) == 2 and main([str(tmp_path / "missing.json")]) == 2


def test_llama_server_repacking_abort_is_retried_without_repacking(tmp_path):
    """A server that dies at start with llama.cpp's repacking abort: start() says so with its log, and
    only llama-server (not yet --no-repack) is started again with --no-repack."""
    import sys

    from benchmarks.load_test import ServerExited, free_port, no_repack_retry, start

    die = [sys.executable, "-c", "print('ggml-backend.cpp:1294: GGML_ASSERT(*cur_backend_id != -1) failed'); "
                                 "raise SystemExit(134)"]
    with pytest.raises(ServerExited) as e:
        start(die, free_port(), tmp_path / "server.log")
    assert no_repack_retry("llama-server", die, e.value.log) == [*die, "--no-repack"]
    assert no_repack_retry("llama-server", [*die, "--no-repack"], e.value.log) is None
    assert no_repack_retry("edgekit", die, e.value.log) is None
    assert no_repack_retry("llama-server", die, "bind: address already in use") is None
