"""`edgekit compress --stream` (one layer in memory per stage) builds the same bundle as the in-memory
pipeline on a tiny model: same accuracies, same int8 weights, same logits; refuses what it cannot do."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekit.checkpoint import reference_model_dir, save
from edgekit.pipeline import compress
from edgekit.runtime.session import OrtModel

from .conftest import tiny_model

RECIPE = """
[target]
name = "tiny"
threads = 1
hardware_recommendation = "anything"

[goals]
accuracy_drop = 0.99
latency_prefill_p95_ms = 1000.0
latency_decode_p95_ms = 1000.0
size_ratio = 0.9
prefill_tokens = 16

[validate]
warmup = 1
runs = 2
decode_tokens = 4
eval_max_tokens = 600
seq_len = 64

[prune]
experts = 0.25
heads = 0.25
recover_steps = {steps}
calib_seq_len = 64

[export]
moe = "contrib"

[quantize]
calib_max_tokens = 512
seq_len = 64
moe = "row"
max_ort_rounds = 1

[build]
device = "cpu"
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    m = tiny_model(vocab_size=4096, max_position_embeddings=128)
    return save(m, d / "tiny", tokenizer_from=reference_model_dir())


def _int8_weights(d):
    p = onnx.load(str(d / "model.onnx"))
    return sorted(hashlib.sha1(numpy_helper.to_array(t).tobytes()).hexdigest()
                  for t in p.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                  and np.prod(t.dims) > 1)


@pytest.mark.slow
def test_streamed_compress_builds_the_same_bundle(ckpt, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(steps=0))
    mem = compress(ckpt, str(recipe), out=tmp_path / "mem", use_cache=False, stream=False)
    st = compress(ckpt, str(recipe), out=tmp_path / "st", use_cache=False, stream=True)
    a, b = mem.report, st.report
    print("in-memory", a["baseline"]["accuracy"], a["stages"][1]["accuracy"], a["compressed"]["accuracy"])
    print("streamed ", b["baseline"]["accuracy"], b["stages"][1]["accuracy"], b["compressed"]["accuracy"])
    assert b["streamed"] and b["devices"]["prune (streamed)"] == "cpu" and a["devices"]
    # random-init tiny model: accuracy is ~0, so perplexity is the sensitive reading
    print("perplexity fp32 / bundle:", a["baseline"]["perplexity"], b["baseline"]["perplexity"],
          a["compressed"]["perplexity"], b["compressed"]["perplexity"])
    assert a["baseline"] == {**a["baseline"], **{k: b["baseline"][k] for k in ("accuracy", "perplexity", "tokens")}}
    assert abs(a["stages"][1]["accuracy"] - b["stages"][1]["accuracy"]) <= 2 / a["compressed"]["tokens"]
    assert a["compressed"]["accuracy"] == b["compressed"]["accuracy"]
    assert a["compressed"]["perplexity"] == pytest.approx(b["compressed"]["perplexity"], rel=1e-5)
    # the layered fp32 graph is not onnxsim-simplified: a few % larger on this tiny model (graph vs weights)
    assert a["baseline"]["onnx_bytes"] == pytest.approx(b["baseline"]["onnx_bytes"], rel=0.05)
    assert a["pruning"]["params_after"] == b["pruning"]["params_after"]
    # the overrides' plan (no search) equals plan_'s when all-int8 is within the budget
    assert a["quantization"]["int8_units"] == b["quantization"]["int8_units"]
    assert a["quantization"]["fp32_units"] == b["quantization"]["fp32_units"]
    assert {g: r["alpha"] for g, r in a["smoothing"]["groups"].items()} == \
        {g: r["alpha"] for g, r in b["smoothing"]["groups"].items()}
    assert all(r.get("peak_rss_mb", 0) > 0 for r in b["timings"] if "skipped" not in r)
    assert _int8_weights(mem.bundle) == _int8_weights(st.bundle)
    ids = np.random.default_rng(0).integers(0, 4096, (2, 30))
    diff = np.abs(OrtModel(mem.bundle).logits(ids) - OrtModel(st.bundle).logits(ids)).max()
    print(f"bundle logits in-memory vs streamed: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert json.loads((st.bundle / "manifest.json").read_text())["features"][-1] == "streamed-pipeline"


def test_stream_refuses_distillation_exit_2(ckpt, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(steps=3))
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", "compress", str(ckpt), "--target", str(recipe),
                        "--stream", "--no-cache", "-o", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "recover_steps = 0" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
