"""The mobile format (edgekit/mobile.py): operator lists, the mobile operator profile, the .ort model
and reduced-operator config written by onnxruntime's converter."""

import json
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from edgekit.errors import EdgekitError
from edgekit.export import ExportConfig, export
from edgekit.mobile import _config_ops, graph_operators, outside_profile, prepare_bundle

from .conftest import tiny_model

MOBILE = SimpleNamespace(name="mobile-arm64", ops="mobile", format="ort")


def test_portable_export_becomes_ort_with_operator_config(tmp_path):
    d = export(tiny_model(), tmp_path / "b", ExportConfig(moe="portable"))
    info = prepare_bundle(d, MOBILE)
    assert (d / "model.ort").stat().st_size > 0 and (d / "required_operators.config").exists()
    assert "If" in info["operators"]["ai.onnx"] and "Loop" in info["operators"]["ai.onnx"], info["operators"]
    assert info["ort_operators"] == _config_ops((d / "required_operators.config").read_text())
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ids = np.arange(1, 12, dtype=np.int64)[None]
    outs = []
    for f in ("model.onnx", "model.ort"):
        s = ort.InferenceSession(str(d / f), so, providers=["CPUExecutionProvider"])
        feed = {i.name: ids if i.name == "input_ids" else np.zeros((1, 0, i.shape[2]), np.float32)
                for i in s.get_inputs() if i.name != "logits_keep"}
        outs.append(s.run(["logits"], feed)[0])
    d_max = np.abs(outs[0] - outs[1]).max()
    assert d_max < 1e-4, f".ort vs .onnx logits max diff {d_max:.2e}"


def test_contrib_moe_is_refused_for_the_mobile_profile(tmp_path):
    d = export(tiny_model(), tmp_path / "c", ExportConfig(moe="contrib"))
    spec = json.loads((d / "export.json").read_text())
    import onnx
    ops = graph_operators(onnx.load(str(d / spec["graph"])))
    assert outside_profile(ops, "mobile") == ["com.microsoft:MoE"], ops
    assert outside_profile(ops, "full") == []
    with pytest.raises(EdgekitError, match="MoE.*moe = \"portable\""):
        prepare_bundle(d, MOBILE)
    assert not (d / "model.ort").exists()


def test_config_parser():
    text = "# generated\nai.onnx;13;Add,MatMul\nai.onnx;16;If\ncom.microsoft;1;MatMulIntegerToFloat\n"
    assert _config_ops(text) == {"ai.onnx": ["Add", "If", "MatMul"], "com.microsoft": ["MatMulIntegerToFloat"]}
