"""Mixed precision with 4-bit units: the planner moves the recipe's int4 candidates to 4-bit least
sensitive first within the budget, the graph pass writes them as MatMulNBits / 4-bit QMoE /
grouped MatMulNBits experts, the torch emulation computes what onnxruntime computes, and the graph
is smaller than the all-8-bit one."""

import json
import re

import numpy as np
import onnx
import pytest
import torch

from edgekit.quantize import Plan, QuantConfig, quantize_
from edgekit.quantize.emulate import emulated, int4_fits, units
from edgekit.quantize.mixed import int4_candidates, plan_int4
from edgekit.runtime.session import OrtModel
from edgekit.smooth import SmoothConfig

from .conftest import tiny_model

CANDIDATES = ["re:.*mlp\\.experts", "re:.*self_attn\\.o_proj", "lm_head", "model.embed_tokens"]


def _quantize(tmp_path, moe, int4, max_drop=0.5, name="q", moe_rows=False):
    m = tiny_model()
    calib = np.random.default_rng(0).integers(0, 128, 600)
    cfg = QuantConfig(moe=moe, seq_len=64, max_drop=max_drop, calib_max_tokens=512, verify_ort=False,
                      int4=int4, int4_block=16, int4_moe_rows=moe_rows)
    rep = quantize_(m, tmp_path / name, cfg, calib_tokens=calib, log=lambda *_: None,
                    smooth=SmoothConfig(enabled=False))
    return m, rep


@pytest.mark.parametrize("moe", ["row", "row+rows", "grouped"])
def test_int4_units_in_graph_and_emulation(tmp_path, moe):
    """``row+rows``: 4-bit QMoE experts with one scale per row (``int4_moe_rows``)."""
    moe, rows = moe.split("+")[0], moe.endswith("+rows")
    m, rep = _quantize(tmp_path, moe, CANDIDATES, moe_rows=rows)
    chosen = set(rep["int4"]["units"])
    experts = {n for n in units(m) if n.endswith("mlp.experts")}
    assert experts <= chosen and "lm_head" in chosen, rep["int4"]
    assert "model.embed_tokens" not in rep["int4"]["sensitivity"], "an embedding has no 4-bit form"
    assert all(rep["precision"][n] == "int4" for n in chosen), rep["precision"]
    g = onnx.load(str(tmp_path / "q" / "model.onnx")).graph

    def attrs(n):
        return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    nbits = [attrs(n) for n in g.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a["bits"] == 4 and a["block_size"] == 16 for a in nbits), nbits
    if moe == "row":
        qmoe = [attrs(n) for n in g.node if n.op_type == "QMoE"]
        assert len(qmoe) == len(experts) and all(a["expert_weight_bits"] == 4 for a in qmoe), qmoe
        assert all(a.get("block_size", 0) == (0 if rows else 16) for a in qmoe), qmoe
        assert set(rep["graph"]["moe"].values()) == {"row4" if rows else "block16x4"}, rep["graph"]["moe"]
    else:            # grouped experts: two MatMulNBits 4-bit per expert, batched (no If)
        grouped = [n for n in g.node if n.op_type == "MatMulNBits" and re.match(r"m\d+/", n.name)]
        per_layer = [m.args.for_layer(int(u.split(".")[2])).n_routed_experts for u in experts]
        assert len(grouped) == 2 * sum(per_layer), (len(grouped), per_layer)
        assert not any(n.op_type == "If" and re.match(r"m\d+/", n.name) for n in g.node)
    # the emulation the planner measured with is what onnxruntime computes
    ids = np.random.default_rng(1).integers(0, 128, (2, 24))
    got = OrtModel(tmp_path / "q").logits(ids)
    int8 = {n for n, p in rep["precision"].items() if p in ("int8", "int4")}

    def emulate(moe_rows):
        with emulated(m, int8, int4=chosen, int4_block=16, experts_as_linears=moe == "grouped",
                      wmax=rep["graph"]["weight_max"], int4_moe_rows=moe_rows), torch.no_grad():
            return m(torch.from_numpy(ids)).numpy()
    emu = emulate(rows)
    d = np.abs(emu - got)
    agree = (emu.argmax(-1) == got.argmax(-1)).mean()
    print(f"{moe}{'+rows' if rows else ''}: emulation vs onnxruntime max {d.max():.2e} median {np.median(d):.2e} "
          f"top-1 agree {agree:.3f}")
    assert np.median(d) < 1e-3 * np.abs(got).max() and agree >= 0.95, (d.max(), np.median(d), agree)
    if moe == "row":     # the other QMoE 4-bit layout's emulation is measurably further from this graph
        other = np.abs(emulate(not rows) - got)
        print(f"  emulated with {'blocks' if rows else 'rows'} instead: median {np.median(other):.2e}")
        assert np.median(other) > 3 * np.median(d), (np.median(other), np.median(d))
    # 4-bit weights make the graph smaller than the 8-bit one of the same plan
    _, rep8 = _quantize(tmp_path, moe, [], name="q8")
    assert rep["size_bytes"] < rep8["size_bytes"], (rep["size_bytes"], rep8["size_bytes"])
    # decode through the cache equals prefill (MatMulNBits quantizes per row)
    om = OrtModel(tmp_path / "q")
    _, cache = om.prefill(ids[:1, :-1])
    step, full = om.decode(ids[:1, -1], cache), om.logits(ids[:1])[:, -1]
    assert np.abs(step - full).max() / np.abs(full).max() < 1e-3


