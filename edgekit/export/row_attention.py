"""Attention of a batch whose rows have different lengths, computed so that a row's result does not
depend on the other rows: the same float operations, on the same shapes, as the row run alone.

What: ``RowAttention.apply(q, past4, new4, mask, pad, kvl)`` is the attention core of one layer
(q [B, H, T, W] already scaled, past4 [B, 1, P, W], new4 [B, 1, T, W], mask [T, P + T] float,
added to the scores: ``MIN`` (the lowest float32) where query t must not see column c
(``c > P + t``), 0 elsewhere; pad [B] or [1] int64 left padding of
``[past | new]``) -> o [B, H, T, kvl], the attention-weighted sum of the first ``kvl`` latent
columns (the part the value up-projection reads; the rotary key columns only score). It traces
as a placeholder ``edgekit::RowAttention`` that ``expand_row_attention(proto)`` replaces by
``If(max(pad) == 0)``:
- then: the core on the whole batch (``core``: scores against ``[past | new]`` in one MatMul,
  the causal mask added, one softmax, one weighted sum), the graph a batch-1 caller always runs;
- else: a ``Scan`` over rows running the same core on the row's own columns only (the visible
  columns of a row are contiguous: from ``min(pad, P) + max(pad - P, 0)``; queries from
  ``max(pad - P, 0)``), the result padded back to T query rows with zeros (never read).

Why: masking padding instead (one batched softmax over all columns) gives the same values only up
to float rounding, because summation order changes with the position of the real columns
(measured on onnxruntime 1.32 CPU: a leading masked column changed Softmax results in 181 of 462
cases, a MatMul over the key axis in 221). Rounding differences of 1e-7 are harmless in fp32, but
an int8 graph re-quantizes every activation, so one of them crossing a rounding boundary moves a
value by a whole int8 step: on v3-nano int8, padded rows' logits moved by up to 0.14 and 3 of 46
greedy answers changed. Rows whose padding is zero (all rows of equal length, or batch 1) keep the
batched path; onnxruntime's GEMMs give the same per-row results whatever the number of rows
(checked in tests/test_export.py), so only padded rows need the per-row path.
The mask is additive rather than a ``Where`` on a bool mask: onnxruntime's broadcasting ``Where``
is ~4x slower than ``Add`` on [B, H, T, S] scores (T = S = 128: 0.3 vs 0.08 ms, 2-core AVX2 VM),
and the result is bit-identical (s + 0 = s; s + MIN rounds to MIN for any finite score, whose
exp underflows to 0 either way).
Cost: two nodes per call and one ``If`` per layer when no row is padded (the core is 7 nodes);
with padding, per layer ~15 nodes of slice starts and a ``Scan`` whose body has ~11 small nodes,
run once per row.

Invariants: output pad positions are zero; for pad == 0 the result equals the plain core.
Failure modes: none at export; a pad larger than P + T - 1 (a row with no token) yields an empty
row (zeros), never an error.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

DOMAIN, OP = "edgekit", "RowAttention"
MIN = float(np.finfo(np.float32).min)


def core(q, past4, new4, mask, kvl: int):
    """q [b, H, t, W], past4 [b, 1, p, W], new4 [b, 1, t, W], mask [t, p + t] (additive) -> [b, H, t, kvl]."""
    kv = torch.cat([past4, new4], dim=2)                                      # [b, 1, p + t, W]
    s = torch.matmul(q, kv.transpose(-1, -2)) + mask                          # [b, H, t, p + t]
    return torch.matmul(s.softmax(dim=-1), kv[..., :kvl])


class RowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, past4, new4, mask, pad, kvl: int):
        """Eager reference of the placeholder (runs once while tracing; per-row Python loop)."""
        B, P = q.shape[0], past4.shape[2]
        pad = pad.expand(B)
        rows = []
        for b in range(B):
            ps, ns = min(int(pad[b]), P), max(int(pad[b]) - P, 0)
            kv = torch.cat([past4[b:b + 1], new4[b:b + 1]], dim=2)[:, :, ps + ns:]
            o = core(q[b:b + 1, :, ns:], kv[:, :, :0], kv, mask[ns:, ps + ns:], kvl)
            rows.append(F.pad(o, (0, 0, ns, 0)))
        return torch.cat(rows)

    @staticmethod
    def symbolic(g, q, past4, new4, mask, pad, kvl: int):
        out = g.op(f"{DOMAIN}::{OP}", q, past4, new4, mask, pad, kvl_i=kvl)
        out.setType(q.type())
        return out


# ---------------------------------------------------------------------------------------------
# ONNX: placeholder -> If(no padding: core on the batch; else: Scan of the core over rows)
# ---------------------------------------------------------------------------------------------
_vi = helper.make_tensor_value_info


def _core_nodes(n, q, kv, mask, out, c) -> list:
    """The ops of ``core`` on the concatenated ``kv`` [b, 1, p + t, W] (names from ``n``;
    constants ``c``, ``c["kvl"]`` the latent width), written to ``out``."""
    return [
        helper.make_node("Transpose", [kv], [n("kvT")], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [q, n("kvT")], [n("s0")]),
        helper.make_node("Add", [n("s0"), mask], [n("s")]),
        helper.make_node("Softmax", [n("s")], [n("p")], axis=-1),
        helper.make_node("Slice", [kv, c["zero1"], c["kvl"], c["axm1"]], [n("v")]),
        helper.make_node("MatMul", [n("p"), n("v")], [out]),
    ]


def _constants(proto, kvl: int) -> dict:
    vals = {"kvl": np.array([kvl], np.int64), "zero": np.array(0, np.int64), "zero1": np.array([0], np.int64),
            "big1": np.array([2**62], np.int64), "big2": np.array([2**62, 2**62], np.int64),
            "axm1": np.array([-1], np.int64), "ax1": np.array([1], np.int64), "ax2": np.array([2], np.int64),
            "ax01": np.array([0, 1], np.int64), "zeros2": np.zeros((1, 2), np.int64),
            "zeros5": np.zeros((1, 5), np.int64)}
    out = {}
    for k, v in vals.items():
        name = f"rowattn.{k}"
        proto.graph.initializer.append(numpy_helper.from_array(v, name))
        out[k] = name
    return out


def _condition(pad, c) -> tuple[list, str]:
    """Once per call: True when no row is padded (the batched core is then exact)."""
    nodes = [helper.make_node("ReduceMax", [pad], ["rowattn/maxpad"], keepdims=0),
             helper.make_node("Equal", ["rowattn/maxpad", c["zero"]], ["rowattn/nopad"])]
    return nodes, "rowattn/nopad"


def _starts(n, q, past4, pad, c) -> tuple[list, dict]:
    """Per-row slice starts for the Scan (inside the padded branch, so batch 1 never pays)."""
    nodes = [
        helper.make_node("Shape", [q], [n("B")], start=0, end=1),
        helper.make_node("Shape", [past4], [n("P")], start=2, end=3),
        helper.make_node("Expand", [pad, n("B")], [n("pad")]),                                     # [B]
        helper.make_node("Min", [n("pad"), n("P")], [n("ps")]),                                    # past start
        helper.make_node("Sub", [n("pad"), n("P")], [n("d")]),
        helper.make_node("Max", [n("d"), c["zero"]], [n("ns")]),                                   # new start
        helper.make_node("Unsqueeze", [n("ps"), c["ax1"]], [n("ps1")]),                            # [B, 1]
        helper.make_node("Unsqueeze", [n("ns"), c["ax1"]], [n("ns1")]),
        helper.make_node("Add", [n("ps1"), n("ns1")], [n("cs1")]),                                 # [B, 1] columns
        helper.make_node("Concat", [n("ns1"), n("cs1")], [n("nscs")], axis=1),                     # [B, 2]
        helper.make_node("Mul", [n("ns1"), c["zeros2"]], [n("z2")]),
        helper.make_node("Mul", [n("ns1"), c["zeros5"]], [n("z5")]),
        helper.make_node("Concat", [n("z2"), n("ns1"), n("z5")], [n("pads")], axis=1),             # [B, 8]
    ]
    return nodes, {k: n(k) for k in ("cs1", "ns1", "nscs", "pads")}


def _scan_body(p: str, mask: str, c: dict) -> onnx.GraphProto:
    n = lambda s: f"{p}/row/{s}"  # noqa: E731
    ins = ["q", "kv", "cs", "ns", "nscs", "pads"]
    nodes = [
        helper.make_node("Slice", [n("q"), n("ns"), c["big1"], c["ax2"]], [n("qv")]),
        helper.make_node("Slice", [n("kv"), n("cs"), c["big1"], c["ax2"]], [n("kvv")]),
        helper.make_node("Slice", [mask, n("nscs"), c["big2"], c["ax01"]], [n("mv")]),
        *_core_nodes(n, n("qv"), n("kvv"), n("mv"), n("ov"), c),
        helper.make_node("Pad", [n("ov"), n("pads")], [n("o")], mode="constant"),
    ]
    types = [TensorProto.FLOAT] * 2 + [TensorProto.INT64] * 4
    return helper.make_graph(nodes, f"{p}_row", [_vi(n(i), t, None) for i, t in zip(ins, types)],
                             [_vi(n("o"), TensorProto.FLOAT, None)])


def expand_row_attention(proto: onnx.ModelProto) -> list[dict]:
    """Replace every ``edgekit::RowAttention`` placeholder in place (see the module doc); returns
    one description per replaced node."""
    found = [node for node in proto.graph.node if node.domain == DOMAIN and node.op_type == OP]
    if not found:
        return []
    kvls = {helper.get_attribute_value(a) for node in found for a in node.attribute if a.name == "kvl"}
    if len(kvls) != 1:
        raise ValueError(f"RowAttention placeholders disagree on the latent width: {sorted(kvls)}")
    c = _constants(proto, kvls.pop())
    out, done, cond = [], [], None
    for node in proto.graph.node:
        if node.domain != DOMAIN or node.op_type != OP:
            out.append(node)
            continue
        q, past4, new4, mask, pad = node.input
        if cond is None:
            nodes, cond = _condition(pad, c)
            out += nodes
        p = f"rowattn.{len(done)}"
        n = lambda s, p=p: f"{p}/{s}"  # noqa: E731
        nb = lambda s, p=p: f"{p}/batch/{s}"  # noqa: E731
        batch = [helper.make_node("Concat", [past4, new4], [nb("kv")], axis=2),
                 *_core_nodes(nb, q, nb("kv"), mask, n("o_batch"), c)]
        then_g = helper.make_graph(batch, f"{p}_batch", [], [_vi(n("o_batch"), TensorProto.FLOAT, None)])
        starts, st = _starts(lambda s, p=p: f"{p}/rows/{s}", q, past4, pad, c)
        else_nodes = starts + [
            helper.make_node("Concat", [past4, new4], [n("kv")], axis=2),
            helper.make_node("Unsqueeze", [q, c["ax1"]], [n("q5")]),          # scan slices axis 0: rows keep rank 4
            helper.make_node("Unsqueeze", [n("kv"), c["ax1"]], [n("kv5")]),
            helper.make_node("Scan", [n("q5"), n("kv5"), st["cs1"], st["ns1"], st["nscs"], st["pads"]],
                             [n("o5")], num_scan_inputs=6, body=_scan_body(p, mask, c)),
            helper.make_node("Squeeze", [n("o5"), c["ax1"]], [n("o_rows")]),
        ]
        else_g = helper.make_graph(else_nodes, f"{p}_rows", [], [_vi(n("o_rows"), TensorProto.FLOAT, None)])
        out.append(helper.make_node("If", [cond], list(node.output), name=p, then_branch=then_g, else_branch=else_g))
        done.append({"node": p, "inputs": list(node.input)})
    del proto.graph.node[:]
    proto.graph.node.extend(out)
    # the placeholder was typed like q ([.., W]); its output is [.., kvl]: drop the traced shape
    outs = {o for node in found for o in node.output}
    keep = [v for v in proto.graph.value_info if v.name not in outs]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)
    return done
