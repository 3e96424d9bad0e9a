"""What onnxruntime charges per node when the node does almost nothing: a chain of N elementwise
nodes (alternating Add and Mul of a constant) on one [1, D] row, the size of a decode step's
activations.

    python benchmarks/node_cost.py --threads 1,4 --nodes 500,2000 --json benchmarks/results/node_cost_16c.json

Prints microseconds per node (median call time / N, after warm-up). Why: a v3-1.6b decode step
runs ~4,000 nodes after onnxruntime's fusions; this is the part of a step no kernel change touches.
Graph optimizations are off so the chain is not folded or fused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.host import host_facts  # noqa: E402


def chain(n: int, dim: int):
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("Mul" if i % 2 else "Add", [prev, "c"], [f"t{i}"]))
        prev = f"t{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", dim])],
                          [numpy_helper.from_array(np.full((dim,), 1.0001, np.float32), "c")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--nodes", default="500,2000")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    rows = []
    x = np.ones((1, a.dim), np.float32)
    for threads in (int(t) for t in a.threads.split(",")):
        for n in (int(v) for v in a.nodes.split(",")):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            s = ort.InferenceSession(chain(n, a.dim).SerializeToString(), so, providers=["CPUExecutionProvider"])
            for _ in range(5):
                s.run(None, {"x": x})
            ts = []
            for _ in range(a.runs):
                t = time.perf_counter()
                s.run(None, {"x": x})
                ts.append(time.perf_counter() - t)
            us = statistics.median(ts) * 1e6 / n
            rows.append({"threads": threads, "nodes": n, "us_per_node": round(us, 3)})
            print(f"threads {threads:2d}  {n:5d} nodes: {us:.2f} us per node", flush=True)
    command = "python benchmarks/node_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = {"host": host_facts(), "onnxruntime": ort.__version__, "dim": a.dim, "command": command, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
