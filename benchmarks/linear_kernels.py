"""One linear layer, every int8 kernel edgekit can emit, on onnxruntime CPU.

    python benchmarks/linear_kernels.py --threads 4 --json benchmarks/results/linear_kernels_16c_t4.json

For each (K, N) and row count M (1 = a decode step; 32 = an expert's share of a 128-token prefill;
128 = a prefill): fp32 ``MatMul``; edgekit's per-token int8 path (``edgekit.quantize.rewrite``:
per-token scale, ``MatMulIntegerToFloat`` u8s8, column scales in the kernel or in a ``Mul`` after
it, 7-bit weights); and
``MatMulNBits`` (``edgekit.quantize.nbits``) at 8 and 4 bits, block 32 and 128, accuracy_level 4.
Prints p50 microseconds and the relative error against fp32 (random weights, std 0.02; inputs
N(0, 1)); ``--json`` keeps the table with the host's facts.

``--stream L`` asks what a decode step sees instead: one weight read once per call, from memory,
not from cache. The graph is then a chain of L linears with distinct [K, K] weights (``--shapes``
must be square; L x K x K int8 bytes well beyond the last-level cache), the same emitters rewrite
every link, and a row's figure is the call's time / L per linear, with the weight bytes streamed
per second (int8 bytes for every variant, so the columns compare kernels, not formats; fp32 reads
4x those bytes). The variants also include the per-token int8 path with onnxruntime's weight
prepacking off (``session.disable_prepacking``: MLAS's unpacked path). Weights are scaled so
activations stay O(1) along the chain.

    python benchmarks/linear_kernels.py --stream 96 --shapes 1536x1536 --rows 1,128 --threads 4 \
        --rounds 5 --json benchmarks/results/linear_stream_16c_t4.json
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


def chain(ws: list[np.ndarray]) -> onnx.ModelProto:
    """x -> x @ ws[0] -> ... -> y: one fp32 MatMul per weight (initializers w0, w1, ...)."""
    outs = [f"h{i}" for i in range(len(ws) - 1)] + ["y"]
    nodes = [helper.make_node("MatMul", [x, f"w{i}"], [y]) for i, (x, y) in enumerate(zip(["x"] + outs, outs))]
    return graph(nodes, [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)], ws[0].shape[0])


def stream_variants(ws: list[np.ndarray], blocks: list[int]) -> dict[str, tuple[onnx.ModelProto, dict]]:
    """The chain of ``ws`` per variant -> (graph, session config entries)."""
    base = chain(ws)
    units = {f"w{i}": f"lin{i}" for i in range(len(ws))}

    def rewritten(**kw) -> onnx.ModelProto:
        p = onnx.ModelProto()
        p.CopyFrom(base)
        rewrite_linears(p, units, set(units.values()), wmax=63.0, **kw)
        ensure_ms_opset(p)
        return p

    out = {"fp32 MatMul": (base, {})}
    out["per-token int8 MatMulIntegerToFloat"] = (rewritten(fold=True), {})
    out["per-token int8, prepacking off"] = (out["per-token int8 MatMulIntegerToFloat"][0],
                                             {"session.disable_prepacking": "1"})
    for block in blocks:
        if ws[0].shape[0] % block == 0:
            out[f"MatMulNBits 8-bit block {block}"] = (rewritten(nbits=NBitsConfig(bits=8, block=block)), {})
    return out


def stream(a, rng) -> list[dict]:
    """``--stream``: per-linear time of a chain of ``a.stream`` distinct weights (module doc)."""
    rows = []
    for shape in a.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        if K != N:
            raise SystemExit(f"--stream needs square shapes (the chain feeds each output to the next): got {shape}")
        ws = [(rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32) for _ in range(a.stream)]
        sessions = {}
        for name, (p, cfg) in stream_variants(ws, [int(b) for b in a.blocks.split(",")]).items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.log_severity_level = a.threads, 3
            for k, v in cfg.items():
                so.add_session_config_entry(k, v)
            sessions[name] = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ms = [int(v) for v in a.rows.split(",")]
        feeds = {m: {"x": rng.standard_normal((m, K)).astype(np.float32)} for m in ms}
        times = {(n, m): [] for n in sessions for m in ms}
        order = list(sessions)
        for r in range(a.rounds):                       # interleaved, order reversed every other round
            for name in (order if r % 2 == 0 else order[::-1]):
                for m in ms:
                    times[(name, m)].append(timed(sessions[name], feeds[m], 2) / a.stream)
        for m in ms:
            for name in order:
                us = statistics.median(times[(name, m)])
                gbs = K * K / us / 1e3
                rows.append({"K": K, "N": K, "M": m, "variant": name, "p50_us": round(us, 1),
                             "int8_weight_gb_s": round(gbs, 1), "chain": a.stream})
                print(f"{K:5d}x{K:<5d} M={m:<4d} {name:38s} {us:9.1f} us per linear  {gbs:6.1f} GB/s of int8 weights",
                      flush=True)
    return rows


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
    ap.add_argument("--stream", type=int, default=0, metavar="L",
                    help="a chain of L distinct square weights per graph: weights streamed from memory (module doc)")
    ap.add_argument("--rounds", type=int, default=5, help="--stream: interleaved rounds (median)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    command = "python benchmarks/linear_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.stream:
        out = {"host": host_facts(), "onnxruntime": ort.__version__, "threads": a.threads, "command": command,
               "rows": stream(a, rng)}
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
        return out
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
    out = {"host": host_facts(), "onnxruntime": ort.__version__, "threads": a.threads, "command": command,
           "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
