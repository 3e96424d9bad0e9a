"""Layer-by-layer ONNX export: the graph ``export.export`` writes, traced one decoder layer at a time
and stitched, with weights written to external data as each layer is done.

What: ``export_layered(source, out_dir, config)`` where ``source`` is a layer source
(``edgekit.lazy.CheckpointReader``, ``edgekit.stream.ModelSource`` or a checkpoint path) traces
- the prologue (token embedding and ``graph.shared``: RoPE rows per row from ``left_pad``, the causal
  mask of the new tokens: what ``LatentDecoder.forward`` computes once per call),
- each decoder layer ``i`` with its own weights (``_LayerStep``: ``LatentDecoder.attention`` with
  its ``RowAttention`` placeholder, the dense FFN or the MoE through the same
  ``ContribMoE``/``PortableMoE``),
- the epilogue (final norm, row selection by ``logits_keep``, lm_head),
each under ``graph.name_keyed_weights`` and with module paths equal to ``LatentDecoder``'s, so every
weight gets the initializer name the single trace gives it (``model.model.layers.{i}...weight_t``,
``absorbed.{i}.w_uk``, ``ffn.{i}.fc1``). Other values and nodes of piece ``i`` go under
``/layers.{i}/``. Each piece is traced without its weights (``export_params=False``: they become
graph inputs of the initializer names) and the weights are then written from the module's own
tensors as initializers appended to ``model.onnx.data``, before the next layer is read. The
stitched graph then goes through the single trace's own post-processing and writer
(``export.write_export``: row attention and sparse experts expanded, MoE nodes named, the ``units``
map, ``export.json``), so later passes (``quantize.apply.quantize_export``) read it as any export.
``model_hash`` is the single trace's, computed reading one tensor at a time. Each piece computed
the call's batch, length and cache length from its own inputs; ``share_shapes`` points those shape
nodes at layer 0's, so onnxruntime merges the copies at load (v3-nano int8 with fp16 cache: 639 ->
616 nodes per call after onnxruntime's optimizations; logits bit-identical).

Why: tracing the whole ``LatentDecoder`` needs every weight in memory (and torch's exporter holds
a second copy while it builds the protobuf): for a 6.4 GB checkpoint that alone is > 13 GB. Here
the peak is about two copies of one layer: its weights as read plus the MoE op's stacked expert
tensors while they are built (the experts are then dropped). Traced with its weights, one piece
cost ~4 copies of the layer (module, torch's protobuf, its serialized bytes, the re-parse in
``_add_onnxscript_fn``; measured: ``benchmarks/results/memory_v3-400m_2c.md``).

Invariants: same inputs, outputs, dynamic axes, initializer names and units as ``export``; the
files are byte for byte those of tracing each piece with its weights; logits equal the
single-trace export's (fp32, ~1e-6; both in tests/test_export_layered.py); the output directory
appears only when complete; weights are external once they exceed
``config.external_data_threshold`` (else inline, as ``export``). onnxsim is never run (the graph is
built for models whose weights do not fit one protobuf).

Failure modes: as ``export`` (routing the contrib MoE op cannot express).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..atomic import atomic_dir
from ..errors import EdgekitError
from ..heap import release
from .graph import _Absorbed, _Shared, name_keyed_weights, shared

ALIGN = 64


def _paths(**mods) -> nn.Module:
    """An empty module holding ``mods`` under their names (``model.model.layers.{i}`` paths)."""
    m = nn.Module()
    for k, v in mods.items():
        setattr(m, k, v)
    return m


class _Prologue(nn.Module):
    """(input_ids, past_latent.0, left_pad) -> (x, cs3, cs4, mask): ``graph.shared``."""

    def __init__(self, embed: nn.Embedding, inv_freq: torch.Tensor, scale: float):
        super().__init__()
        self.model = _paths(model=_paths(embed_tokens=embed))
        self.rope_scale = scale
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, past0, pad):
        c = shared(self.inv_freq, self.rope_scale, input_ids, past0, pad)
        return self.model.model.embed_tokens(input_ids), c.cs3, c.cs4, c.mask


class _LayerStep(nn.Module):
    """Decoder layer ``i`` of ``LatentDecoder``: (x, past, *shared, pad) -> (x, new). The
    model is registered first, as in ``LatentDecoder``, so shared tensors (the router) take its names.
    ``own_block``: the block was read for this step alone, so its routed experts, stacked into the
    op module's weights and never traced, are dropped (one copy of them in memory, not two), and its
    other tensors are copied out of the checkpoint reader's memory map (safetensors hands out views of
    the mapped file; the map, and every page of it read, stays resident while any view lives)."""

    def __init__(self, block, args, i: int, moe: str, own_block: bool = False):
        super().__init__()
        from ..model import MoE
        from .graph import LatentDecoder, rope_matrices

        self.model = _paths(model=_paths(layers=nn.ModuleDict({str(i): block})))
        self.model.args = args
        attn = block.self_attn
        H, nope, v, kvl = attn.n_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
        wkv = attn.kv_b_proj.weight.detach().view(H, nope + v, kvl)
        self.absorbed = nn.ModuleDict({str(i): _Absorbed(wkv[:, :nope].contiguous(),
                                                         wkv[:, nope:].transpose(1, 2).contiguous())})
        mlp = block.mlp
        if isinstance(mlp, MoE):
            from .moe_contrib import ContribMoE
            from .moe_portable import PortableMoE
            mlp = (ContribMoE if moe == "contrib" else PortableMoE)(mlp, args, args.for_layer(i))
            if own_block:
                del block.mlp.experts
        if own_block:                       # the rest of the block off the checkpoint's memory map (a few MB):
            for mod in block.modules():     # the map, and the experts' resident pages in it, then go
                for k, t in mod._parameters.items():   # new tensors, not ``.data =``: a view keeps its base
                    if t is not None:
                        mod._parameters[k] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                for k, t in mod._buffers.items():
                    if t is not None:
                        mod._buffers[k] = t.detach().clone()
        self.ffn = nn.ModuleDict({str(i): mlp})
        self.i = str(i)
        self._attention = LatentDecoder.attention
        rot, fold = rope_matrices(args.qk_rope_head_dim, args.rope_interleave)    # as LatentDecoder's
        self.register_buffer("rope_rot", rot, persistent=False)
        self.register_buffer("rope_fold", fold, persistent=False)

    def forward(self, x, past, cs3, cs4, mask, pad):
        ctx = _Shared(x.shape[0], x.shape[1], past.shape[1], None, None, cs3, cs4, mask, pad)
        blk = self.model.model.layers[self.i]
        h, new = self._attention(self, blk.self_attn, self.absorbed[self.i], blk.input_layernorm(x), ctx, past)
        x = x + h
        x = x + self.ffn[self.i](blk.post_attention_layernorm(x))
        return x, new


class _Epilogue(nn.Module):
    def __init__(self, norm, lm_head):
        super().__init__()
        self.model = _paths(model=_paths(norm=norm), lm_head=lm_head)

    def forward(self, x, keep):
        T = x.shape[1]
        idx = torch.arange(T, device=x.device)
        rows = torch.where(idx >= T - keep)[0]                                  # last `keep` positions
        return self.model.lm_head(self.model.model.norm(x).index_select(1, rows))


# torch dtype -> ONNX element type of the weights a piece can carry (others: traced with its weights)
_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
               torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32,
               torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8,
               torch.bool: onnx.TensorProto.BOOL}


def _trace(module, args: tuple, names_in, names_out, axes, opset: int, path: Path,
           custom: tuple = ()) -> tuple[onnx.ModelProto, list[tuple[str, torch.Tensor]]]:
    """One piece, traced as ``export._trace`` traces the whole decoder (name-keyed linears), without
    its weights: ``export_params=False`` makes each weight a graph input named as the single trace
    names its initializer, so torch's exporter never copies a weight into a protobuf (with them it
    holds the module's tensors, its protobuf, the serialized bytes and a second parsed copy: ~4x the
    layer). Returns the weight-free piece (``path``: a scratch file, removed) and ``(name, tensor)``
    of those inputs in the exporter's order, the module's own tensors (views, no copy), for
    ``_Sink.add`` to write as initializers. Safety net: where an input is not a tensor of the module's
    state (a value torch's constant folding computed) or has a dtype ``_ONNX_TYPES`` lacks, the piece
    is traced again with its weights in the protobuf (more memory, same graph) and the list is empty.
    ``custom``: the custom op domains the piece uses."""
    def run(params: bool) -> onnx.ModelProto:
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=opset, input_names=names_in,
                          output_names=names_out, dynamic_axes=axes, export_params=params,
                          custom_opsets=dict.fromkeys(custom, 1))
        proto = onnx.ModelProto()
        proto.ParseFromString(path.read_bytes())
        path.unlink()
        return proto

    with torch.no_grad(), warnings.catch_warnings(), name_keyed_weights(module):
        warnings.simplefilter("ignore")
        state = module.state_dict(keep_vars=True)
        proto = run(False)
        g = proto.graph
        extra = [v.name for v in g.input if v.name not in set(names_in)]
        if any(n not in state or state[n].dtype not in _ONNX_TYPES for n in extra):
            return run(True), []
        weights = [(n, state[n].detach()) for n in extra]
    kept = [v for v in g.input if v.name in set(names_in)]
    del g.input[:]
    g.input.extend(kept)
    return proto, weights


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


class _Sink:
    """The stitched graph under construction and its external data file.

    Memory: protobuf (upb) keeps a parsed piece's whole arena, weight bytes included, alive while
    any of its sub-messages is referenced, and clearing ``raw_data`` frees nothing. So each piece's
    nodes and (externalized) initializers are copied into a small ``GraphProto`` of their own and
    the traced piece is dropped whole: the sink holds graph structure, never weights."""

    def __init__(self, data_path: Path | None):
        self.parts, self.opsets, self.names = [], {}, set()
        self.data_path, self.offset = data_path, 0
        self.f = open(data_path, "wb") if data_path else None

    def add(self, proto: onnx.ModelProto, wires: dict[str, str], prefix: str,
            weights: list[tuple[str, torch.Tensor]] = ()) -> None:
        """Append one traced piece and its ``weights`` (``_trace``: written here, one tensor at a
        time, as initializers after the piece's own): its inputs/outputs are wired by ``wires``
        (names not in it stay), module weights (``weights``, initializers not named ``onnx::*``/``/*``
        by the exporter) keep their names, every other value and node goes under ``prefix``."""
        g = proto.graph
        keep = {i.name for i in g.input} | {o.name for o in g.output}
        fixed = {t.name for t in g.initializer if not t.name.startswith(("onnx::", "/"))} | {n for n, _ in weights}

        def nm(x: str) -> str:
            if not x or x in fixed or (x in keep and x not in wires):
                return x
            return wires.get(x) or prefix + x.lstrip("/")

        _rename(g, nm)
        part = onnx.GraphProto()          # copies: nothing here refers into ``proto`` (see the class doc)
        for n in g.node:
            if n.name:
                n.name = prefix + n.name.lstrip("/")
        part.node.extend(g.node)
        for t in g.initializer:
            t.name = nm(t.name)
            if t.name in self.names:      # a constant every layer holds (the RoPE matrices): kept once
                continue
            self.names.add(t.name)
            self._store(t)
            part.initializer.append(t)
        for name, w in weights:
            if name not in self.names:
                self.names.add(name)
                part.initializer.append(self._tensor(name, w))
        self.parts.append(part)
        for op in proto.opset_import:
            self.opsets[op.domain] = max(self.opsets.get(op.domain, 0), op.version)

    def _store(self, t: onnx.TensorProto) -> None:
        if self.f is None or not t.HasField("raw_data") or len(t.raw_data) < 1024:
            return
        self._external(t, t.raw_data)
        t.ClearField("raw_data")

    def _external(self, t: onnx.TensorProto, raw) -> None:
        """Append ``raw`` (bytes or a byte buffer) to the data file; ``t`` points at it."""
        pad = (-self.offset) % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        n = memoryview(raw).nbytes
        self.f.write(raw)
        del t.external_data[:]                 # as onnx.external_data_helper.set_external_data writes it
        for k, v in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(n))):
            t.external_data.add(key=k, value=v)
        t.data_location = onnx.TensorProto.EXTERNAL
        self.offset += n

    def _tensor(self, name: str, w: torch.Tensor) -> onnx.TensorProto:
        """The initializer the exporter would write for ``w`` (raw little-endian bytes), external as
        ``_store`` makes it; the bytes go from ``w`` to the file (one contiguous copy of ``w`` at most,
        for a transposed ``weight_t`` view)."""
        t = onnx.TensorProto(name=name, data_type=_ONNX_TYPES[w.dtype], dims=list(w.shape))
        raw = w.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self.f is None or raw.nbytes < 1024:
            t.raw_data = raw.tobytes()
        else:
            self._external(t, raw)
        return t

    def close(self):
        if self.f:
            self.f.close()


def _state_items(src):
    """(name, tensor) of the source's ``state_dict`` in name order, read one tensor at a time."""
    from ..shapes import meta_model

    if hasattr(src, "model"):                        # an in-memory model
        yield from sorted(src.model.state_dict().items())
        return
    tied = src.args.tie_word_embeddings
    for k in sorted(meta_model(src.args).state_dict()):
        name = "model.embed_tokens.weight" if tied and k == "lm_head.weight" else k
        yield k, src.read([name])[name]


def export_layered(source, out_dir: str | os.PathLike, config=None, tokenizer_from=None,
                   device: str = "cpu", log=None) -> Path:
    """Export ``source`` layer by layer to ``out_dir`` (see module doc); returns the directory."""
    from ..model import rope_frequencies
    from ..shapes import meta_model
    from ..stream import as_source
    from . import GRAPH_FILE, ExportConfig, write_export
    from .graph import dynamic_axes
    from .moe_contrib import contrib_routing
    from .onnx_io import tensors_hash

    cfg = config or ExportConfig()
    src = as_source(source)
    a = src.args
    L, W = a.num_hidden_layers, a.kv_lora_rank + a.qk_rope_head_dim
    contrib = cfg.moe == "contrib"
    if contrib:
        for i in range(L):
            la = a.for_layer(i)
            if la.is_moe and contrib_routing(a, la) is None:
                raise EdgekitError(f"layer {i}: the com.microsoft MoE op cannot express this routing; "
                                   "export with moe='portable'")
    weight_bytes = sum(int(np.prod(t.shape)) * 4 for t in meta_model(a).state_dict().values())
    large = weight_bytes > cfg.external_data_threshold
    axes = dynamic_axes(L)
    gen = torch.Generator().manual_seed(0)                   # as export._trace: nothing specialises
    ids = torch.randint(0, a.vocab_size, (2, 3), generator=gen)
    past, pad, keep = torch.zeros(2, 2, W), torch.tensor([0, 1]), torch.tensor(2)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        sink = _Sink(tmp / (GRAPH_FILE + ".data") if large else None)
        piece = tmp / ".piece.onnx"           # one traced piece at a time (_trace's scratch file)
        names = ["cs3", "cs4", "mask"]
        wired = {n: f"/shared/{n}" for n in names}
        rope_axes = {0: "pad_batch", 1: "seq"}
        shared_axes = {**dict.fromkeys(names[:2], rope_axes), "mask": {0: "seq", 1: "total_seq"}}
        try:
            inv_freq, scale = rope_frequencies(a)
            pro = _Prologue(src.embedding(), inv_freq, scale)
            with torch.no_grad():           # no autograd graph: it would keep every layer's weights alive
                x, *sh = pro(ids, past, pad)
            traced = _trace(pro, (ids, past, pad), ["input_ids", "past_latent.0", "left_pad"], ["x", *names],
                            {"input_ids": axes["input_ids"], "past_latent.0": axes["past_latent.0"],
                             "left_pad": axes["left_pad"], "x": {0: "batch", 1: "seq"}, **shared_axes},
                            cfg.opset, piece)
            del pro
            sink.add(traced[0], {"x": "/layers.0/x_in", **wired}, "/embed/", traced[1])
            del traced
            release()
            for i in range(L):
                custom = ("edgekit", "com.microsoft") if contrib and a.for_layer(i).is_moe else ("edgekit",)
                step = _LayerStep(src.layer(i, device), a, i, cfg.moe, own_block=not hasattr(src, "model")).cpu()
                with torch.no_grad():
                    x_out, _ = step(x, past, *sh, pad)
                traced = _trace(step, (x, past, *sh, pad), ["x", "past", *names, "pad"], ["x_out", "new"],
                                {"x": {0: "batch", 1: "seq"}, "past": {0: "batch", 1: "past_seq"}, **shared_axes,
                                 "pad": axes["left_pad"], "x_out": {0: "batch", 1: "seq"},
                                 "new": {0: "batch", 1: "seq"}}, cfg.opset, piece, custom)
                del step                    # its weights live on only in traced[1], until written
                sink.add(traced[0], {"x": f"/layers.{i}/x_in", "past": f"past_latent.{i}", **wired,
                                     "pad": "left_pad", "x_out": f"/layers.{i + 1}/x_in",
                                     "new": f"new_latent.{i}"}, f"/layers.{i}/", traced[1])
                del traced
                x = x_out
                release()                   # this layer's freed buffers back to the OS (edgekit.heap)
                if log:
                    log(f"export: layer {i + 1}/{L}")
            epi = _Epilogue(*src.head())
            traced = _trace(epi, (x, keep), ["x", "logits_keep"], ["logits"],
                            {"x": {0: "batch", 1: "seq"}, "logits": axes["logits"]}, cfg.opset, piece)
            del epi
            sink.add(traced[0], {"x": f"/layers.{L}/x_in"}, "/head/", traced[1])
            del traced
            release()
        finally:
            sink.close()
        proto = onnx.helper.make_model(_assemble(sink, a, W), producer_name="edgekit", opset_imports=[
            onnx.helper.make_opsetid(d, v) for d, v in sorted(sink.opsets.items())])
        proto.ir_version = 8
        write_export(tmp, proto, a, cfg, digest=tensors_hash(a, _state_items(src)),
                     model_name=getattr(src, "name", None), simplify=False, large=large, linears=None,
                     tokenizer_from=tokenizer_from, data_written=large, extra={"layered": True})
    return out


def share_shapes(nodes, num_layers: int) -> int:
    """Point every ``Shape`` of a layer's hidden state (``/layers.{i}/x_in``, [B, T, D] for every i)
    at layer 0's, and of a layer's cache (``past_latent.{i}``, [B, P, W] for every i) at layer 0's.
    Each piece was traced on its own inputs, so each computed B, T and P from them (the single trace
    takes them from ``input_ids`` once): ~6 nodes of shape arithmetic per layer ran on every call. With one source,
    the copies are identical nodes, which onnxruntime's common-subexpression pass merges at load
    (with its constant sharing for their index constants). Values are unchanged. Returns how many
    Shape nodes were rewired. Invariant it relies on, as the single trace does (its P comes from
    ``past_latent.0``): every layer gets the same batch and past length (``OrtModel`` binds all
    layers from one cache)."""
    first = {"x_in": "/layers.0/x_in", "past": "past_latent.0"}
    pat = {"x_in": re.compile(r"/layers\.(\d+)/x_in"), "past": re.compile(r"past_latent\.(\d+)")}
    n_rewired = 0
    for n in nodes:
        if n.op_type != "Shape" or not n.input:
            continue
        for kind, rx in pat.items():
            m = rx.fullmatch(n.input[0])
            if m and int(m.group(1)) <= num_layers and n.input[0] != first[kind]:
                n.input[0] = first[kind]
                n_rewired += 1
    return n_rewired


def _assemble(sink: _Sink, a, W: int) -> onnx.GraphProto:
    """The graph inputs and outputs of ``export``'s graph around the stitched nodes (the shape nodes
    of the pieces sharing one source, ``share_shapes``)."""
    from onnx import TensorProto, helper

    from .graph import io_names

    ins, outs = io_names(a.num_hidden_layers)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "past_seq", W]) for n in ins[1:-2]]
    inputs += [helper.make_tensor_value_info("logits_keep", TensorProto.INT64, []),
               helper.make_tensor_value_info("left_pad", TensorProto.INT64, ["pad_batch"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "logits_seq", a.vocab_size])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", W]) for n in outs[1:]]
    nodes = [n for p in sink.parts for n in p.node]
    share_shapes(nodes, a.num_hidden_layers)
    return helper.make_graph(nodes, "edgekit_decoder", inputs, outputs, [t for p in sink.parts for t in p.initializer])
