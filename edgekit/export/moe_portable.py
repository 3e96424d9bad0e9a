"""Routed experts in plain ONNX ops whose per-token cost does not grow with the expert count.

What: ``PortableMoE(moe, args, la)`` replaces a model ``MoE`` at export time. The router and shared
experts trace as usual; the routed experts trace as a placeholder node
``edgekit::SparseExperts(x [N, D], weights [N, k], indices [N, k], fc1 [E, D, 2I], fc2 [E, I, D])``
that ``expand_sparse_experts(proto)`` then replaces with an ``If`` on the token count:
- few tokens (N * k <= E, i.e. decode): gather the k chosen experts' weights per token and run
  batched mat-vecs: ~13 nodes whatever E is, and only the chosen experts' weights are read;
- many tokens (prefill): an ONNX ``Loop`` over experts, each gathering its tokens (NonZero),
  running its SwiGLU and scatter-adding (ScatterND add) the weighted result: reads every used
  expert once, compute proportional to the routed tokens.

Why: dispatching with one unrolled where/index_add block per expert (the model's own MoE) costs
~25 ONNX nodes per expert on every call, so decode time grew 2.5x from 8 to 32 experts at equal
active parameters (benchmarks/expert_scaling.py). Only standard ops (opset 17) are used, so the
graph runs on onnxruntime-web and minimal builds.

Invariants: fc1 columns are [gate | up]; weights are the model's (normalised, scaled) top-k
weights, so the result equals ``MoE.forward`` minus the shared experts.
"""

from __future__ import annotations

import re

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

DOMAIN, OP = "edgekit", "SparseExperts"


class _SparseExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, idx, fc1, fc2):
        """x [N, D], w/idx [N, k], fc1 [E, D, 2I], fc2 [E, I, D] -> [N, D] (torch reference)."""
        y = torch.zeros_like(x)
        for e in range(fc1.shape[0]):
            token, slot = torch.where(idx == e)
            g, u = (x[token] @ fc1[e]).chunk(2, dim=-1)
            y = y.index_add(0, token, (F.silu(g) * u) @ fc2[e] * w[token, slot].unsqueeze(-1))
        return y

    @staticmethod
    def symbolic(g, x, w, idx, fc1, fc2):
        out = g.op(f"{DOMAIN}::{OP}", x, w, idx, fc1, fc2)
        out.setType(x.type())
        return out


class PortableMoE(nn.Module):
    def __init__(self, moe, args, la):
        super().__init__()
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        ex = moe.experts
        fc1 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).t() for e in ex])   # [E, D, 2I]
        self.register_buffer("fc1", fc1.detach().contiguous())
        self.register_buffer("fc2", torch.stack([e.down_proj.weight.t() for e in ex]).detach().contiguous())

    def forward(self, x):
        """x [B, T, D] -> [B, T, D]."""
        x3, x = x, x.reshape(-1, x.shape[-1])                               # [N, D] (D is static)
        w, idx = self.gate(x)                                               # [N, k]
        y = _SparseExperts.apply(x, w, idx, self.fc1, self.fc2)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view_as(x3)


# ---------------------------------------------------------------------------------------------
# ONNX: placeholder -> If(gathered mat-vecs, Loop over experts)
# ---------------------------------------------------------------------------------------------
def _c(name: str, values, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))


def _scalar(name: str, dtype, value):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))


_vi = helper.make_tensor_value_info


def _gathered(p: str, x, w, idx, fc1, fc2, inter: int) -> onnx.GraphProto:
    n = lambda s: f"{p}/g/{s}"  # noqa: E731
    nodes = [
        _c(n("shape_x"), [0, 1, 1, -1]), helper.make_node("Reshape", [x, n("shape_x")], [n("x4")]),  # [N,1,1,D]
        helper.make_node("Gather", [fc1, idx], [n("w1")], axis=0),                                   # [N,k,D,2I]
        helper.make_node("MatMul", [n("x4"), n("w1")], [n("h")]),                                    # [N,k,1,2I]
        helper.make_node("Split", [n("h"), n("split")], [n("gate"), n("up")], axis=-1),
        helper.make_node("Sigmoid", [n("gate")], [n("sig")]),
        helper.make_node("Mul", [n("gate"), n("sig")], [n("silu")]),
        helper.make_node("Mul", [n("silu"), n("up")], [n("act")]),                                   # [N,k,1,I]
        helper.make_node("Gather", [fc2, idx], [n("w2")], axis=0),                                   # [N,k,I,D]
        helper.make_node("MatMul", [n("act"), n("w2")], [n("y4")]),                                  # [N,k,1,D]
        _c(n("axes"), [2]), helper.make_node("Squeeze", [n("y4"), n("axes")], [n("y3")]),            # [N,k,D]
        _c(n("last"), [-1]), helper.make_node("Unsqueeze", [w, n("last")], [n("w3")]),               # [N,k,1]
        helper.make_node("Mul", [n("y3"), n("w3")], [n("yw")]),
        _c(n("k_axis"), [1]), helper.make_node("ReduceSum", [n("yw"), n("k_axis")], [n("y")], keepdims=0),
    ]
    nodes.insert(0, _c(n("split"), [inter, inter]))
    return helper.make_graph(nodes, f"{p}_gathered", [], [_vi(n("y"), TensorProto.FLOAT, None)])


