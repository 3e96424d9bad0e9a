"""Post-processing of the traced ONNX graph: onnxsim, MoE node names, metadata; the model hash.

Invariants: simplification keeps input/output names and dynamic axes (onnxsim does); MoE nodes are
named ``moe.{layer}`` with initializers ``ffn.{layer}.fc1`` / ``ffn.{layer}.fc2`` so later passes
(int8 QMoE conversion) can find them; metadata_props hold strings only.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys

import onnx

from .moe_portable import expand_sparse_experts
from .row_attention import expand_row_attention


def model_hash(model) -> str:
    """sha256 over the config (as written to config.json) and every tensor's name, dtype and bytes."""
    import torch

    from ..checkpoint import config_from_args
    h = hashlib.sha256(json.dumps(config_from_args(model.args), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    try:
        simple, ok = onnxsim.simplify(proto)
    except Exception as e:  # onnxsim is best-effort: an unsimplified graph is still correct
        print(f"warning: onnxsim failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              "keeping the unsimplified graph", file=sys.stderr)
        return proto
    if not ok:
        print("warning: onnxsim check failed; keeping the unsimplified graph", file=sys.stderr)
        return proto
    return simple


def _moe_nodes(proto: onnx.ModelProto) -> list[dict]:
    """Rename ``com.microsoft::MoE`` nodes to ``moe.{layer}`` and describe them for quantizers."""
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    nodes = []
    for n in proto.graph.node:
        if n.op_type != "MoE" or n.domain != "com.microsoft":
            continue
        m = re.match(r"ffn\.(\d+)\.fc1$", n.input[2])
        layer = int(m.group(1)) if m else len(nodes)
        n.name = f"moe.{layer}"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        E, two_i, D = shapes.get(n.input[2], [None] * 3)
        nodes.append({"layer": layer, "node": n.name, "fc1": n.input[2], "fc2": n.input[4],
                      "experts": E, "inter_size": two_i // 2 if two_i else None, "hidden_size": D,
                      "k": attrs.get("k"), "swiglu_fusion": attrs.get("swiglu_fusion"),
                      "normalize_routing_weights": attrs.get("normalize_routing_weights"),
                      "router_probs": n.input[1]})
    return nodes


def finish_graph(proto: onnx.ModelProto, simplify: bool, meta: dict[str, str]) -> dict[str, list[dict]]:
    """Expand portable expert placeholders, simplify (optionally), name MoE nodes and set metadata,
    in place; returns {"moe_nodes": [contrib MoE nodes], "sparse_experts": [portable If nodes]}."""
    expand_row_attention(proto)                # before the sparse experts, which drop the edgekit opset
    sparse = expand_sparse_experts(proto)
    if simplify:
        proto.CopyFrom(_simplify(proto))
    nodes = {"moe_nodes": _moe_nodes(proto), "sparse_experts": sparse}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=str(v))
    proto.producer_name = "edgekit"
    return nodes
