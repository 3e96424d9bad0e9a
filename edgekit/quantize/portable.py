"""int8 routed experts on the portable (plain-ONNX) MoE path.

What: ``rewrite_sparse_experts(proto, if_name, fc1, fc2)`` rewrites one ``If`` node written by
``edgekit.export.moe_portable`` in place: the stacked expert weights ``fc1`` [E, D, 2I] and ``fc2``
[E, I, D] become int8 (symmetric, per expert and output column, zero point 0) plus fp32 scales
[E, 2I] / [E, D]. Inside both branches (the decode-time gathered mat-vecs and the prefill-time
``Loop`` over experts) every ``Gather(fc, i) -> MatMul(x, .)`` becomes
``Cast(Gather(fc_q, i)) -> MatMul(x, .) * Unsqueeze(Gather(fc_s, i), -2)``: the scale is applied to
the matmul's output columns, so the extra work is one multiply per output, not per weight.

Why weights-only int8 here (W8A32): the expert weights are gathered at run time, so onnxruntime
cannot prepack them for an integer GEMM and a ``DynamicQuantizeLinear`` + ``MatMulInteger`` chain
adds three ops per expert call for a 1-token mat-vec; gathering int8 rows reads 4x fewer bytes,
and the cast happens on the gathered slice only (benchmarks/portable_int8.py measures fp32 vs int8
on this path). Only standard ops are used (Gather, Cast, MatMul, Mul, Unsqueeze), all of them in the
onnxruntime mobile package's operator set and onnxruntime-web.

Invariants: the If node's inputs/outputs and the graph I/O are unchanged; the result equals the
fp32 experts computed with per-column int8 weights (``emulate.emulated(..., experts_as_linears=True)``).

Failure modes: an If node without the expected ``Gather(fc, i) -> MatMul`` pattern raises
``EdgekitError`` naming the re-export fix; nothing is modified then.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgekitError
from ..int8 import QMAX, quantize_sym


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _walk(graph: onnx.GraphProto):
    """Every (graph, node) below ``graph``, subgraphs included."""
    for n in graph.node:
        yield graph, n
        for g in _subgraphs(n):
            yield from _walk(g)


def _nested(node: onnx.NodeProto):
    """The subgraphs of ``node`` and every graph nested in them."""
    for g in _subgraphs(node):
        yield g
        for n in g.node:
            yield from _nested(n)


def _rewrite_branch(graph: onnx.GraphProto, names: dict[str, tuple[str, str]], tag: str) -> int:
    """In ``graph`` (one branch or loop body): Gather(fc) -> Cast(Gather(fc_q)), MatMul -> MatMul * scale."""
    out, done = [], 0
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    scaled = {}                                           # MatMul output -> (scale init, indices)
    for n in graph.node:
        if n.op_type == "Gather" and n.input[0] in names:
            q, s = names[n.input[0]]
            users = consumers.get(n.output[0], [])
            if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != n.output[0]:
                raise EdgekitError(f"{tag}: expert weights {n.input[0]} are not read by one MatMul; "
                                   "re-export the fp32 graph with `edgekit export --moe portable`")
            raw = f"{n.output[0]}/q8"
            out += [helper.make_node("Gather", [q, n.input[1]], [raw], axis=0),
                    helper.make_node("Cast", [raw], [n.output[0]], to=TensorProto.FLOAT)]
            scaled[users[0].output[0]] = (s, n.input[1])
            done += 1
            continue
        if n.op_type == "MatMul" and n.output[0] in scaled:
            s, idx = scaled[n.output[0]]
            y = n.output[0]
            raw, sg, su, axis = f"{y}/raw", f"{y}/s", f"{y}/su", f"{y}/axis"
            out += [helper.make_node("MatMul", list(n.input), [raw]),
                    helper.make_node("Gather", [s, idx], [sg], axis=0),
                    helper.make_node("Constant", [], [axis],
                                     value=helper.make_tensor(axis, TensorProto.INT64, [1], [-2])),
                    helper.make_node("Unsqueeze", [sg, axis], [su]),
                    helper.make_node("Mul", [raw, su], [y])]
            continue
        out.append(n)
    del graph.node[:]
    graph.node.extend(out)
    return done


def rewrite_sparse_experts(proto: onnx.ModelProto, if_name: str, fc1: str, fc2: str, qmax: float = QMAX,
                           base_dir: str = "") -> str:
    """int8 weights for the portable experts of the If node ``if_name``; returns 'w8-col'.
    ``qmax`` 63: 7-bit weights (the reduce_range setting of the rest of the graph); ``base_dir``:
    where expert weights kept as external data live."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    node = next((n for n in g.node if n.name == if_name and n.op_type == "If"), None)
    if node is None or fc1 not in inits or fc2 not in inits:
        raise EdgekitError(f"portable experts {if_name} ({fc1}, {fc2}) not found in the graph; "
                           "re-export the fp32 graph with `edgekit export --moe portable`")
    names = {name: (f"{name}.q8", f"{name}.q8scale") for name in (fc1, fc2)}
    work = onnx.NodeProto()
    work.CopyFrom(node)                                   # rewritten aside: a failure modifies nothing
    done = sum(_rewrite_branch(sub, names, if_name) for sub in _nested(work))
    if done != 4:                                         # fc1 + fc2 in the gathered branch and the loop body
        raise EdgekitError(f"{if_name}: found {done} expert weight reads, expected 4; "
                           "re-export the fp32 graph with `edgekit export --moe portable`")
    node.CopyFrom(work)
    for name in (fc1, fc2):
        q, s = quantize_sym(numpy_helper.to_array(inits[name], base_dir), axis=1, qmax=qmax)  # [E,K,N] -> s [E,N]
        g.initializer.extend([numpy_helper.from_array(q, names[name][0]),
                              numpy_helper.from_array(s, names[name][1])])
    still = {i for _, n in _walk(g) for i in n.input}
    keep = [t for t in g.initializer if t.name not in (fc1, fc2) or t.name in still]
    del g.initializer[:]
    g.initializer.extend(keep)
    return "w8-col"
