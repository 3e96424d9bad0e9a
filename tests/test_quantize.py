"""Symmetric int8: weight quantizers, the u8-offset activation trick on onnxruntime, the graph rewrite
end to end (same I/O, int8 close to fp32, emulation close to onnxruntime), overrides and the
accuracy-aware precision plan."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.export import export
from edgekit.quantize import Plan, QuantConfig, quantize_, quantize_export
from edgekit.quantize.emulate import emulated, fq, units
from edgekit.quantize.mixed import plan_precision, resolve_overrides
from edgekit.quantize.rewrite import quantize_blocks, quantize_sym, rewrite_linears
from edgekit.runtime.session import OrtModel
from edgekit.smooth import SmoothConfig

from .conftest import tiny_model


def test_weight_quantizers_symmetric_and_accurate():
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    q, s = quantize_sym(w, axis=1)                                  # per output row
    assert q.dtype == np.int8 and s.shape == (64,) and np.abs(q).max() <= 127
    err = np.abs(q * s[:, None] - w)
    assert (err <= s[:, None] / 2 + 1e-7).all(), f"rounding error over half a step: {err.max():.3e}"
    sqnr = 10 * np.log10((w ** 2).sum() / ((q * s[:, None] - w) ** 2).sum())
    assert sqnr > 35, f"per-channel int8 SQNR {sqnr:.1f} dB"
    qb, sb = quantize_blocks(w, 32)
    assert sb.shape == (64, 3)
    assert np.abs(-w - quantize_sym(-w, 1)[0] * s[:, None]).max() == pytest.approx(err.max())  # zero point 0


def _linear_graph(ws):
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(ws))]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(ws))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 48])],
                          outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_rewrite_matches_symmetric_int8_reference(merge, static):
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((48, n)).astype(np.float32) * 0.1 for n in (40, 24)]
    x = rng.standard_normal((2, 5, 48)).astype(np.float32)
    x[..., 7] *= 20                                                  # an outlier channel
    m = _linear_graph(ws)
    units_ = {"w0": "a", "w1": "b"}
    scales = {"a": float(np.abs(x).max()) * 1.1} if static else None
    done = rewrite_linears(m, units_, {"a", "b"}, scales, merge=merge, wmax=63.0)   # exact on any x86 kernel
    assert sorted(done) == ["a", "b"]
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulIntegerToFloat") == (1 if merge else 2) and ops.count("QuantizeLinear") == 1, ops
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    xt = torch.from_numpy(x)
    for w, y in zip(ws, got):
        xq = fq(xt, None if static else -1, scales["a"] if static else None)        # per token when dynamic
        ref = (xq @ fq(torch.from_numpy(w), dim=0, qmax=63.0)).numpy()
        d = np.abs(y - ref)
        assert d.max() < 1e-4, f"onnxruntime vs symmetric int8 reference: max {d.max():.2e} mean {d.mean():.2e}"


def test_overrides_exact_regex_default():
    names = ["lm_head", "model.layers.1.mlp.gate", "model.layers.0.self_attn.q_a_proj", "model.embed_tokens"]
    got = resolve_overrides(names, {"re:.*mlp\\.gate": "fp32", "lm_head": "fp32", "re:model\\..*": "int8",
                                    "_default": "fp32"})
    assert got == {"lm_head": "fp32", "model.layers.1.mlp.gate": "fp32",
                   "model.layers.0.self_attn.q_a_proj": "int8", "model.embed_tokens": "int8"}, got


def test_plan_reverts_most_sensitive_first():
    m = tiny_model()
    rows = np.random.default_rng(0).integers(0, 128, (4, 65))
    with torch.no_grad():                                           # make one unit fragile under int8
        m.model.layers[2].self_attn.o_proj.weight[:, 0] *= 400
    plan = plan_precision(m, rows, {"re:.*mlp\\.gate": "fp32"}, max_drop=0.0, rank_always=True, log=lambda *_: None)
    assert plan.sensitivity, "no sensitivity measured"
    top = max(plan.sensitivity, key=plan.sensitivity.get)
    reverted = [s["reverted"] for s in plan.steps if "reverted" in s]
    assert all(plan.sensitivity[a] >= plan.sensitivity[b] for a, b in zip(reverted, reverted[1:])), reverted
    assert plan.drop <= 0.0 or not plan.int8, f"budget not met: drop {plan.drop}"
    assert all("mlp.gate" in n for n, why in plan.fp32.items() if why == "override")
    assert plan.pinned_fp32 == {n for n, why in plan.fp32.items() if why == "override"} and plan.pinned_fp32
    if reverted:
        assert reverted[0] == top and top in plan.fp32


@pytest.mark.parametrize("moe,full", [("row", False), ("block", True), ("grouped", True), ("grouped+static", True)])
def test_quantize_end_to_end(tmp_path, moe, full):
    m = tiny_model()
    calib = np.random.default_rng(0).integers(0, 128, 600)
    static = moe.endswith("+static")           # grouped experts with calibrated activation scales
    moe = moe.split("+")[0]
    cfg = QuantConfig(moe=moe, seq_len=64, max_drop=0.05, calib_max_tokens=512, verify_ort=full,
                      expert_scales="static" if static else "dynamic")
    rep = quantize_(m, tmp_path / "q8", cfg, calib_tokens=calib, log=lambda *_: None,
                    smooth=SmoothConfig(enabled=full, calib_seq_len=64, calib_max_tokens=512))
    fp32 = export(m, tmp_path / "fp32")                             # the smoothed model, fp32
    spec8 = json.loads((tmp_path / "q8" / "export.json").read_text())
    spec32 = json.loads((fp32 / "export.json").read_text())
    assert spec8["inputs"] == spec32["inputs"] and spec8["outputs"] == spec32["outputs"]
    g8 = onnx.load(str(tmp_path / "q8" / "model.onnx")).graph
    ops = {n.op_type for n in g8.node}
    assert bool(rep["expert_scales"]) == static and rep["graph"]["expert_activation_scales"] == (
        "static" if static else "per token"), rep["graph"]
    grouped = [n.name for n in g8.node if re.match(r"^m\d+/", n.name)]      # moe_grouped's nodes (m<layer>/..)
    assert "MatMulIntegerToFloat" in ops and "MoE" not in ops, ops
    assert ("QMoE" in ops) == (moe != "grouped") and bool(grouped) == (moe == "grouped"), (ops, grouped[:3])
    assert set(rep["routing_agreement"]) == {"1", "2"}, rep["routing_agreement"]
    if full:
        assert rep["accuracy"]["ort"] and "top1_agreement" in rep["accuracy"]["ort"][-1], rep["accuracy"]
        assert all(v["alpha"] is None or 0 <= v["alpha"] <= 1 for v in rep["smoothing"].values())
    assert all(0.5 <= v <= 1 for v in rep["routing_agreement"].values()), rep["routing_agreement"]
    assert any("mlp.gate" in n for n in rep["fp32_units"]), rep["fp32_units"]
    ids = np.random.default_rng(1).integers(0, 128, (2, 24))
    a, b = OrtModel(fp32).logits(ids), OrtModel(tmp_path / "q8").logits(ids)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    # median: on this tiny random model one routing flip can wreck a single token (min is printed)
    assert np.median(cos) > 0.99 and cos.mean() > 0.95, \
        f"int8 vs fp32 logits cosine median {np.median(cos):.4f} mean {cos.mean():.4f} min {cos.min():.4f}"
    with emulated(m, {n for n in units(m) if n not in rep["fp32_units"]}, moe_block=rep["moe_block"],
                  experts_as_linears=moe == "grouped", wmax=rep["graph"]["weight_max"],
                  expert_scales=rep["expert_scales"] if static else None):
        with torch.no_grad():
            e = m(torch.from_numpy(ids)).numpy()
    d = np.abs(e - b)
    agree = (e.argmax(-1) == b.argmax(-1)).mean()
    # grouped experts quantize activations: a value on a rounding boundary can round the other way
    # in torch than in onnxruntime (fp32 summation order) and attention carries it to later tokens;
    # most logits still match exactly
    tol = {"row": 1e-3, "grouped": 0.05 * np.abs(a).max()}.get(moe, 0.1 * np.abs(a).max())
    assert d.max() < tol and agree >= 0.95, f"emulation vs onnxruntime: max {d.max():.2e} agree {agree:.3f}"
    if moe == "grouped":
        assert np.median(d) < 1e-5, f"emulation vs onnxruntime: median {np.median(d):.2e}"
    # decode through the cache still matches prefill on the int8 graph
    om = OrtModel(tmp_path / "q8")
    last, cache = om.prefill(ids[:1, :-1])
    step = om.decode(ids[:1, -1], cache)
    full = om.logits(ids[:1])[:, -1]
    # activation scales are per token, so decoding a token through the cache gives the logits that
    # prefilling it gives (up to fp32 summation order in attention)
    dd = np.abs(step - full).max() / np.abs(full).max()
    assert dd < 1e-3 and (step.argmax(-1) == full.argmax(-1)).all(), f"int8 decode vs prefill rel diff {dd:.2e}"
    ratio = rep["size_bytes"] / sum(p.stat().st_size for p in fp32.glob("model.onnx*"))
    limit = 0.65 if moe == "grouped" else 0.6       # grouped: ~30 graph nodes per expert weigh in on a tiny model
    assert ratio < limit, f"int8/fp32 size {ratio:.2f} (tiny model: fp32 RoPE tables and norms weigh in)"


def test_quantize_export_is_a_pass_keyed_by_unit_names(tmp_path):
    """The graph pass finds units by the names export.json records: exactly the planned ones change,
    the same plan writes the same bytes, and a unit the graph holds no op for is a one-line error."""
    d = export(tiny_model(), tmp_path / "fp32")
    spec = json.loads((d / "export.json").read_text())
    one, experts = "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.experts"
    plan = Plan(int8={one, experts}, moe_path="row")
    plan.save(tmp_path)
    assert Plan.load(tmp_path) == plan
    rep = quantize_export(d, tmp_path / "q8", tmp_path / "plan.json")
    assert rep["graph"]["linears_int8"] == 1 and rep["graph"]["moe"] == {experts: "row"}, rep["graph"]
    g = onnx.load(str(tmp_path / "q8" / "model.onnx")).graph
    names, ops = {n.name for n in g.node}, [n.op_type for n in g.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("QMoE") == 1 and ops.count("MoE") == 1, ops
    assert spec["units"][one]["node"] not in names
    kept = [u for u, e in spec["units"].items() if e["op"] == "MatMul" and u != one]
    assert kept and all(spec["units"][u]["node"] in names for u in kept)
    quantize_export(d, tmp_path / "again", plan)
    assert (tmp_path / "q8" / "model.onnx").read_bytes() == (tmp_path / "again" / "model.onnx").read_bytes()
    with pytest.raises(EdgekitError, match="kv_b_proj") as e:
        quantize_export(d, tmp_path / "bad", Plan(int8={"model.layers.0.self_attn.kv_b_proj"}))
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("moe,path", [("contrib", "grouped"), ("portable", "row")])
def test_quantize_export_of_external_data_reads_weights_per_unit(tmp_path, moe, path):
    """An export whose weights are external data (large models, the layer-by-layer export) is
    quantized without loading them up front; the result equals the pass over the inline export."""
    from edgekit.export import ExportConfig
    from edgekit.quantize.apply import quantizable_units

    m = tiny_model()
    inline = export(m, tmp_path / "inline", ExportConfig(moe=moe, simplify=False))
    ext = export(m, tmp_path / "ext", ExportConfig(moe=moe, simplify=False, external_data_threshold=1000))
    assert (ext / "model.onnx.data").exists()
    spec = json.loads((inline / "export.json").read_text())
    plan = Plan(int8=quantizable_units(spec) - {u for u in spec["units"] if u.endswith("mlp.gate")},
                moe_path=path, wmax=63.0)
    a, b = quantize_export(inline, tmp_path / "qa", plan), quantize_export(ext, tmp_path / "qb", plan)
    assert a["graph"] == b["graph"] and (tmp_path / "qb" / "model.onnx.data").exists()
    assert not (tmp_path / "qa" / "model.onnx.data").exists()
    # the external pass spills each rewrite's weights as it goes; the graph holds the same tensors
    assert sorted(p.name for p in (tmp_path / "qb").iterdir()) == sorted(
        [p.name for p in (tmp_path / "qa").iterdir()] + ["model.onnx.data"])
    ga, gb = (onnx.load(str(tmp_path / q / "model.onnx")).graph for q in ("qa", "qb"))
    assert [n.name for n in ga.node] == [n.name for n in gb.node]
    assert {t.name: t.raw_data for t in ga.initializer} == {t.name: t.raw_data for t in gb.initializer}
    ids = np.random.default_rng(0).integers(0, 128, (2, 11))
    la, lb = OrtModel(tmp_path / "qa").logits(ids), OrtModel(tmp_path / "qb").logits(ids)
    print(f"{moe}: int8 from inline vs external export: max abs diff {np.abs(la - lb).max():.2e}")
    assert np.array_equal(la, lb)


def test_config_errors():
    with pytest.raises(ValueError, match="mode"):
        QuantConfig(mode="int4")
    with pytest.raises(ValueError, match="int8' or 'fp32"):
        QuantConfig(overrides={"lm_head": "fp16"})
    with pytest.raises(ValueError, match="max_drop"):
        QuantConfig(max_drop=-1)


def test_quantize_portable_experts_int8(tmp_path):
    """--export-moe portable: experts int8 inside the If/Loop subgraphs (the rewrite used to drop the
    weights those subgraphs read), a valid graph on onnxruntime, equal to the torch emulation and close to
    fp32 on prefill (Loop branch) and decode (gathered branch). Experts only, so the check is about them."""
    from edgekit.export import ExportConfig, export

    m = tiny_model()
    calib = np.random.default_rng(0).integers(0, 128, 600)
    cfg = QuantConfig(seq_len=64, max_drop=0.05, calib_max_tokens=512, verify_ort=True,
                      overrides={"re:.*mlp\\.experts": "int8", "_default": "fp32"})
    rep = quantize_(m, tmp_path / "q8", cfg, calib_tokens=calib, log=lambda *_: None,
                    smooth=SmoothConfig(enabled=False), export_config=ExportConfig(moe="portable"))
    assert rep["graph"]["moe"] == {"model.layers.1.mlp.experts": "w8-col", "model.layers.2.mlp.experts": "w8-col"}
    assert rep["moe_path"] == "portable", rep["moe_path"]          # not the contrib path [quantize] moe names
    proto = onnx.load(str(tmp_path / "q8" / "model.onnx"))
    onnx.checker.check_model(proto)
    assert not any(t.name.endswith(("fc1", "fc2")) for t in proto.graph.initializer), "fp32 experts left"
    q8 = [t for t in proto.graph.initializer if t.name.endswith(".q8")]
    assert len(q8) == 4 and all(t.data_type == TensorProto.INT8 for t in q8), [t.name for t in q8]
    assert not [n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")], "non-standard ops"
    fp32 = export(m, tmp_path / "fp32", ExportConfig(moe="portable"))
    ids = np.random.default_rng(1).integers(0, 128, (2, 24))
    a, b = OrtModel(fp32).logits(ids), OrtModel(tmp_path / "q8").logits(ids)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    # tiny random model: a routing flip can move one token (min printed); the rest must be near-exact
    assert np.median(cos) > 0.9999 and (cos < 0.99).sum() <= 1, \
        f"int8 vs fp32 portable logits cosine median {np.median(cos):.5f} min {cos.min():.4f}"
    with emulated(m, set(rep["graph"]["moe"]), experts_as_linears=True, expert_act_int8=False,
                  wmax=rep["graph"]["weight_max"]), torch.no_grad():
        e = m(torch.from_numpy(ids)).numpy()
    d = np.abs(e - b).max()
    assert d < 1e-3, f"emulation vs onnxruntime max abs diff {d:.2e}"
    om = OrtModel(tmp_path / "q8")                                  # decode: the gathered branch
    last, cache = om.prefill(ids[:1, :-1])
    step = om.decode(ids[:1, -1], cache)
    full = om.logits(ids[:1])[:, -1]
    assert np.abs(step - full).max() < 1e-3, f"int8 decode vs prefill max diff {np.abs(step - full).max():.2e}"


def test_failed_quantize_leaves_nothing(tmp_path, monkeypatch):
    import edgekit.runtime.session as session

    def broken(*a, **k):
        raise EdgekitError("onnxruntime cannot load the graph")
    monkeypatch.setattr(session, "OrtModel", broken)        # the planning step's onnxruntime check fails
    m = tiny_model()
    calib = np.random.default_rng(0).integers(0, 128, 600)
    with pytest.raises(EdgekitError):
        quantize_(m, tmp_path / "q8", QuantConfig(seq_len=64, calib_max_tokens=512), smooth=SmoothConfig(enabled=False),
                  calib_tokens=calib, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_unloadable_portable_graph_does_not_suggest_portable(tmp_path):
    """The load error names a fix, never the option the graph was already made with."""
    from edgekit.errors import EdgekitError
    from edgekit.export import ExportConfig, export

    d = export(tiny_model(), tmp_path / "p", ExportConfig(moe="portable"))
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekitError) as e:
        OrtModel(d)
    assert "cannot load" in str(e.value) and "moe='portable'" not in str(e.value), str(e.value)


@pytest.mark.parametrize("moe", ["contrib", "portable"])
def test_fp16_float_weights(tmp_path, moe):
    """float_weights = "fp16": every unit the plan keeps in float and no override pins to fp32 (here: the
    experts, absorbed attention, routers but one, the rest of the linears) is stored fp16 with a Cast to
    fp32. Two implementations: the graph pass on onnxruntime vs the fp32 graph whose initializers numpy
    rounded to fp16 (same kernels, so equal up to summation order); both close to fp32; the float bytes
    halve; the int8 units are untouched."""
    from edgekit.export import ExportConfig
    from edgekit.quantize.fp16 import store_fp16_

    m = tiny_model()
    d = export(m, tmp_path / "fp32", ExportConfig(moe=moe))
    spec = json.loads((d / "export.json").read_text())
    one, router = "model.layers.1.self_attn.o_proj", "model.layers.2.mlp.gate"
    plan = Plan(int8={one}, moe_path="row", float_weights="fp16", pinned_fp32={router})
    rep = quantize_export(d, tmp_path / "h", plan)
    f16 = rep["graph"]["fp16"]
    floats = [u for u in spec["units"] if u not in (one, router)]
    assert rep["graph"]["float_weights"] == "fp16" and f16["units"] == sorted(floats) and not f16["kept_fp32"], f16
    assert f16["initializers"] == sum(len(spec["units"][u]["weights"]) for u in floats), f16
    assert f16["bytes_fp16"] * 2 == f16["bytes_fp32"] > 0, f16
    proto = onnx.load(str(tmp_path / "h" / "model.onnx"))
    onnx.checker.check_model(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    for u in floats:
        for w in spec["units"][u]["weights"]:
            assert w not in inits and inits[w + ".f16"].data_type == TensorProto.FLOAT16, w
    pinned = spec["units"][router]["weights"][0]                      # an override's fp32 stays fp32 storage
    assert inits[pinned].data_type == TensorProto.FLOAT and pinned + ".f16" not in inits
    # the int8-only graph (same plan in fp32 storage): fp16 storage shrinks the file by the bytes saved
    rep32 = quantize_export(d, tmp_path / "f", Plan(int8={one}, moe_path="row", pinned_fp32={router}))
    assert "fp16" not in rep32["graph"] and rep32["size_bytes"] - rep["size_bytes"] >= 0.95 * f16["bytes_fp16"], \
        (rep32["size_bytes"], rep["size_bytes"], f16)
    # second implementation: the int8 graph with its float weights rounded by numpy, no Cast nodes
    ref = onnx.load(str(tmp_path / "f" / "model.onnx"))
    names = {w for u in floats for w in spec["units"][u]["weights"]}
    for t in ref.graph.initializer:
        if t.name in names:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32), t.name))
    onnx.save(ref, str(tmp_path / "f" / "model.onnx"))
    ids = np.random.default_rng(1).integers(0, 128, (2, 24))
    a, b, c = (OrtModel(p).logits(ids) for p in (tmp_path / "h", tmp_path / "f", d))
    diff = np.abs(a - b).max()
    assert diff < 1e-4 * np.abs(b).max(), f"fp16 storage vs numpy-rounded weights max abs diff {diff:.3e}"
    cos = (a * c).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(c, axis=-1)
    assert np.median(cos) > 0.9999 and (cos < 0.99).sum() <= 1, \
        f"fp16+int8 vs fp32 logits cosine median {np.median(cos):.5f} min {cos.min():.4f}"
    om = OrtModel(tmp_path / "h")                                   # decode reads the same weights
    last, cache = om.prefill(ids[:1, :-1])
    step = om.decode(ids[:1, -1], cache)
    assert np.abs(step - a[:1, -1]).max() < 1e-3, f"fp16 decode vs prefill {np.abs(step - a[:1, -1]).max():.2e}"
    # out of fp16's range: left fp32 and named, never saturated
    p2 = onnx.load(str(d / "model.onnx"))
    w0 = spec["units"][one]["weights"][0]
    t = next(t for t in p2.graph.initializer if t.name == w0)
    big = numpy_helper.to_array(t).copy()
    big[0, 0] = 1e6
    t.CopyFrom(numpy_helper.from_array(big, w0))
    s = store_fp16_(p2, [w0])
    assert s["kept_fp32"] == [w0] and s["initializers"] == 0, s


def test_float_weights_config():
    with pytest.raises(ValueError, match="float_weights"):
        QuantConfig(float_weights="bf16")
    with pytest.raises(ValueError, match="float_weights"):
        Plan(int8=set(), float_weights="int4")


def test_expert_scales_cover_experts_calibration_never_reached():
    from edgekit.quantize.emulate import expert_absmax

    m = tiny_model()
    layer = next(i for i, b in enumerate(m.model.layers) if hasattr(b.mlp, "experts"))
    gate = m.model.layers[layer].mlp.gate
    with torch.no_grad():
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias[0] = -1e9          # expert 0 is never chosen
        gate.weight[0] = 0.0
    rows = np.random.default_rng(0).integers(0, 128, (4, 33))
    x_amax, h_amax = expert_absmax(m, rows)[f"model.layers.{layer}.mlp.experts"]
    assert x_amax > 0 and all(h > 0 for h in h_amax), h_amax
    assert h_amax[0] == max(h_amax), "an unreached expert gets its layer's largest range, not 0"
