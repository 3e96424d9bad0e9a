"""End to end: `edgekit compress` on a tiny V3 checkpoint with a user recipe -> bundle, report, exit codes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgekit.bundle import get_version_info, verify
from edgekit.checkpoint import load_tokenizer, reference_model_dir, save
from edgekit.data import load_tokens
from edgekit.errors import EdgekitError
from edgekit.pipeline import compress

from .conftest import tiny_model

RECIPE = """
[target]
name = "tiny-{threads}"
threads = {threads}
hardware_recommendation = "anything"

[goals]
accuracy_drop = 0.99
accuracy_drop_relative = 0.99
latency_prefill_p95_ms = {prefill}
latency_decode_p95_ms = 1000.0
size_ratio = 0.9
prefill_tokens = 16

[data]
ood_max_tokens = 600

[validate]
warmup = 1
runs = 2
decode_tokens = 4
eval_max_tokens = 600
seq_len = 64

[prune]
experts = 0.25
recover_steps = 2
recover_seq_len = 32
calib_seq_len = 64

[auto]
dev_tokens = 2048

[auto.candidates]
"int8" = {{ prune = {{ experts = 0.0 }} }}
"int8+experts25" = {{ prune = {{ experts = 0.25 }} }}
"int8+experts50" = {{ prune = {{ experts = 0.5 }} }}
"int8+ffn25" = {{ prune = {{ experts = 0.0, ffn = 0.25 }} }}

[export]
moe = "contrib"

[quantize]
calib_max_tokens = 512
seq_len = 64
max_ort_rounds = 1
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    return save(tiny_model(vocab_size=4096, max_position_embeddings=128), d / "tiny",
                tokenizer_from=reference_model_dir())


def _recipe(tmp_path, threads=1, prefill=1000.0):
    f = tmp_path / f"r{threads}_{prefill}.toml"
    f.write_text(RECIPE.format(threads=threads, prefill=prefill))
    return str(f)


def test_compress_writes_a_valid_bundle(ckpt, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache_dir))
    res = compress(ckpt, _recipe(tmp_path), out=tmp_path / "bundle")
    b = res.bundle
    names = {p.name for p in b.iterdir()}
    assert {"model.onnx", "tokenizer.json", "recipe.toml", "manifest.json", "report.json", "report.html",
            "reference.json", "export.json"} <= names
    verify(b)
    r = json.loads((b / "report.json").read_text())
    assert set(r["gates"]) == {"accuracy_drop", "accuracy_drop_relative", "latency_prefill_p95_ms",
                               "latency_decode_p95_ms", "size_ratio"}
    g = r["gates"]
    base = r["baseline"]["accuracy"]
    assert g["accuracy_drop_relative"]["value"] == pytest.approx(g["accuracy_drop"]["value"] / base if base else 0)
    assert r["gates"]["size_ratio"]["value"] < 0.5, "int8 + pruning must shrink the graph"
    assert r["stages"][1]["params"] < r["stages"][0]["params"], "pruning must remove parameters"
    assert res.exit_code == 0 and r["status"] == "pass", r["gates"]
    info = get_version_info(b)
    assert info["hardware_recommendation"] == "anything" and any("int8" in f for f in info["features"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], "no temp dirs left behind"
    # a re-run resumes from the stage cache
    again = compress(ckpt, _recipe(tmp_path), out=tmp_path / "bundle")
    assert {"prune", "export", "quantize"} <= set(again.report["stage_cache_hits"])


def test_corrupt_cache_entries_are_rebuilt_never_used(ckpt, tmp_path, monkeypatch, cache_dir, capsys):
    """Issue "Trust boundaries" item 2: a cached int8 model with a zeroed span and a baseline meta.json
    with an edited accuracy are both rebuilt (with a warning); the bundle is built from intact files."""
    from edgekit.bundle import sha256

    monkeypatch.setenv("EDGEKIT_CACHE", str(cache_dir))
    first = compress(ckpt, _recipe(tmp_path), out=tmp_path / "b1")
    model = next(d for d in (cache_dir / "quantize").iterdir()
                 if (d / "model.onnx").exists() and sha256(d / "model.onnx") == sha256(first.bundle / "model.onnx"))
    data = bytearray((model / "model.onnx").read_bytes())
    half = len(data) // 2
    data[half // 2: half // 2 + half // 2] = bytes(half // 2)              # same size: only a hash can tell
    (model / "model.onnx").write_bytes(bytes(data))
    for meta in (cache_dir / "baseline").glob("*/meta.json"):
        m = json.loads(meta.read_text())
        meta.write_text(json.dumps({**m, "accuracy": m["accuracy"] + 0.5}))   # would turn a failing drop into a pass
    capsys.readouterr()
    again = compress(ckpt, _recipe(tmp_path), out=tmp_path / "b2")
    err = capsys.readouterr().err
    assert "stage cache entry quantize/" in err and "stage cache entry baseline/" in err, err
    hits = again.report["stage_cache_hits"]
    assert "quantize" not in hits and "baseline" not in hits and {"prune", "export"} <= set(hits), hits
    assert again.report["baseline"]["accuracy"] == first.report["baseline"]["accuracy"]
    verify(again.bundle)
    assert sha256(again.bundle / "model.onnx") == sha256(model / "model.onnx"), "built from the rebuilt entry"


def test_budget_that_cannot_be_met_exits_1_naming_the_gate(ckpt, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache_dir))
    res = compress(ckpt, _recipe(tmp_path, prefill=0.001), out=tmp_path / "b")
    assert res.exit_code == 1
    assert res.report["gates"]["latency_prefill_p95_ms"]["status"] == "fail"
    assert (res.bundle / "report.json").exists(), "the bundle is still written when a gate fails"


def test_latency_unverified_on_too_few_cores_never_pass(ckpt, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache_dir))
    res = compress(ckpt, _recipe(tmp_path, threads=512), out=tmp_path / "b")
    g = res.report["gates"]
    assert g["latency_prefill_p95_ms"]["status"] == g["latency_decode_p95_ms"]["status"] == "unverified"
    assert res.exit_code == 0
    strict = compress(ckpt, _recipe(tmp_path, threads=512), out=tmp_path / "b", strict=True)
    assert strict.exit_code == 1


