"""The device side never imports torch: ``edgekit validate`` on a bundle (including its latency
worker subprocess) and the runtime run with an import system that refuses torch, and every
device-side module imports there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# runtime, latency, host, bundle, report, the target/goals part of recipes, validate, and what they read
DEVICE_MODULES = ("edgekit", "edgekit.runtime", "edgekit.runtime.engine", "edgekit.runtime.session", "edgekit.latency",
                  "edgekit.host", "edgekit.bundle", "edgekit.report", "edgekit.report_text", "edgekit.recipes",
                  "edgekit.validate", "edgekit.evaluate", "edgekit.data", "edgekit.devices", "edgekit.errors",
                  "edgekit.atomic", "edgekit.cli")
NO_TORCH = '''import sys


class _NoTorch:
    """Raises on any attempt to import torch (installed by the device-side test)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} imported on the device side")
        return None


sys.meta_path.insert(0, _NoTorch())
'''
RECIPE = """[target]
name = "tiny"
threads = 1
spinning = false

[goals]
accuracy_drop = 0.99
latency_prefill_p95_ms = 5000.0
latency_decode_p95_ms = 1000.0
size_ratio = 2.0
prefill_tokens = 16

[validate]
warmup = 1
runs = 2
decode_tokens = 4
eval_max_tokens = 600
seq_len = 64
rounds = 2

[prune]
experts = 0.25
"""


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """A tiny bundle with a build-time report, and an environment whose Python refuses torch
    (``sitecustomize`` on PYTHONPATH, so subprocesses inherit it)."""
    from edgekit.bundle import baseline_digest, write_manifest
    from edgekit.validate import graph_bytes
    from tests.test_runtime_engine import build_tiny_bundle

    root = tmp_path_factory.mktemp("device")
    b = build_tiny_bundle(root / "bundle")
    (b / "recipe.toml").write_text(RECIPE)
    spec = json.loads((b / "export.json").read_text())
    baseline = {"accuracy": 0.0, "onnx_bytes": graph_bytes(b)}
    write_manifest(b, model_name="tiny", target="tiny", features=["onnx"], hardware_recommendation="any",
                   io_spec={k: spec.get(k) for k in ("graph", "inputs", "outputs")},
                   extra={"baseline_sha256": baseline_digest(baseline)})   # validate checks the baseline's hash
    (b / "report.json").write_text(json.dumps({"baseline": baseline}))
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "site"), str(ROOT)])}
    return b, env


def test_the_blocker_blocks(device):
    _, env = device
    p = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "imported on the device side" in p.stderr, p.stderr


def test_validate_and_runtime_run_without_torch(device, tmp_path):
    bundle, env = device
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", "validate", str(bundle), "--report-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["status"] == "pass" and r["compressed"]["tokens"] > 0, r["gates"]
    assert r["compressed"]["latency"]["prefill_ms"]["p50"] > 0          # the latency worker ran, torch-free too
    gate = r["gates"]["latency_prefill_p95_ms"]                            # in the recipe's 2 rounds
    assert len(gate["rounds_p95"]) == 2 and min(gate["rounds_p95"]) <= gate["value"] <= max(gate["rounds_p95"]), gate
    code = (f"import importlib, json, sys\nfrom edgekit.runtime import Engine\n"
            f"text = Engine.from_bundle({str(bundle)!r}).generate('def f(x):', max_new_tokens=4)\n"
            f"mods = [importlib.import_module(m).__name__ for m in {DEVICE_MODULES!r}]\n"
            "print(json.dumps({'text': text, 'torch': 'torch' in sys.modules, 'modules': len(mods)}))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["text"] and not out["torch"] and out["modules"] == len(DEVICE_MODULES), out


def test_the_int8_graph_pass_runs_without_torch(device, tmp_path):
    """``quantize_export`` is a pure pass over the fp32 graph keyed by export.json's unit names: it
    runs (and its output loads) where torch cannot be imported."""
    from edgekit.export import export
    from edgekit.quantize import Plan
    from edgekit.quantize.apply import quantizable_units
    from tests.conftest import tiny_model

    _, env = device
    src = export(tiny_model(), tmp_path / "fp32")
    units = quantizable_units(json.loads((src / "export.json").read_text()))
    Plan(int8=units, moe_path="grouped").save(tmp_path)
    code = ("import json, sys\nimport numpy as np\nfrom edgekit.quantize.apply import quantize_export\n"
            "from edgekit.runtime.session import OrtModel\n"
            f"rep = quantize_export({str(src)!r}, {str(tmp_path / 'int8')!r}, {str(tmp_path / 'plan.json')!r})\n"
            f"logits = OrtModel({str(tmp_path / 'int8')!r}).logits(np.arange(8, dtype=np.int64)[None])\n"
            "print(json.dumps({'int8': rep['int8_units'], 'finite': bool(np.isfinite(logits).all()), "
            "'torch': 'torch' in sys.modules}))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"int8": len(units), "finite": True, "torch": False}, out
