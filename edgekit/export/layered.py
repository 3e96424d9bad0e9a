"""Layer-by-layer ONNX export: the same decoder graph as ``export.graph.LatentDecoder``, traced one
decoder layer at a time and stitched, with weights written to external data as each layer is done.

What: ``export_layered(source, out_dir, config, transform=None)`` where ``source`` is a layer
source (``edgekit.lazy.CheckpointReader`` or ``edgekit.stream.ModelSource``) traces
- the prologue (token embedding, RoPE angles from ``inv_freq`` and the causal mask of the new
  tokens: what ``LatentDecoder.forward`` computes once per call and every layer shares),
- each decoder layer ``i`` with its own weights (``_LayerStep``: absorbed MLA attention against the
  latent cache, the dense FFN or the MoE through the same ``ContribMoE``/``PortableMoE`` modules),
- the epilogue (final norm, row selection by ``logits_keep``, lm_head),
renames every value and node of layer ``i`` under ``/layers.{i}/``, wires the pieces together and
appends each piece's initializers to ``model.onnx.data`` before the next layer is loaded.
``transform(key, proto, units)`` (key: "prologue", a layer index or "epilogue"; ``units``: unit
name -> initializer name in that piece) may rewrite a piece before it is appended (the int8 rewrite
is a pure graph pass, so it runs per layer). The directory gets the same ``export.json``,
``config.json`` and ``tokenizer.json`` as ``edgekit.export.export``, plus ``units`` (module name ->
initializer name) so later passes find weights by name.

Why: tracing the whole ``LatentDecoder`` needs every weight in memory (and torch's exporter holds
a second copy while it builds the protobuf): for a 6.4 GB checkpoint that alone is > 13 GB. Here
the peak is one layer (weights, their traced copy, the stacked expert tensors) + the embedding.

Invariants: the graph has ``export.graph.io_names`` inputs and outputs with the same dynamic axes;
its logits equal the single-trace export's (fp32, ~1e-6; tests/test_export_layered.py); the
output directory appears only when complete; weights are external once they exceed
``config.external_data_threshold`` (else kept inline, as ``export`` does). onnxsim is not run on
external-data graphs (as in ``export``).

Failure modes: as ``export`` (non-fp32 weights, routing the contrib MoE op cannot express).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..atomic import atomic_dir
from ..errors import EdgekitError
from .graph import _Absorbed, _Shared, io_names

ALIGN = 64
_AXES = {"x": {0: "batch", 1: "seq"}, "cos4": {1: "seq"}, "sin4": {1: "seq"}, "future": {0: "seq", 1: "seq"}}
_ATTN = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _single_layer_args(args, i: int):
    """Config of a one-layer model whose layer 0 is layer ``i`` of ``args``."""
    return replace(args, num_hidden_layers=1, layer_overrides={"0": asdict(args.for_layer(i))})


class _Prologue(nn.Module):
    def __init__(self, embed: nn.Embedding, inv_freq: torch.Tensor, scale: float):
        super().__init__()
        self.embed_tokens, self.scale = embed, scale
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, past0):
        T, P = input_ids.shape[1], past0.shape[1]
        idx = torch.arange(T, device=input_ids.device)
        freqs = (idx + P).float()[:, None] * self.inv_freq[None, :]             # [T, rope/2]
        cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        future = idx[None, :] > idx[:, None]                                    # [T, T] masked
        return self.embed_tokens(input_ids), cos[None, :, None, :], sin[None, :, None, :], future


class _LayerStep(nn.Module):
    """One decoder layer of ``LatentDecoder``: (x, past, cos4, sin4, future) -> (x, new)."""

    def __init__(self, block, args, i: int, moe: str):
        super().__init__()
        from ..model import MoE
        from .graph import LatentDecoder

        self.args, self.layer = args, block
        attn = block.self_attn
        H, nope, v, kvl = attn.n_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
        wkv = attn.kv_b_proj.weight.detach().view(H, nope + v, kvl)
        self.absorbed = _Absorbed(wkv[:, :nope].contiguous(), wkv[:, nope:].transpose(1, 2).contiguous())
        mlp = block.mlp
        if isinstance(mlp, MoE):
            from .moe_contrib import ContribMoE
            from .moe_portable import PortableMoE
            mlp = (ContribMoE if moe == "contrib" else PortableMoE)(mlp, args, args.for_layer(i))
        self.ffn = mlp
        self._attention = LatentDecoder.attention

    def forward(self, x, past, cos4, sin4, future):
        B, T, P = x.shape[0], x.shape[1], past.shape[1]
        ctx = _Shared(B, T, P, None, None, cos4, sin4, future)
        blk = self.layer
        h, new = self._attention(self, blk.self_attn, self.absorbed, blk.input_layernorm(x), ctx, past)
        x = x + h
        x = x + self.ffn(blk.post_attention_layernorm(x))
        return x, new

    @property
    def model(self):  # LatentDecoder.attention reads self.model.args
        return self


class _Epilogue(nn.Module):
    def __init__(self, norm, lm_head):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, x, keep):
        T = x.shape[1]
        idx = torch.arange(T, device=x.device)
        rows = torch.where(idx >= T - keep)[0]
        return self.lm_head(self.norm(x).index_select(1, rows))


def _trace(module, args: tuple, names_in, names_out, axes, opset: int, moe: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buf, dynamo=False, opset_version=opset, input_names=names_in,
                          output_names=names_out, dynamic_axes=axes,
                          custom_opsets={"com.microsoft": 1} if moe == "contrib" else {"edgekit": 1})
    return onnx.load_from_string(buf.getvalue())


def prepare(proto: onnx.ModelProto, unit_prefix: str, layer: int | None = None) -> tuple[dict, set, list]:
    """Give a traced piece's module parameters their model names (``param_name``; the experts'
    ``ffn.fc1/fc2`` become ``ffn.{layer}.fc1/fc2`` as in the single trace), expand the portable
    path's expert placeholders (``experts.{layer}``, as ``export.onnx_io.finish_graph`` does).
    Returns (unit name -> initializer name, the fixed parameter names, sparse-expert records)."""
    from .moe_portable import expand_sparse_experts

    ren = {}
    for t in proto.graph.initializer:
        if not t.name.startswith(("onnx::", "/")):
            ren[t.name] = (f"ffn.{layer}.{t.name[4:]}" if t.name in ("ffn.fc1", "ffn.fc2")
                           else param_name(t.name, unit_prefix))
            t.name = ren[t.name]
    _rename(proto.graph, lambda x: ren.get(x, x))
    for n in proto.graph.node:
        if n.op_type == "MoE" and layer is not None:
            n.name = f"moe.{layer}"                  # as export.onnx_io names it (int8 passes key on it)
    sparse = expand_sparse_experts(proto) if layer is not None else []
    return piece_units(proto, unit_prefix), set(ren.values()), sparse


def _rename(g: onnx.GraphProto, nm) -> None:
    """Rename every value of ``g`` and of its subgraphs (If/Loop bodies) with ``nm``."""
    for n in g.node:
        n.input[:] = [nm(x) for x in n.input]
        n.output[:] = [nm(x) for x in n.output]
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_sub(a.g, nm)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _rename_sub(sg, nm)


def _rename_sub(g: onnx.GraphProto, nm) -> None:
    for v in list(g.input) + list(g.output) + list(g.value_info):
        v.name = nm(v.name)
    for t in g.initializer:
        t.name = nm(t.name)
    _rename(g, nm)


def param_name(name: str, unit_prefix: str) -> str:
    """A traced piece's parameter name -> its name in the stitched graph: model tensor names for
    weights kept as they are (norms, router bias, embedding), ``absorbed.{i}.w_uk/w_uv`` as the
    single-trace export names them."""
    layer = unit_prefix.split(".")[2] if unit_prefix.startswith("model.layers.") else None
    if name.startswith("layer."):
        return unit_prefix + name[len("layer."):]
    if layer is not None and name.startswith("absorbed."):
        head, tail = name.split(".", 1)
        return f"{head}.{layer}.{tail}"
    if layer is not None and name.startswith("ffn."):
        return unit_prefix + "mlp." + name[len("ffn."):]
    return "model." + name if not name.startswith("lm_head") else name


def piece_units(proto: onnx.ModelProto, unit_prefix: str) -> dict[str, str]:
    """Quantizable unit name -> (pre-rename) initializer it reads, from the exporter's node scopes:
    ``/layer/self_attn/q_a_proj/MatMul`` reads ``model.layers.{i}.self_attn.q_a_proj``'s weight
    (transposed), ``/ffn/MoE`` the routed experts (recorded as its fc1), ``/embed_tokens/Gather``
    the embedding."""
    init = {t.name: len(t.dims) for t in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        scope = n.name.strip("/").rsplit("/", 1)[0].replace("/", ".") if "/" in n.name.strip("/") else ""
        scope = scope[len("layer."):] if scope.startswith("layer.") else scope
        scope = "mlp." + scope[len("ffn."):] if scope.startswith("ffn.") else ("mlp" if scope == "ffn" else scope)
        if scope.split(".")[0] in _ATTN:               # attention runs outside self_attn's forward
            scope = "self_attn." + scope
        if n.op_type == "MatMul" and len(n.input) > 1 and init.get(n.input[1]) == 2 and scope:
            out[unit_prefix + scope] = n.input[1]
        elif n.op_type == "Gather" and n.input[0] in init:
            out[unit_prefix + scope] = n.input[0]
        elif n.op_type in ("MoE", "QMoE") and len(n.input) > 2 and n.input[2] in init:
            out[unit_prefix + "mlp.experts"] = n.input[2]
    return out


class _Sink:
    """The stitched graph under construction and its external data file."""

    def __init__(self, data_path: Path | None):
        self.nodes, self.inits, self.opsets = [], [], {}
        self.data_path, self.offset = data_path, 0
        self.f = open(data_path, "wb") if data_path else None
        self.units: dict[str, str] = {}

    def add(self, proto: onnx.ModelProto, rename: dict[str, str], prefix: str, fixed: set[str],
            units: dict[str, str]) -> None:
        """Append one prepared piece: graph inputs/outputs are wired by ``rename``, ``fixed`` names
        (model parameters) stay, every other value and node goes under ``prefix``."""
        g = proto.graph
        keep = {i.name for i in g.input} | {o.name for o in g.output}

        def nm(x: str) -> str:
            if not x or x in fixed or (x in keep and x not in rename):
                return x
            return rename.get(x) or prefix + x.lstrip("/")

        present = {t.name for t in g.initializer}
        self.units.update({u: nm(v) for u, v in units.items() if v in present})
        _rename(g, nm)
        for n in g.node:
            if n.name:
                n.name = prefix + n.name.lstrip("/")
            self.nodes.append(n)
        for t in g.initializer:
            t.name = nm(t.name)
            self._store(t)
            self.inits.append(t)
        for op in proto.opset_import:
            self.opsets[op.domain] = max(self.opsets.get(op.domain, 0), op.version)

    def _store(self, t: onnx.TensorProto) -> None:
        if self.f is None or not t.HasField("raw_data") or len(t.raw_data) < 1024:
            return
        pad = (-self.offset) % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        raw = t.raw_data
        self.f.write(raw)
        onnx.external_data_helper.set_external_data(t, self.data_path.name, offset=self.offset, length=len(raw))
        t.data_location = onnx.TensorProto.EXTERNAL
        t.ClearField("raw_data")
        self.offset += len(raw)

    def close(self):
        if self.f:
            self.f.close()


def export_layered(source, out_dir: str | os.PathLike, config=None, tokenizer_from=None, transform=None,
                   device: str = "cpu", log=None) -> Path:
    """Export ``source`` layer by layer to ``out_dir`` (see module doc); returns the directory."""
    from .. import __version__
    from ..checkpoint import config_from_args, resolve
    from ..info import cache_bytes_per_token
    from ..model import rope_frequencies
    from ..shapes import meta_model
    from ..stream import as_source
    from . import GRAPH_FILE, SPEC_FILE, ExportConfig, io_spec
    from .graph import dynamic_axes
    from .moe_contrib import contrib_routing
    from .onnx_io import _moe_nodes

    cfg = config or ExportConfig()
    src = as_source(source)
    a = src.args
    L, W = a.num_hidden_layers, a.kv_lora_rank + a.qk_rope_head_dim
    if cfg.moe == "contrib":
        for i in range(L):
            la = a.for_layer(i)
            if la.is_moe and contrib_routing(a, la) is None:
                raise EdgekitError(f"layer {i}: the com.microsoft MoE op cannot express this routing; "
                                   "export with moe='portable'")
    weight_bytes = sum(int(np.prod(t.shape)) * 4 for t in meta_model(a).state_dict().values())
    large = weight_bytes > cfg.external_data_threshold
    ins, outs = io_names(L)
    axes = dynamic_axes(L)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab_size, (2, 3), generator=gen)
    past = torch.zeros(2, 2, W)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        sink = _Sink(tmp / (GRAPH_FILE + ".data") if large else None)
        sparse: list[dict] = []
        try:
            inv_freq, scale = rope_frequencies(a)
            emb = src.embedding()
            pro = _Prologue(emb, inv_freq, scale)
            x, cos4, sin4, future = pro(ids, past)
            p = _trace(pro, (ids, past), ["input_ids", "past_latent.0"], ["x", "cos4", "sin4", "future"],
                       {"input_ids": axes["input_ids"], "past_latent.0": axes["past_latent.0"], **_AXES},
                       cfg.opset, cfg.moe)
            units, fixed, _ = prepare(p, "model.")
            if transform:
                transform("prologue", p, units)
            shared = {"cos4": "/shared/cos4", "sin4": "/shared/sin4", "future": "/shared/future"}
            sink.add(p, {"x": "/layers.0/x_in", **shared}, "/embed/", fixed, units)
            del emb, pro, p
            for i in range(L):
                block = src.layer(i, device)
                step = _LayerStep(block, a, i, cfg.moe)
                x_out, _ = step(x, past, cos4, sin4, future)
                p = _trace(step, (x, past, cos4, sin4, future), ["x", "past", "cos4", "sin4", "future"],
                           ["x_out", "new"],
                           {**_AXES, "past": {0: "batch", 1: "past_seq"}, "x_out": {0: "batch", 1: "seq"},
                            "new": {0: "batch", 1: "seq"}}, cfg.opset, cfg.moe)
                units, fixed, sp = prepare(p, f"model.layers.{i}.", i)
                sparse += sp
                if transform:
                    transform(i, p, units)
                sink.add(p, {"x": f"/layers.{i}/x_in", "past": f"past_latent.{i}", **shared,
                             "x_out": f"/layers.{i + 1}/x_in", "new": f"new_latent.{i}"},
                         f"/layers.{i}/", fixed, units)
                x = x_out
                del block, step, p
                if log:
                    log(f"export: layer {i + 1}/{L}")
            norm, head = src.head()
            epi = _Epilogue(norm, head)
            keep = torch.tensor(2)
            p = _trace(epi, (x, keep), ["x", "logits_keep"], ["logits"],
                       {"x": {0: "batch", 1: "seq"}, "logits": axes["logits"]}, cfg.opset, cfg.moe)
            units, fixed, _ = prepare(p, "")
            if transform:
                transform("epilogue", p, units)
            sink.add(p, {"x": f"/layers.{L}/x_in"}, "/head/", fixed, units)
        finally:
            sink.close()
        graph = _assemble(sink, a, ins, outs, W)
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                             for d, v in sorted(sink.opsets.items())],
                                       producer_name="edgekit")
        proto.ir_version = 8
        spec = io_spec(a)
        for k, v in {"edgekit.version": __version__, "edgekit.io_spec": json.dumps(spec),
                     "edgekit.model_hash": "streamed"}.items():
            proto.metadata_props.add(key=k, value=v)
        experts = {"moe_nodes": _moe_nodes(proto), "sparse_experts": sparse}
        onnx.save_model(proto, str(tmp / GRAPH_FILE))
        doc = {
            "format": "edgekit-onnx/1", "edgekit_version": __version__, "model_hash": "streamed",
            "model_name": getattr(src, "name", None), "graph": GRAPH_FILE, "external_data": large,
            "simplified": False, "opset": cfg.opset, "moe": cfg.moe, "dtype": "float32", "layered": True,
            "num_layers": L, "vocab_size": a.vocab_size, "max_position_embeddings": a.max_position_embeddings,
            "bos_token_id": a.bos_token_id, "eos_token_id": a.eos_token_id,
            "cache": {"width": W, "kv_lora_rank": a.kv_lora_rank, "qk_rope_head_dim": a.qk_rope_head_dim,
                      "row": "[norm(c_kv) (kv_lora_rank) | rope(k_pe) (qk_rope_head_dim)]",
                      "bytes_per_token": cache_bytes_per_token(a)},
            **spec, **experts, "units": sink.units, "config": asdict(cfg),
        }
        (tmp / SPEC_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config_from_args(a), indent=2) + "\n")
        tok = resolve(tokenizer_from) / "tokenizer.json" if tokenizer_from is not None else None
        if tok is not None:
            if not tok.exists():
                raise EdgekitError(f"{tok} not found; pass tokenizer_from= a checkpoint dir with tokenizer.json")
            shutil.copy(tok, tmp / "tokenizer.json")
    return out


def _assemble(sink: _Sink, a, ins: list[str], outs: list[str], W: int) -> onnx.GraphProto:
    from onnx import TensorProto, helper

    L = a.num_hidden_layers
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "past_seq", W]) for n in ins[1:-1]]
    inputs.append(helper.make_tensor_value_info("logits_keep", TensorProto.INT64, []))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "logits_seq", a.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", W]) for n in outs[1:]]
    keep = numpy_helper.from_array(np.array(a.max_position_embeddings, np.int64), "logits_keep")
    assert len(outs) == L + 1
    return helper.make_graph(sink.nodes, "edgekit_decoder", inputs, outputs, sink.inits + [keep])
