"""Layer-by-layer export (one layer in memory, weights appended to external data) gives the same
graph outputs as the single-trace export, names its units, and reads fp8 checkpoints."""

import json

import numpy as np
import onnx
import pytest
import torch

from edgekit.checkpoint import load
from edgekit.export import ExportConfig, export
from edgekit.export.layered import export_layered
from edgekit.quantize.emulate import units
from edgekit.runtime.session import OrtModel


@pytest.mark.parametrize("moe", ["contrib", "portable"])
def test_layered_export_equals_single_trace(tiny, tiny_ckpt, tmp_path, moe):
    cfg = ExportConfig(moe=moe, simplify=False, external_data_threshold=1000)   # force external data
    mono = OrtModel(export(tiny, tmp_path / "mono", cfg))
    d = export_layered(tiny_ckpt, tmp_path / "lay", cfg)
    lay = OrtModel(d)
    assert (d / "model.onnx.data").stat().st_size > 0.9 * sum(p.numel() * 4 for p in tiny.parameters())
    ids = np.random.default_rng(0).integers(0, 128, (2, 19))
    a, b = mono.logits(ids), lay.logits(ids)
    with torch.no_grad():
        ref = tiny(torch.from_numpy(ids)).numpy()
    print(f"{moe}: layered vs single-trace {np.abs(a - b).max():.2e}, vs torch {np.abs(b - ref).max():.2e}")
    assert np.abs(a - b).max() <= 1e-6 and np.abs(b - ref).max() <= 1e-4
    assert (mono.generate_greedy(ids[:1, :6], 10) == lay.generate_greedy(ids[:1, :6], 10)).all()
    rows = [ids[0, :7].tolist(), ids[1].tolist()]            # left-padded rows: the row attention path
    pa, pb = mono.prefill_rows(rows)[0], lay.prefill_rows(rows)[0]
    assert np.abs(pa - pb).max() <= 1e-6
    spec = json.loads((d / "export.json").read_text())
    mono_spec = json.loads((tmp_path / "mono" / "export.json").read_text())
    # the same unit map (names -> ops and initializers) and model hash as the single trace; only
    # node names differ (each piece's nodes live under its own prefix)
    assert {u: (e["op"], e["weights"]) for u, e in spec["units"].items()} == \
        {u: (e["op"], e["weights"]) for u, e in mono_spec["units"].items()}
    assert spec["model_hash"] == mono_spec["model_hash"] and spec["layered"]
    want = {n for n in units(tiny) if not n.endswith("kv_b_proj")}   # kv_b_proj lives on as absorbed products
    assert want <= set(spec["units"]), sorted(want - set(spec["units"]))
    if moe == "contrib":
        assert [m["layer"] for m in spec["moe_nodes"]] == [1, 2]
    # each piece took B, T, P from its own inputs; all shape nodes now read layer 0's (share_shapes),
    # so onnxruntime merges the copies (the logits above are unchanged)
    shapes = [n.input[0] for n in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node
              if n.op_type == "Shape"]
    readers = {s for s in shapes if s.endswith("/x_in") or s.startswith("past_latent.")}
    assert readers and readers <= {"/layers.0/x_in", "past_latent.0"}, sorted(readers)


def test_layered_export_of_fp8_checkpoint(tmp_path):
    from edgekit.synth import synth

    d = synth("v3-nano", tmp_path / "f8", seed=2, dtype="fp8", shard_bytes=8 << 20)
    cfg = ExportConfig(simplify=False)
    e = export_layered(d, tmp_path / "onnx", cfg, tokenizer_from=d)
    assert (e / "tokenizer.json").exists()
    m = load(d)
    ids = np.random.default_rng(1).integers(0, 4096, (1, 24))
    with torch.no_grad():
        ref = m(torch.from_numpy(ids)).numpy()
    diff = np.abs(OrtModel(e).logits(ids) - ref).max()
    print(f"fp8 checkpoint, layered export vs torch: {diff:.2e}")
    assert diff <= 1e-4


def test_layered_export_streams_every_weight_and_leaves_a_model_whole(tiny, tmp_path):
    """external_data_threshold=0 (the streamed pipeline's export): every weight is in
    model.onnx.data, the graph file holds none; an in-memory model keeps all its modules (only
    layers read from a checkpoint for the step are trimmed)."""
    import onnx

    from edgekit.heap import release

    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    d = export_layered(tiny, tmp_path / "ext", ExportConfig(simplify=False, external_data_threshold=0))
    after = tiny.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    g = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    inline = [t.name for t in g.initializer if len(t.raw_data) >= 1024]
    external = [t.name for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    print(f"{len(external)} external initializers, inline >= 1 KB: {inline}")
    assert not inline and (d / "model.onnx.data").stat().st_size > 0.9 * sum(v.numel() * 4 for v in before.values())
    assert json.loads((d / "export.json").read_text())["external_data"] is True
    ids = np.random.default_rng(3).integers(0, 128, (1, 9))
    with torch.no_grad():
        ref = tiny(torch.from_numpy(ids)).numpy()
    assert np.abs(OrtModel(d).logits(ids) - ref).max() <= 1e-4
    assert isinstance(release(), bool)


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_weightless_trace_writes_the_weights_the_exporter_would(tiny_ckpt, tmp_path, monkeypatch, threshold):
    """Each piece is traced without its weights and they are written from the module's tensors; the
    safety net (every piece traced with its weights in the protobuf, as torch writes them) must give
    the same files byte for byte, external data or inline."""
    import edgekit.export.layered as lay

    cfg = ExportConfig(simplify=False, external_data_threshold=threshold)
    a = export_layered(tiny_ckpt, tmp_path / "weightless", cfg)
    monkeypatch.setattr(lay, "_ONNX_TYPES", {})                  # no dtype carried: every piece falls back
    b = export_layered(tiny_ckpt, tmp_path / "traced", cfg)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and ("model.onnx.data" in files) == (threshold == 0)
    differ = [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()]
    print("files that differ:", differ)
    assert not differ