def test_cli_bad_recipe_key_exits_2(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[target]\nname = "x"\n[prune]\nexpert = 0.5\n')
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", "compress", "--target", str(f)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown key prune.expert" in p.stderr and "Traceback" not in p.stderr


def test_auto_search_records_candidates_and_pareto_front(ckpt, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("EDGEKIT_CACHE", str(cache_dir))
    res = compress(ckpt, _recipe(tmp_path), out=tmp_path / "auto", auto=True)
    auto = res.report["auto"]
    assert len(auto["candidates"]) >= 4 and auto["pareto"], auto
    chosen = next(c for c in auto["candidates"] if c["name"] == auto["chosen"])
    passing = [c for c in auto["candidates"] if c["passed"]]
    assert chosen["size_ratio"] == min(c["size_ratio"] for c in passing), "smallest passing candidate wins"
    assert "Pareto" in (res.bundle / "report.html").read_text()
    # selection read the dev split: the calibration text's last 2048 tokens, held out of pruning
    calib = load_tokens("calib", load_tokenizer(ckpt))
    assert auto["dev"]["tokens"] == 2048 and res.report["pruning"]["calib_tokens"] == len(calib) - 2048


def test_auto_dev_split_is_the_calibration_tail_and_never_eval(ckpt):
    from edgekit.domains import plan_data
    from edgekit.pipeline import STAGE_CONFIGS, load_texts
    from edgekit.recipes import parse_recipe

    tok = load_tokenizer(ckpt)
    r = parse_recipe({"target": {"name": "t"}, "auto": {"dev_tokens": 1000}}, "r.toml", STAGE_CONFIGS)
    plan = plan_data(ckpt, r, None, None, None)
    plain, auto = load_texts(ckpt, tok, r, plan, False), load_texts(ckpt, tok, r, plan, True)
    assert plain.dev is None and np.array_equal(np.concatenate([auto.calib, auto.dev]), plain.calib)
    assert len(auto.dev) == 1000 and np.array_equal(auto.recover, auto.calib)   # distillation never reads dev
    assert np.array_equal(auto.eval, plain.eval)
    small = parse_recipe({"target": {"name": "t"}, "auto": {"dev_tokens": len(plain.calib)}}, "r.toml", STAGE_CONFIGS)
    with pytest.raises(EdgekitError, match="dev_tokens"):
        load_texts(ckpt, tok, small, plan, True)
    # a targeted domain selects on its shipped dev split instead (disjoint from its calib and eval)
    dom = load_texts(ckpt, tok, r, plan_data(ckpt, r, "c", None, None), True)
    assert np.array_equal(dom.dev, load_tokens("c/dev", tok)) and np.array_equal(dom.calib, load_tokens("c/calib", tok))
    # [data] recover = "train": distillation reads the domain's whole training text; an explicit --recover wins
    tr = parse_recipe({"target": {"name": "t"}, "data": {"domain": "python", "recover": "train"}}, "r.toml",
                      STAGE_CONFIGS)
    assert plan_data(ckpt, tr, None, None, None).recover == "python/train"
    assert plan_data(ckpt, tr, None, None, "my.txt").recover == "my.txt"
    assert plan_data(ckpt, tr, "c", None, "my.txt").recover == "my.txt"


def test_target_domain_sets_the_text_and_reports_other_domains(ckpt, tmp_path, monkeypatch, cache_dir):
    import shutil

    from edgekit.checkpoint import load, load_tokenizer
    from edgekit.data import load_tokens
    from edgekit.evaluate import evaluate

    monkeypatch.setenv("EDGEKIT_CACHE", str(cache_dir))
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    (ck / "training.json").write_text(json.dumps({"domains": ["python", "c", "prose"]}))
    res = compress(ck, _recipe(tmp_path), calib="c", out=tmp_path / "dom")
    r = res.report
    dom = r["domains"]
    assert (dom["target"], dom["eval"], dom["calib"], dom["recover"], dom["dev"]) == (
        "c", "c/eval", "c/calib", "c/recover", "c/dev")
    assert set(dom["out_of_domain"]) == {"python", "prose"}, "the other trained domains are reported"
    want = evaluate(load(ck), load_tokens("c/eval", load_tokenizer(ck), 600), seq_len=64, progress=False).accuracy
    assert r["baseline"]["accuracy"] == pytest.approx(want), "the gate reads the target domain's eval split"
    for d, o in dom["out_of_domain"].items():
        assert o["drop_points"] == pytest.approx(o["fp32_accuracy"] - o["accuracy"]), d
        assert 0 < o["tokens"] <= 600
    assert dom["gated"]["drop_points"] == r["gates"]["accuracy_drop"]["value"]
    assert 'domain = "c"' in (res.bundle / "recipe.toml").read_text(), "the applied recipe names the domain"
