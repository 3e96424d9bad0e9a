"""fp16 latent cache: the graph's ``past_latent.*`` inputs and ``new_latent.*`` outputs in fp16.

What: ``fp16_cache_(proto) -> dict`` rewrites the model in place. Each ``past_latent.{i}`` input is
declared FLOAT16 and one ``Cast(to=FLOAT)`` after it feeds everything the input fed. Each
``new_latent.{i}`` output is the fp16 rounding of the tensor its producer wrote, and a ``Cast`` back
to fp32 of that rounded value replaces the tensor for every other reader in the graph (the same
call's attention, including readers inside ``If``/``Scan`` subgraphs, which name outer-scope
tensors). ``cache_dtype(proto)`` reads which of the two a graph is. The arithmetic stays fp32.

Why: MLA caches kv_lora_rank + qk_rope_head_dim values per layer and position; in fp16 that is half
the memory (v3-nano: 960 instead of 1,920 bytes per position, what llama.cpp's default f16 KV cache
of the same model holds) and half the cache bytes a decode step reads at long context.

Invariants: input/output names and shapes are unchanged, only their element type; a position's
latent is the same fp16-rounded value whether this call computed it (prefill) or read it from the
cache (decode), so prefill and step-by-step decode of the same tokens still agree; nodes stay
topologically sorted. Applying it twice is an error, not a no-op (the caller decides once).

Failure modes: a graph without ``past_latent.*``/``new_latent.*`` (not an edgekit export) or one
already fp16 raises ``ValueError``. A latent value beyond fp16's range (|x| > 65504) would become
inf; the cached latent is RMS-normalized (kv_a_layernorm) plus a rotated key slice, orders of
magnitude inside that range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

PAST, NEW = "past_latent.", "new_latent."


@dataclass
class CacheConfig:
    dtype: str = "fp16"            # the only rewrite; "fp32" graphs are the export's own


def cache_dtype(proto: onnx.ModelProto) -> str:
    """"fp16" or "fp32": the element type of the graph's latent cache inputs."""
    types = {i.type.tensor_type.elem_type for i in proto.graph.input if i.name.startswith(PAST)}
    return "fp16" if types == {TensorProto.FLOAT16} else "fp32"


def _rename_reads(g: onnx.GraphProto, old: str, new: str, skip: set[int]) -> None:
    """Every node input named ``old`` (in ``g`` and its subgraphs, unless a subgraph declares its
    own ``old``) reads ``new`` instead; nodes whose id is in ``skip`` are left alone."""
    for n in g.node:
        if id(n) in skip:
            continue
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                own = {x.name for x in sub.input} | {x.name for x in sub.initializer} | \
                      {o for m in sub.node for o in m.output}
                if old not in own:
                    _rename_reads(sub, old, new, skip)


def fp16_cache_(proto: onnx.ModelProto, config: CacheConfig | None = None) -> dict:
    """The rewrite of the module doc, in place. Returns {"layers", "dtype", "bytes_per_value"}."""
    cfg = config or CacheConfig()
    if cfg.dtype != "fp16":
        raise ValueError(f"cache dtype={cfg.dtype!r}: the rewrite writes 'fp16' (fp32 is the export's own)")
    g = proto.graph
    past = [i for i in g.input if i.name.startswith(PAST)]
    outs = [o for o in g.output if o.name.startswith(NEW)]
    if not past or len(past) != len(outs):
        raise ValueError("the graph has no past_latent.*/new_latent.* pair per layer; pass an edgekit export")
    if cache_dtype(proto) == "fp16":
        raise ValueError("the latent cache is fp16 already")
    stale = {i.name for i in past} | {o.name for o in outs}
    keep_vi = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    nodes = list(g.node)
    head, added = [], set()
    for i in past:
        i.type.tensor_type.elem_type = TensorProto.FLOAT16
        cast = helper.make_node("Cast", [i.name], [i.name + "/f32"], to=TensorProto.FLOAT, name=f"cache16:{i.name}")
        head.append(cast)
        added.add(id(cast))
        _rename_reads(g, i.name, i.name + "/f32", added)
    after: dict[int, list] = {}
    for o in outs:
        k = next((j for j, n in enumerate(nodes) if o.name in n.output), None)
        if k is None:
            raise ValueError(f"no node writes {o.name}")
        prod = nodes[k]
        raw = o.name + "/f32raw"
        prod.output[list(prod.output).index(o.name)] = raw
        down = helper.make_node("Cast", [raw], [o.name], to=TensorProto.FLOAT16, name=f"cache16:{o.name}")
        up = helper.make_node("Cast", [o.name], [o.name + "/f32"], to=TensorProto.FLOAT, name=f"cache16:{o.name}:f32")
        added |= {id(down), id(up)}
        _rename_reads(g, o.name, o.name + "/f32", added)
        after.setdefault(k, []).extend([down, up])
        o.type.tensor_type.elem_type = TensorProto.FLOAT16
    order = head + [m for j, n in enumerate(nodes) for m in [n, *after.get(j, [])]]
    del g.node[:]
    g.node.extend(order)
    return {"layers": len(past), "dtype": "fp16", "bytes_per_value": int(np.dtype(np.float16).itemsize)}
