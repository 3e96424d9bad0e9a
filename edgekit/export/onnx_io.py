"""Post-processing of the traced ONNX graph: onnxsim, MoE node names, metadata, the unit map; the
model hash.

``graph_units(proto, experts, num_layers)`` maps every weight-carrying unit of the model, by module
name, to the graph node and initializers that hold it (export.json ``units``), read off the names
the trace gives them (``graph.name_keyed_weights``, ``absorbed.{i}.*``, ``ffn.{i}.fc1/fc2``):
    "model.layers.0.self_attn.q_a_proj": {"op": "MatMul", "node": ..., "weights": ["model.model....weight_t"]}
    "model.embed_tokens": {"op": "Gather", ...}; "model.layers.1.mlp.experts": {"op": "MoE" | "If", ...}
    "model.layers.0.self_attn.kv_b_proj": {"op": "absorbed", "node": None, "weights": [w_uk, w_uv]}
Passes over the graph (int8: ``edgekit.quantize.apply``) find their ops by these names.

Invariants: simplification keeps input/output names and dynamic axes (onnxsim does); MoE nodes are
named ``moe.{layer}`` with initializers ``ffn.{layer}.fc1`` / ``ffn.{layer}.fc2``; metadata_props
hold strings only; a unit appears at most once in ``units`` (a second node for it raises).
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
    return tensors_hash(model.args, sorted(model.state_dict().items()))


def tensors_hash(args, items) -> str:
    """``model_hash`` from ``args`` and (name, tensor) pairs in name order; ``items`` may be a
    generator reading one tensor at a time (the layer-by-layer export hashes a checkpoint so)."""
    import torch

    from ..hfconfig import config_from_args
    h = hashlib.sha256(json.dumps(config_from_args(args), sort_keys=True).encode())
    for name, t in items:
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


def graph_units(proto: onnx.ModelProto, experts: dict[str, list[dict]], num_layers: int) -> dict[str, dict]:
    """Module name -> {"op", "node", "weights"} for every unit the graph holds (see module doc)."""
    from .graph import WEIGHT_T

    inits = {i.name for i in proto.graph.initializer}
    units: dict[str, dict] = {}

    def add(unit: str, op: str, node, weights: list[str]) -> None:
        if unit in units:
            raise RuntimeError(f"export: unit {unit} is held by two graph nodes ({units[unit]['node']}, {node})")
        units[unit] = {"op": op, "node": node, "weights": weights}

    for n in proto.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and \
                n.input[1].startswith("model.") and n.input[1].endswith("." + WEIGHT_T):
            add(n.input[1][len("model."):-len(WEIGHT_T) - 1], "MatMul", n.name, [n.input[1]])
        elif n.op_type == "Gather" and n.input[0] in inits and re.fullmatch(r"model\.(.*embed_tokens)\.weight",
                                                                          n.input[0]):
            add(n.input[0][len("model."):-len(".weight")], "Gather", n.name, [n.input[0]])
    for m in experts["moe_nodes"]:
        add(f"model.layers.{m['layer']}.mlp.experts", "MoE", m["node"], [m["fc1"], m["fc2"]])
    for m in experts["sparse_experts"]:
        add(f"model.layers.{m['layer']}.mlp.experts", "If", m["node"], [m["fc1"], m["fc2"]])
    for i in range(num_layers):
        ws = [f"absorbed.{i}.w_uk", f"absorbed.{i}.w_uv"]
        if all(w in inits for w in ws):
            add(f"model.layers.{i}.self_attn.kv_b_proj", "absorbed", None, ws)
    return dict(sorted(units.items()))


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
