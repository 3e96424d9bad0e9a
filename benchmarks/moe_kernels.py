"""Routed experts alone, three ways, on onnxruntime CPU: fp32 ``MoE``, ``QMoE`` (8-bit per row, what
the cpu4 recipe shipped before 4-bit experts; ``--qmoe``: 8/4-bit per row or per block of K) and
edgekit's grouped int8 GEMMs (``edgekit/quantize/moe_grouped.py``).

One graph = one MoE layer (router probabilities in, expert output out) at a model's expert shape;
prints median/p95 ms for a prefill-sized call (``--tokens``) and a decode call (1 token), and the
max abs difference of each int8 path from fp32. Random weights (std 0.02) and inputs; routing is
DeepSeek-style (k of E by router score).

    python benchmarks/moe_kernels.py --hidden 1536 --inter 512 --experts 16 --k 4 --threads 4
    python benchmarks/moe_kernels.py --hidden 256 --inter 160 --experts 8 --k 2 --threads 1 \
        --qmoe 4/0,4/32 --nbits '' --clock cpu        # v3-nano's experts: QMoE 4-bit rows vs blocks

``--clock cpu`` times the process's CPU time (stable on a shared machine with ``--threads 1``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.quantize.moe_grouped import GroupedMoEConfig, rewrite_moe_grouped  # noqa: E402
from edgekit.quantize.nbits import NBitsConfig  # noqa: E402
from edgekit.quantize.rewrite import ensure_ms_opset, rewrite_moe  # noqa: E402


def moe_graph(D: int, inter: int, E: int, k: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    fc1 = (rng.standard_normal((E, 2 * inter, D)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((E, D, inter)) * 0.02).astype(np.float32)
    node = helper.make_node("MoE", ["x", "probs", "fc1", "", "fc2"], ["y"], name="moe.0", domain="com.microsoft",
                            k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                            activation_alpha=1.0, activation_beta=0.0)
    g = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D]),
                                          helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", E])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
                          [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def inputs(n: int, D: int, E: int, k: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    scores = rng.random((n, E)).astype(np.float32)
    top = np.argsort(-scores, axis=1)[:, :k]
    probs = np.full((n, E), -1e4, np.float32)
    np.put_along_axis(probs, top, np.log(np.take_along_axis(scores, top, 1)), 1)
    return {"x": x, "probs": probs}


def session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timed(s: ort.InferenceSession, feed: dict, runs: int, warmup: int = 3,
          clock=time.perf_counter) -> tuple[float, float]:
    for _ in range(warmup):
        s.run(None, feed)
    t = []
    for _ in range(runs):
        t0 = clock()
        s.run(None, feed)
        t.append((clock() - t0) * 1e3)
    t.sort()
    return statistics.median(t), t[min(len(t) - 1, int(0.95 * len(t)))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--nbits", default="8/32,8/128,4/32",
                    help="grouped experts on MatMulNBits: comma-separated BITS/BLOCK variants ('' for none)")
    ap.add_argument("--qmoe", default="",
                    help="more QMoE variants: comma-separated BITS/BLOCK (BLOCK 0: one scale per row), e.g. 4/0,4/32")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or the process's CPU time (stable on a loaded machine; use --threads 1)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    base = moe_graph(a.hidden, a.inter, a.experts, a.k)
    variants = {"fp32 MoE": base}
    q = onnx.ModelProto()
    q.CopyFrom(base)
    rewrite_moe(q, "moe.0", 0)
    variants["QMoE int8 per-row"] = q
    for spec in [x for x in a.qmoe.split(",") if x]:
        bits, block = (int(v) for v in spec.split("/"))
        q = onnx.ModelProto()
        q.CopyFrom(base)
        kind = rewrite_moe(q, "moe.0", block, bits=bits)
        variants[f"QMoE {bits}-bit {'per-row' if kind.startswith('row') else f'block {block}'}"] = q
    for fold in (False, True):
        gm = onnx.ModelProto()
        gm.CopyFrom(base)
        rewrite_moe_grouped(gm, "moe.0", GroupedMoEConfig(wmax=63.0, fold=fold))
        ensure_ms_opset(gm)
        variants[f"grouped int8{' (scales in kernel)' if fold else ''}"] = gm
    # static activation scales, calibrated on the prefill feed itself (max |x|; per expert max |h|
    # over all tokens, an upper bound of its routed tokens')
    feed = inputs(a.tokens, a.hidden, a.experts, a.k)
    fc1 = numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == "fc1"))
    g_, u_ = np.einsum("nd,eid->eni", feed["x"], fc1[:, 0::2]), np.einsum("nd,eid->eni", feed["x"], fc1[:, 1::2])
    h_amax = tuple(float(v) for v in np.abs(g_ / (1 + np.exp(-g_)) * u_).max(axis=(1, 2)))
    gm = onnx.ModelProto()
    gm.CopyFrom(base)
    rewrite_moe_grouped(gm, "moe.0", GroupedMoEConfig(wmax=63.0, fold=True, static_x=float(np.abs(feed["x"]).max()),
                                                      static_h=h_amax))
    ensure_ms_opset(gm)
    variants["grouped int8, static activation scales"] = gm
    for spec in [x for x in a.nbits.split(",") if x]:
        bits, block = (int(v) for v in spec.split("/"))
        gm = onnx.ModelProto()
        gm.CopyFrom(base)
        rewrite_moe_grouped(gm, "moe.0", GroupedMoEConfig(nbits=NBitsConfig(bits=bits, block=block)))
        ensure_ms_opset(gm)
        variants[f"grouped MatMulNBits {bits}-bit block {block}"] = gm
    rows = []
    feeds = {n: inputs(n, a.hidden, a.experts, a.k) for n in (a.tokens, 1)}
    ref = {n: session(base, a.threads).run(None, f)[0] for n, f in feeds.items()}
    for name, proto in variants.items():
        s = session(proto, a.threads)
        row = {"variant": name}
        for n, f in feeds.items():
            med, p95 = timed(s, f, a.runs, clock=clock)
            y = s.run(None, f)[0]
            row[f"tokens_{n}"] = {"p50_ms": round(med, 3), "p95_ms": round(p95, 3),
                                  "max_abs_diff": float(np.abs(y - ref[n]).max()),
                                  "rel_err": float(np.linalg.norm(y - ref[n]) / np.linalg.norm(ref[n]))}
        rows.append(row)
        t, d = row[f"tokens_{a.tokens}"], row["tokens_1"]
        print(f"{name:38s} {a.tokens} tok p50 {t['p50_ms']:8.2f} ms p95 {t['p95_ms']:8.2f} | 1 tok p50 "
              f"{d['p50_ms']:7.3f} ms | rel err vs fp32 {t['rel_err']:.2e}", flush=True)
    out = {"shape": vars(a) | {"json": None}, "onnxruntime": ort.__version__, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
