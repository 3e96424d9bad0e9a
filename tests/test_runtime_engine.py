"""edgekit.runtime.Engine on a tiny random bundle: greedy parity with OrtModel and reference.json,
streaming = generate, byte-level detokenization, stop strings, context limits, clear errors, and
generation in a subprocess where ``import torch`` fails."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import EdgekitError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_SRC = ROOT / "edgekit" / "data" / "v3-nano"
RECIPE = '[target]\nname = "tiny"\nthreads = 1\nspinning = false\n\n[goals]\nlatency_prefill_p95_ms = 5000.0\n' \
         'latency_decode_p95_ms = 1000.0\nprefill_tokens = 16\n'
PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Config:\n    def __init__(self"]


def build_tiny_bundle(out: Path, max_positions: int = 96, n: int = 8, moe: str = "contrib",
                      int8: bool = False) -> Path:
    """A bundle as ``edgekit compress`` lays it out, from a tiny random model (fp32; ``int8``: every
    linear, the embedding and the experts (row-wise QMoE) int8, routers fp32, as the cpu4 recipe)."""
    from tokenizers import Tokenizer

    from edgekit.bundle import write_manifest
    from edgekit.export import ExportConfig, export
    from edgekit.runtime.session import OrtModel
    from tests.conftest import tiny_model

    tok = Tokenizer.from_file(str(TOKENIZER_SRC / "tokenizer.json"))
    model = tiny_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=max_positions)
    export(model, out.with_name(out.name + "-fp32") if int8 else out, ExportConfig(moe=moe),
           tokenizer_from=TOKENIZER_SRC)
    if int8:
        from edgekit.quantize import Plan, quantize_export
        from edgekit.quantize.apply import quantizable_units, read_spec
        src = out.with_name(out.name + "-fp32")
        units = quantizable_units(read_spec(src))
        quantize_export(src, out, Plan(int8={u for u in units if not u.endswith("mlp.gate")}))
    (out / "recipe.toml").write_text(RECIPE)
    m, cases = OrtModel(out), []
    for p in PROMPTS:
        ids = np.asarray([tok.encode(p).ids], np.int64)
        gen = m.generate_greedy(ids, n)
        cases.append({"prompt": p, "prompt_ids": ids[0].tolist(), "greedy_ids": gen[0, ids.shape[1]:].tolist(),
                      "last_logits_top5": np.argsort(-m.logits(ids)[0, -1])[:5].tolist()})
    (out / "reference.json").write_text(json.dumps({"max_new_tokens": n, "cases": cases}))
    spec = json.loads((out / "export.json").read_text())
    write_manifest(out, model_name="tiny", target="tiny", features=["onnx"], hardware_recommendation="any",
                   io_spec={k: spec.get(k) for k in ("graph", "inputs", "outputs", "cache", "moe",
                                                      "max_position_embeddings", "vocab_size")},
                   extra={"threads": 1, "spinning": False})
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("rt") / "bundle")


@pytest.fixture(scope="module")
def engine(bundle):
    from edgekit.runtime import Engine
    return Engine.from_bundle(bundle)


def test_greedy_matches_reference_and_threads_come_from_recipe(engine, bundle):
    ref = json.loads((bundle / "reference.json").read_text())
    assert (engine.threads, engine.spinning) == (1, False)
    for case in ref["cases"]:
        text = engine.generate(case["prompt"], max_new_tokens=ref["max_new_tokens"], stop_at_eos=False)
        want = engine.tokenizer.decode(case["greedy_ids"])
        assert text == want, f"prompt {case['prompt']!r}: engine {text!r} vs reference {want!r}"
    assert engine.get_version_info()["model_name"] == "tiny"


def test_stream_concatenates_to_generate_and_sampling_is_seeded(engine):
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.8, seed=3, stop_at_eos=False)
    pieces = list(engine.stream("import os\n", **kw))
    assert "".join(pieces) == engine.generate("import os\n", **kw), pieces
    assert engine.generate("import os\n", **kw) == engine.generate("import os\n", **kw)


def test_textstream_holds_split_utf8_and_stop_prefixes(engine):
    from edgekit.runtime import TextStream

    tok = engine.tokenizer
    text = "ok é 😀 done\nEND tail"
    ids = tok.encode(text, add_special_tokens=False).ids
    ts = TextStream(tok)
    pieces = [ts.push(i) for i in ids] + [ts.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces), pieces
    ts = TextStream(tok, stop=("\nEND",))
    out = "".join(ts.push(i) for i in ids if not ts.stopped) + ts.flush()
    assert ts.stopped and out == "ok é 😀 done", repr(out)


def test_sample_filters():
    from edgekit.runtime import GenerationConfig, sample

    logits = np.array([0.0, 5.0, 4.9, -3.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, GenerationConfig(), rng) == 1
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}, picks
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_p=0.3), rng) for _ in range(50)}
    assert picks == {1}, picks


@pytest.mark.parametrize("kw, fix", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(truncate="mid"), "truncate"),
    (dict(stop=[""]), "stop"),
])
def test_bad_settings_raise_one_line_errors(engine, kw, fix):
    with pytest.raises(EdgekitError, match=fix) as e:
        engine.generate("hello", **kw)
    assert "\n" not in str(e.value)


def test_empty_and_too_long_prompts(engine):
    with pytest.raises(EdgekitError, match="empty"):
        engine.generate("")
    long = "word " * 200                                  # > 96 positions
    with pytest.raises(EdgekitError, match="truncate='left'"):
        engine.generate(long, max_new_tokens=8)
    with pytest.raises(EdgekitError, match="lower max_new_tokens"):
        engine.generate("hi", max_new_tokens=engine.max_positions)
    ids = engine.encode(long)
    from edgekit.runtime import GenerationConfig
    fitted = engine.fit(ids, GenerationConfig(max_new_tokens=8, truncate="left"))
    assert fitted == ids[-(engine.max_positions - 8):]
    assert isinstance(engine.generate(long, max_new_tokens=8, truncate="left", stop_at_eos=False), str)


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    from edgekit.runtime import Engine

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "reference.json").write_text("{}")
    with pytest.raises(EdgekitError, match="manifest hash"):
        Engine.from_bundle(bad)


def test_session_config_comes_from_recipe(bundle, tmp_path):
    """A bundle's [target] session_config reaches onnxruntime wherever it runs: the Engine and the
    benchmarks' runner (run.py's edgekit rows); a malformed one is a one-line error."""
    import shutil

    from benchmarks.runners import OrtEdgekitRunner
    from edgekit.runtime import Engine

    d = tmp_path / "cfg"
    shutil.copytree(bundle, d)
    want = {"session.dynamic_block_base": "4"}
    (d / "recipe.toml").write_text(RECIPE.replace("spinning = false\n", "spinning = false\n"
                                                  'session_config = { "session.dynamic_block_base" = "4" }\n'))
    assert Engine.from_bundle(d, verify=False).model.session_config == want
    assert OrtEdgekitRunner(d, threads=1).m.session_config == want
    assert OrtEdgekitRunner(bundle, threads=1).m.session_config == {}
    (d / "recipe.toml").write_text(RECIPE.replace("spinning = false\n", "spinning = false\n"
                                                  'session_config = { "session.dynamic_block_base" = 4 }\n'))
    for load in (lambda: Engine.from_bundle(d, verify=False), lambda: OrtEdgekitRunner(d, threads=1)):
        with pytest.raises(EdgekitError, match="session_config must map names to strings"):
            load()
    (d / "recipe.toml").write_text('target = "cpu4"\n')
    with pytest.raises(EdgekitError, match=r"\[target\] is not a table"):
        Engine.from_bundle(d, verify=False)


NO_TORCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, Block())
    from edgekit.runtime import Engine
    e = Engine.from_bundle(sys.argv[1])
    print(repr(e.generate(sys.argv[2], max_new_tokens=8, stop_at_eos=False)))
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch got imported"
""")


def test_engine_generates_without_torch(engine, bundle):
    p = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle), PROMPTS[0]], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    want = engine.generate(PROMPTS[0], max_new_tokens=8, stop_at_eos=False)
    assert p.stdout.strip().splitlines()[-1] == repr(want), (p.stdout, want)


def test_runtime_tests_suite_passes_on_a_bundle(bundle):
    """runtime_tests/ standalone on the tiny bundle (1 thread: latency is checked, not skipped)."""
    cmd = [sys.executable, "-m", "pytest", "runtime_tests", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider"]
    p = subprocess.run(cmd + ["--bundle", str(bundle), "--max-rss-mb", "4096"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0 and "5 passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]
    bare = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bare.returncode == 0 and "6 skipped" in bare.stdout, bare.stdout[-2000:]