def _loop_body(p: str, x, w, idx, fc1, fc2, inter: int) -> onnx.GraphProto:
    n = lambda s: f"{p}/l/{s}"  # noqa: E731
    nodes = [
        helper.make_node("Equal", [idx, n("e")], [n("mask")]),                                       # [N,k]
        helper.make_node("NonZero", [n("mask")], [n("nz")]),                                         # [2,n]
        helper.make_node("Transpose", [n("nz")], [n("pairs")], perm=[1, 0]),                         # [n,2]
        _c(n("zero"), [0]), helper.make_node("Gather", [n("nz"), n("zero")], [n("tok2")], axis=0),   # [1,n]
        helper.make_node("Transpose", [n("tok2")], [n("tok")], perm=[1, 0]),                         # [n,1]
        helper.make_node("GatherND", [w, n("pairs")], [n("we")]),                                    # [n]
        helper.make_node("GatherND", [x, n("tok")], [n("xe")]),                                      # [n,D]
        helper.make_node("Gather", [fc1, n("e")], [n("w1")], axis=0),                                # [D,2I]
        helper.make_node("MatMul", [n("xe"), n("w1")], [n("h")]),
        _c(n("split"), [inter, inter]),
        helper.make_node("Split", [n("h"), n("split")], [n("gate"), n("up")], axis=-1),
        helper.make_node("Sigmoid", [n("gate")], [n("sig")]),
        helper.make_node("Mul", [n("gate"), n("sig")], [n("silu")]),
        helper.make_node("Mul", [n("silu"), n("up")], [n("act")]),
        helper.make_node("Gather", [fc2, n("e")], [n("w2")], axis=0),                                # [I,D]
        helper.make_node("MatMul", [n("act"), n("w2")], [n("ye")]),                                  # [n,D]
        _c(n("last"), [-1]), helper.make_node("Unsqueeze", [n("we"), n("last")], [n("we2")]),
        helper.make_node("Mul", [n("ye"), n("we2")], [n("yw")]),
        helper.make_node("ScatterND", [n("y_in"), n("tok"), n("yw")], [n("y_out")], reduction="add"),
        helper.make_node("Identity", [n("cond_in")], [n("cond_out")]),
    ]
    return helper.make_graph(
        nodes, f"{p}_body",
        [_vi(n("e"), TensorProto.INT64, []), _vi(n("cond_in"), TensorProto.BOOL, []),
         _vi(n("y_in"), TensorProto.FLOAT, None)],
        [_vi(n("cond_out"), TensorProto.BOOL, []), _vi(n("y_out"), TensorProto.FLOAT, None)])


def _looped(p: str, x, w, idx, fc1, fc2, inter: int, experts: int) -> onnx.GraphProto:
    n = lambda s: f"{p}/l/{s}"  # noqa: E731
    body = _loop_body(p, x, w, idx, fc1, fc2, inter)
    nodes = [
        _scalar(n("trips"), TensorProto.INT64, experts), _scalar(n("true"), TensorProto.BOOL, True),
        _scalar(n("zero_f"), TensorProto.FLOAT, 0.0),
        helper.make_node("Mul", [x, n("zero_f")], [n("y0")]),      # zeros [N, D] (x * 0: shape-generic)
        helper.make_node("Loop", [n("trips"), n("true"), n("y0")], [n("y")], body=body),
    ]
    return helper.make_graph(nodes, f"{p}_looped", [], [_vi(n("y"), TensorProto.FLOAT, None)])


def expand_sparse_experts(proto: onnx.ModelProto) -> list[dict]:
    """Replace every ``edgekit::SparseExperts`` placeholder in place by an ``If`` named
    ``experts.{layer}``; returns one description per layer (for export.json ``sparse_experts``)."""
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    out, found = [], []
    for node in proto.graph.node:
        if node.domain != DOMAIN or node.op_type != OP:
            out.append(node)
            continue
        x, w, idx, fc1, fc2 = node.input
        experts, hidden, two_i = shapes[fc1]
        m = re.match(r"ffn\.(\d+)\.fc1$", fc1)
        layer = int(m.group(1)) if m else len(found)
        p = f"experts.{layer}"
        out += [
            helper.make_node("Shape", [idx], [f"{p}/shape"]),
            helper.make_node("ReduceProd", [f"{p}/shape"], [f"{p}/routes"], keepdims=0),  # N * k
            _scalar(f"{p}/experts", TensorProto.INT64, experts),
            helper.make_node("LessOrEqual", [f"{p}/routes", f"{p}/experts"], [f"{p}/few"]),
            helper.make_node("If", [f"{p}/few"], list(node.output), name=p,
                             then_branch=_gathered(p, x, w, idx, fc1, fc2, two_i // 2),
                             else_branch=_looped(p, x, w, idx, fc1, fc2, two_i // 2, experts)),
        ]
        found.append({"layer": layer, "node": p, "fc1": fc1, "fc2": fc2, "experts": experts,
                      "hidden_size": hidden, "inter_size": two_i // 2,
                      "layout": "fc1 [E, D, 2I] columns [gate | up]; fc2 [E, I, D]; "
                                "then-branch Gathers [N, k] experts' weights, else-branch Loop Gathers one per trip"})
    del proto.graph.node[:]
    proto.graph.node.extend(out)
    keep = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return found
