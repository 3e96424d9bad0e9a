"""Bundle manifest/verification, report gates and HTML, device matrix."""

import json

import pytest

from edgekit.atomic import finalize, staging_dir
from edgekit.bundle import get_version_info, verify, write_manifest
from edgekit.devices import collect, matrix, to_markdown
from edgekit.errors import EdgekitError
from edgekit.host import emulation, latency_unverified_reason
from edgekit.recipes import Target
from edgekit.report import gate, overall, render_html

SPEC = {"format": "edgekit-onnx/1", "graph": "model.onnx", "num_layers": 1, "vocab_size": 8,
        "max_position_embeddings": 16, "inputs": [{"name": "input_ids"}], "outputs": [{"name": "logits"}],
        "cache": {"width": 4}}


def _bundle(tmp_path):
    out = tmp_path / "b"
    tmp = staging_dir(out)
    (tmp / "model.onnx").write_bytes(b"graph")
    (tmp / "tokenizer.json").write_text("{}")
    (tmp / "recipe.toml").write_text('[target]\nname = "cpu4"\n')
    (tmp / "export.json").write_text(json.dumps(SPEC))
    write_manifest(tmp, model_name="m", target="cpu4", features=["int8"], hardware_recommendation="4 cores",
                   io_spec={"inputs": ["input_ids"]})
    return finalize(tmp, out)


def test_bundle_is_atomic_and_verifiable(tmp_path):
    b = _bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "no temp dirs may be left behind"
    assert get_version_info(b)["features"] == ["int8"]
    verify(b)
    (b / "model.onnx").write_bytes(b"graf!")  # same size: only the hash can tell
    with pytest.raises(EdgekitError, match="hash"):
        verify(b)


def test_finalize_replaces_an_old_bundle_whole(tmp_path):
    _bundle(tmp_path)
    b = _bundle(tmp_path)
    assert (b / "manifest.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_gates_and_overall_status():
    g = {"a": gate(0.004, 0.008), "b": gate(200.0, 180.0)}
    assert g["a"]["status"] == "pass" and g["b"]["status"] == "fail" and overall(g) == "fail"
    g["b"] = gate(200.0, 180.0, unverified_reason="2 cores")
    assert g["b"]["status"] == "unverified" and overall(g) == "unverified"
    assert overall({"a": gate(0.0, 0.008)}) == "pass"


def test_latency_is_unverified_on_a_host_with_too_few_cores():
    t = Target(name="cpu4", threads=4)
    assert "2 usable cores" in latency_unverified_reason(t, {"cores": 2, "arch": "x86_64"})
    assert latency_unverified_reason(t, {"cores": 16, "arch": "x86_64"}) is None
    arm = Target(name="mobile", threads=4, arch="arm64")
    assert "arm64" in latency_unverified_reason(arm, {"cores": 16, "arch": "x86_64"})
    # an arm64 userland under qemu-user on an x86-64 CPU is the right arch but never a measurement of the device
    emu = emulation("aarch64", "flags", {"sse2", "avx2"})
    assert emu and "emulat" in latency_unverified_reason(arm, {"cores": 16, "arch": "aarch64", "emulated": emu})
    assert emulation("aarch64", "Features", {"asimd", "asimddp"}) is None
    assert emulation("x86_64", "flags", {"sse2"}) is None


def test_report_html_has_plots_and_gates():
    r = {"target": "cpu4", "status": "pass", "gates": {"latency_prefill_p95_ms": gate(50.0, 180.0)},
         "compressed": {"latency": {"prefill_ms": {"samples": [1.0, 2.0, 3.0]}, "decode_ms": {"samples": [1.0]}}},
         "stages": [{"name": "fp32", "accuracy": 0.5, "size_bytes": 100}], "host": {"cores": 2}}
    page = render_html(r)
    assert page.count("data:image/png;base64,") == 2 and "latency_prefill_p95_ms" in page


def test_device_matrix(tmp_path):
    for name, status in (("h200-16c", "pass"), ("laptop", "fail")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({
            "target": "cpu4", "status": status, "host": {"cpu_model": "X", "cores": 16, "isa": ["avx2"]},
            "gates": {"latency_decode_p95_ms": {"value": 3.0, "limit": 50, "status": status}}}))
    head, rows = matrix(collect(tmp_path))
    md = to_markdown(head, rows)
    assert "latency_decode_p95_ms" in head and len(rows) == 2 and "pass (3)" in md
    with pytest.raises(EdgekitError):
        collect(tmp_path / "nothing")


def test_validated_where_names_real_emulated_and_unrepresentative_hosts():
    from edgekit.devices import validated_where

    lat = lambda s: {"latency_prefill_p95_ms": {"status": s}, "accuracy_drop": {"status": "pass"}}  # noqa: E731
    runs = [{"_path": "phone", "target": "mobile-arm64", "host": {"cpu_model": "A", "cores": 8}, "gates": lat("pass")},
            {"_path": "qemu", "target": "mobile-arm64", "host": {"emulated": "arm64 on x86-64", "arch": "aarch64"},
             "gates": lat("unverified")},
            {"_path": "vm", "target": "cpu4", "host": {"cores": 2}, "gates": lat("unverified")}]
    w = validated_where(runs)
    assert w["mobile-arm64"][0].startswith("phone: real device") and "emulated" in w["mobile-arm64"][1]
    assert "cannot represent" in w["cpu4"][0] and "prefill unverified" in w["cpu4"][0]
