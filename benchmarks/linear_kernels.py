"""One linear layer, every int8 kernel edgekit can emit, on onnxruntime CPU.

    python benchmarks/linear_kernels.py --threads 4 --json benchmarks/results/linear_kernels_16c_t4.json

For each (K, N) and row count M (1 = a decode step; 32 = an expert's share of a 128-token prefill;
128 = a prefill): fp32 ``MatMul``; edgekit's per-token int8 path (``edgekit.quantize.rewrite``:
per-token scale, ``MatMulIntegerToFloat`` u8s8, column scales in the kernel or in a ``Mul`` after
it, 7-bit weights); and
``MatMulNBits`` (``edgekit.quantize.nbits``) at 8 and 4 bits, block 32 and 128, accuracy_level 4.
Prints p50 microseconds and the relative error against fp32 (random weights, std 0.02; inputs
N(0, 1)); ``--json`` keeps the table with the host's facts.
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

from edgekit.host import host_facts  # noqa: E402
from edgekit.quantize.nbits import NBitsConfig, matmul_nbits  # noqa: E402
from edgekit.quantize.rewrite import ensure_ms_opset, rewrite_linears  # noqa: E402

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def graph(nodes, inits, K: int) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=OPSETS, ir_version=10)


def variants(w: np.ndarray, blocks: list[int]) -> dict[str, onnx.ModelProto]:
    K, _ = w.shape
    out = {"fp32 MatMul": graph([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], K)}
    for fold in (True, False):
        p = onnx.ModelProto()
        p.CopyFrom(out["fp32 MatMul"])
        rewrite_linears(p, {"w": "lin"}, {"lin"}, wmax=63.0, fold=fold)
        ensure_ms_opset(p)
        out[f"per-token int8 MatMulIntegerToFloat{'' if fold else ' (col scale Mul)'}"] = p
    for bits in (8, 4):
        for block in blocks:
            if K % block:
                continue
            inits: list = []
            node = matmul_nbits("x", w, "y", "nb", lambda arr, hint, acc=inits: acc.append(
                numpy_helper.from_array(arr, hint)) or hint, NBitsConfig(bits=bits, block=block))
            out[f"MatMulNBits {bits}-bit block {block}"] = graph([node], inits, K)
    return out


def timed(s: ort.InferenceSession, feed: dict, runs: int) -> float:
    for _ in range(3):
        s.run(None, feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1536x1024,512x1536,1536x1152,768x1536",
                    help="KxN list (defaults: v3-1.6b expert gate|up, expert down, attention q_a|kv_a, q_b)")
    ap.add_argument("--rows", default="1,32,128")
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.log_severity_level = 3
    rows = []
    for shape in a.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
        vs = variants(w, [int(b) for b in a.blocks.split(",")])
        sessions = {k: ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    for k, p in vs.items()}
        for m in (int(v) for v in a.rows.split(",")):
            x = rng.standard_normal((m, K)).astype(np.float32)
            ref = x @ w
            for name, s in sessions.items():
                y = s.run(None, {"x": x})[0]
                us = timed(s, {"x": x}, a.runs)
                err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                rows.append({"K": K, "N": N, "M": m, "variant": name, "p50_us": round(us, 1), "rel_err": err})
                print(f"{K:5d}x{N:<5d} M={m:<4d} {name:38s} {us:9.1f} us  rel err {err:.2e}", flush=True)
    out = {"host": host_facts(), "onnxruntime": ort.__version__, "threads": a.threads,
           "command": "python benchmarks/linear_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
