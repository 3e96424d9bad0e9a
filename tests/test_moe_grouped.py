"""Grouped int8 experts (edgekit/quantize/moe_grouped.py) against a numpy reference of the same
arithmetic, against the fp32 MoE op, and row independence (a token's output never depends on
the other tokens of the call: prefill == decode, batched == alone)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from moe_kernels import inputs, moe_graph  # noqa: E402

from edgekit.quantize.moe_grouped import GroupedMoEConfig, rewrite_moe_grouped  # noqa: E402
from edgekit.quantize.rewrite import ensure_ms_opset  # noqa: E402

D, I, E, K = 64, 32, 8, 2


def _run(proto, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _grouped(base, **kw):
    g = onnx.ModelProto()
    g.CopyFrom(base)
    assert rewrite_moe_grouped(g, "moe.0", GroupedMoEConfig(**kw)) == "grouped"
    ensure_ms_opset(g)
    onnx.checker.check_model(g)
    return g


def _reference(fc1, fc2, x, probs, wmax, static_x=None, static_h=None):
    """numpy: top-k of probs, softmax over the k, int8 per token (or static: the given max |x| /
    per-expert max |h|) x int8 per column, SwiGLU."""
    def q_tok(a, amax=None):
        s = np.maximum(np.abs(a).max(-1, keepdims=True) if amax is None else np.float32(amax), 1e-12) / 127
        return np.clip(np.rint(a / s), -127, 127), s

    def q_col(w):
        s = np.maximum(np.abs(w).max(0), 1e-12) / wmax
        return np.clip(np.rint(w / s), -wmax, wmax), s

    idx = np.argsort(-probs, 1)[:, :K]
    v = np.take_along_axis(probs, idx, 1)
    w = np.exp(v - v.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    y = np.zeros_like(x, dtype=np.float64)
    for t in range(len(x)):
        xq, sx = q_tok(x[t], static_x)
        for j in range(K):
            e = idx[t, j]
            q1, s1 = q_col(np.concatenate([fc1[e, 0::2], fc1[e, 1::2]], 0).T)
            a = (xq @ q1) * sx * s1
            h = a[:I] / (1 + np.exp(-a[:I])) * a[I:]
            hq, sh = q_tok(h, None if static_h is None else static_h[e])
            q2, s2 = q_col(fc2[e].T)
            y[t] += w[t, j] * (hq @ q2) * sh * s2
    return y.astype(np.float32)


@pytest.mark.parametrize("fold", [False, True])
def test_grouped_matches_int8_reference(fold):
    base = moe_graph(D, I, E, K)
    fc1, fc2 = (numpy_helper.to_array(t) for t in base.graph.initializer)
    g = _grouped(base, fold=fold, wmax=63.0)
    for n in (1, 3, 37):
        f = inputs(n, D, E, K, seed=n)
        got, ref = _run(g, f), _reference(fc1, fc2, f["x"], f["probs"], 63.0)
        d = np.abs(got - ref)
        top = np.abs(ref).max()
        assert d.max() < 1e-5 * top + 1e-7, f"{n} tokens: max {d.max():.2e} vs |ref| {top:.2e}"
        fp32 = _run(base, f)
        rel = np.linalg.norm(got - fp32) / np.linalg.norm(fp32)
        assert rel < 0.05, f"{n} tokens: int8 vs fp32 MoE relative error {rel:.3f}"


def test_batched_layout_equals_per_expert_branches():
    """Two implementations of the dynamic path: the elementwise work batched over all experts' rows
    (default) and inside one If per expert; the same operations per row, so equal bit for bit, with
    far fewer nodes. Covers experts without tokens (decode-sized calls) and a call of many rows."""
    base = moe_graph(D, I, E, K)
    batched, branch = _grouped(base, wmax=63.0), _grouped(base, wmax=63.0, layout="branch")
    count = lambda g: len(g.graph.node) + sum(len(a.g.node) for n in g.graph.node for a in n.attribute  # noqa: E731
                                              if a.HasField("g"))
    ops = [n.op_type for n in batched.graph.node]
    assert "If" not in ops and ops.count("MatMulIntegerToFloat") == 2 * E, ops
    print(f"nodes: batched {count(batched)}, per-expert branches {count(branch)}")
    assert count(batched) < count(branch) - 8 * E
    for n in (1, 2, 37):
        f = inputs(n, D, E, K, seed=10 + n)
        a, b = _run(batched, f), _run(branch, f)
        assert np.array_equal(a, b), f"{n} tokens: max diff {np.abs(a - b).max():.2e}"
    one = moe_graph(D, I, 1, 1)                  # a single routed expert (every token, k = 1)
    f = inputs(5, D, 1, 1, seed=3)
    a, b = _run(_grouped(one, wmax=63.0), f), _run(_grouped(one, wmax=63.0, layout="branch"), f)
    assert np.array_equal(a, b), f"one expert: max diff {np.abs(a - b).max():.2e}"


def test_batched_matmulnbits_experts_equal_per_expert_branches():
    """The MatMulNBits path in both layouts: the same kernel on the same rows of every expert, so the
    same results bit for bit; batched has no If and one MatMulNBits per expert GEMM."""
    from edgekit.quantize.nbits import NBitsConfig

    base = moe_graph(D, I, E, K)
    nb = NBitsConfig(bits=8, block=16)
    batched, branch = _grouped(base, nbits=nb), _grouped(base, nbits=nb, layout="branch")
    ops = [n.op_type for n in batched.graph.node]
    assert "If" not in ops and ops.count("MatMulNBits") == 2 * E, ops
    for n in (1, 2, 37):
        f = inputs(n, D, E, K, seed=20 + n)
        a, b = _run(batched, f), _run(branch, f)
        assert np.array_equal(a, b), f"{n} tokens: max diff {np.abs(a - b).max():.2e}"
        fp32 = _run(base, f)
        rel = np.linalg.norm(a - fp32) / np.linalg.norm(fp32)
        assert rel < 0.05, f"{n} tokens: MatMulNBits experts vs fp32 MoE relative error {rel:.3f}"


def test_static_activation_scales_match_the_reference_and_keep_rows_independent():
    base = moe_graph(D, I, E, K)
    fc1, fc2 = (numpy_helper.to_array(t) for t in base.graph.initializer)
    f = inputs(37, D, E, K, seed=3)
    x_amax = float(np.abs(f["x"]).max())
    g_, u_ = np.einsum("nd,eid->eni", f["x"], fc1[:, 0::2]), np.einsum("nd,eid->eni", f["x"], fc1[:, 1::2])
    h_amax = tuple(float(v) for v in np.abs(g_ / (1 + np.exp(-g_)) * u_).max(axis=(1, 2)))
    g = _grouped(base, wmax=63.0, static_x=x_amax, static_h=h_amax)
    ops = [n.op_type for n in g.graph.node]
    assert "ReduceMax" not in ops, "a static x scale needs no per-token max"
    got, ref = _run(g, f), _reference(fc1, fc2, f["x"], f["probs"], 63.0, x_amax, h_amax)
    # the reference computes h in float64: a value at a rounding boundary of the static grid can
    # land one int8 step away (~0.4% of |y|); anything systematic shows in the mean
    d, top = np.abs(got - ref), np.abs(ref).max()
    assert d.max() < 1e-2 * top and d.mean() < 1e-4 * top, f"max {d.max():.2e}, mean {d.mean():.2e}, |ref| {top:.2e}"
    fp32 = _run(base, f)
    rel = np.linalg.norm(got - fp32) / np.linalg.norm(fp32)
    assert rel < 0.06, f"static int8 vs fp32 MoE relative error {rel:.3f}"
    alone = np.concatenate([_run(g, {k: v[i:i + 1] for k, v in f.items()}) for i in range(5)])
    assert np.array_equal(got[:5], alone), f"max diff {np.abs(got[:5] - alone).max():.2e}"


def test_matmul_nbits_packs_what_it_claims():
    """edgekit.quantize.nbits: unpack(pack(w)) is w on the block grid, and onnxruntime's MatMulNBits
    on the packed weights computes x @ unpack(w) up to its int8 activation blocks."""
    from onnx import TensorProto, helper

    from edgekit.quantize.nbits import NBitsConfig, matmul_nbits, pack, unpack
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 48)) * 0.02).astype(np.float32)
    x = rng.standard_normal((7, 128)).astype(np.float32)
    for bits in (8, 4):
        cfg = NBitsConfig(bits=bits, block=32)
        q, sc = pack(w, cfg)
        back = unpack(q, sc, cfg)
        step = np.repeat(sc, 32, axis=1).T                                     # [K, N] scale per weight
        assert np.all(np.abs(back - w) <= step / 2 + 1e-8), f"{bits}-bit: off the block grid"
        inits: list = []
        node = matmul_nbits("x", w, "y", "nb", lambda a, h, acc=inits: acc.append(numpy_helper.from_array(a, h)) or h,
                            cfg)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 8
        got, ref = _run(m, {"x": x}), x @ back
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < 0.02, f"{bits}-bit MatMulNBits vs x @ unpacked weights: relative error {rel:.4f}"


def test_rows_do_not_depend_on_each_other():
    base = moe_graph(D, I, E, K)
    g = _grouped(base, wmax=63.0)
    f = inputs(9, D, E, K, seed=5)
    together = _run(g, f)
    alone = np.concatenate([_run(g, {k: v[i:i + 1] for k, v in f.items()}) for i in range(9)])
    assert np.array_equal(together, alone), f"max diff {np.abs(together - alone).max():.2e}"


def test_reduce_range_is_exact_on_every_x86_kernel():
    """Full-range u8 activations x 7-bit weights: every u8s8 pair sum fits int16 (VPMADDUBSW)."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    B = rng.integers(-63, 64, (256, 64)).astype(np.int8)
    A = rng.integers(0, 256, (5, 256)).astype(np.uint8)
    node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "s", "s", "zp"], ["y"], domain="com.microsoft")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(B, "b"), numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                           numpy_helper.from_array(np.array(128, np.uint8), "zp")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    got = _run(m, {"a": A})
    ref = (A.astype(np.int64) - 128) @ B.astype(np.int64)
    assert np.array_equal(got, ref), f"{(got != ref).mean():.0%} of sums wrong, max err {np.abs(got - ref).max()}"