def test_int4_search_respects_budget_and_order():
    """Candidates are ranked by their KL alone in 4-bit; none is taken when the budget is spent, and
    with room they are taken least sensitive first."""
    m = tiny_model()
    rows = np.random.default_rng(0).integers(0, 128, (4, 65))
    names = [n for n in units(m) if "gate" not in n]
    plan = Plan(int8=set(names), int4_block=16)
    from edgekit.evaluate import score_rows
    ref = score_rows(m, rows, as_reference=True)
    plan.accuracy_fp32 = ref.accuracy
    cands = int4_candidates(m, plan, CANDIDATES)
    assert "model.embed_tokens" not in cands and cands, cands
    plan_int4(m, rows, plan, cands, -1.0, ref.reference, log=lambda *_: None)
    assert plan.int4 == set() and plan.steps[0]["kept"] is False and len(plan.steps) == 1, plan.steps
    assert set(plan.sensitivity_int4) == set(cands)
    plan2 = Plan(int8=set(names), int4_block=16, accuracy_fp32=ref.accuracy)
    plan_int4(m, rows, plan2, cands, 1.0, ref.reference, log=lambda *_: None)
    order = [s["int4"] for s in plan2.steps]
    assert plan2.int4 == set(cands) and order == sorted(cands, key=lambda n: plan2.sensitivity_int4[n]), order
    # no search (int4_search = false): every candidate, none measured
    plan3 = Plan(int8=set(names), int4_block=16, accuracy_fp32=ref.accuracy)
    plan_int4(m, rows, plan3, cands, float("inf"), ref.reference, log=lambda *_: None)
    assert plan3.int4 == set(cands) and not plan3.sensitivity_int4 and plan3.steps[0]["searched"] is False
    with pytest.raises(ValueError, match="int4"):
        Plan(int8={"a"}, int4={"b"})


def test_int4_fits_and_config():
    m = tiny_model()
    mods = units(m)
    assert int4_fits(mods["lm_head"], 16) and not int4_fits(mods["lm_head"], 64)
    assert not int4_fits(mods["model.embed_tokens"], 16)
    with pytest.raises(ValueError, match="int4_block"):
        QuantConfig(int4_block=24)
    with pytest.raises(ValueError, match="int4"):
        QuantConfig(int4="lm_head")


def test_plan_json_round_trips_int4(tmp_path):
    p = Plan(int8={"a", "b"}, int4={"b"}, int4_block=64, sensitivity_int4={"b": 0.1})
    p.save(tmp_path)
    q = Plan.load(tmp_path)
    assert q.int4 == {"b"} and q.int4_block == 64 and q.precision("b") == "int4" and q.precision("a") == "int8"
    assert json.loads((tmp_path / "plan.json").read_text())["int4"] == ["b"]


def test_no_int4_candidates_no_4bit_ops(tmp_path):
    """No int4 candidates: the graph has no 4-bit op (the 8-bit plan is as before)."""
    _, rep = _quantize(tmp_path, "row", [])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert "MatMulNBits" not in ops and "int4" not in rep["graph"], ops
