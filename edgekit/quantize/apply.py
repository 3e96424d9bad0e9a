"""The int8 graph pass: ``quantize_export(src, out, plan)``, an fp32 export + a plan -> an int8 export.

What: reads ``src/export.json``'s ``units`` (module name -> graph node and initializers, written by
``edgekit.export``) and rewrites the units the plan puts in int8 (rewrite.py): linears (``MatMul``
on ``<module>.weight_t``) -> ``MatMulIntegerToFloat`` (units in ``plan.int4``: ``MatMulNBits``
4-bit; routed experts in ``plan.int4``: 4-bit ``QMoE`` or grouped ``MatMulNBits`` experts), the
embedding ``Gather`` -> int8 rows, contrib ``MoE`` nodes -> grouped int8 GEMMs (moe_grouped.py)
or ``QMoE``, as ``plan.moe_path`` says, portable experts (``If`` nodes) -> int8 weights per column inside both branches
(portable.py); with ``plan.float_weights == "fp16"`` the weights of every unit neither in int8 nor
pinned to fp32 by an override are stored fp16 with a Cast to fp32 (fp16.py). ``out`` gets the same
files as ``src`` (graph I/O unchanged), ``export.json`` with ``dtype: "int8"`` and a
``quantization`` section, and ``quantize.json`` (the plan's report + what the pass did + the graph
size).

Why a pure pass keyed by names: no model and no torch are needed, nothing is re-exported or
matched by value, and the same plan on the same export always writes the same graph.

Memory: an export with external data (``model.onnx.data``: weights over the protobuf limit, or a
layer-by-layer export) is read without its weights; each unit's fp32 weights are read when that
unit is rewritten, each rewrite's new (int8) weights are appended to a spill file in the output
directory right after it (and the graph message re-made, since protobuf frees bytes only with the
whole message), and at the end every tensor is streamed into the output's data file one at a time,
so the pass holds the graph structure and one unit's weights (fp32 in, int8 out). An inline export
is rewritten in memory as before.

Invariants: ``out`` appears only when complete; units the plan keeps fp32 keep their fp32 ops.
Failure modes (``EdgekitError``): ``src`` is not an fp32 export, its ``export.json`` has no
``units`` (written before unit maps: re-export), the plan names a unit the graph does not hold,
or a unit's node/initializer is missing from ``model.onnx`` (export.json and graph disagree).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import EdgekitError
from .plan import Plan

QUANTIZABLE = ("MatMul", "Gather", "MoE", "If")   # export.json unit ops this pass can rewrite


def quantizable_units(spec: dict) -> set[str]:
    """Units of an export (its ``export.json``) that the int8 pass can rewrite."""
    return {u for u, e in spec.get("units", {}).items() if e["op"] in QUANTIZABLE}


def read_spec(src: Path) -> dict:
    if not (src / "export.json").exists():
        raise EdgekitError(f"{src} has no export.json; pass a directory written by `edgekit export`")
    spec = json.loads((src / "export.json").read_text())
    if spec.get("dtype") != "float32":
        raise EdgekitError(f"{src} is already {spec.get('dtype')}; quantize the fp32 export")
    if "units" not in spec:
        raise EdgekitError(f"{src}/export.json has no unit map (older edgekit); re-export it with `edgekit export`")
    return spec


def quantize_export(src_dir: str | os.PathLike, out_dir: str | os.PathLike, plan: Plan | str | os.PathLike) -> dict:
    """Rewrite the fp32 export ``src_dir`` to int8 in ``out_dir`` as ``plan`` (a ``Plan`` or a
    ``plan.json`` path) says; returns the ``quantize.json`` report."""
    import onnx

    from .cache_fp16 import fp16_cache_
    from .fp16 import store_fp16_
    from .moe_grouped import GroupedMoEConfig, rewrite_moe_grouped
    from .nbits import NBitsConfig
    from .portable import rewrite_sparse_experts
    from .rewrite import ensure_ms_opset, rewrite_embedding, rewrite_linears, rewrite_moe

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    src = Path(src_dir)
    spec = read_spec(src)
    units = spec["units"]
    unknown = sorted(u for u in plan.int8 if u not in quantizable_units(spec))
    if unknown:
        raise EdgekitError(f"the plan puts {unknown[0]} in int8 but {src} holds no quantizable op for it; "
                           "plan against this export")
    proto = onnx.load(str(src / spec["graph"]), load_external_data=False)   # weights read per unit
    base = str(src)
    nodes = {n.name: n for n in proto.graph.node}
    inits = {i.name for i in proto.graph.initializer}
    for u in sorted(plan.int8):
        e = units[u]
        if e["node"] not in nodes or not set(e["weights"]) <= inits:
            raise EdgekitError(f"{src}: export.json maps {u} to node {e['node']}, which model.onnx lacks; re-export")
    del nodes                  # they refer into ``proto``, which ``_spill`` replaces
    by_op = {op: sorted(u for u in plan.int8 if units[u]["op"] == op) for op in QUANTIZABLE}
    nb = NBitsConfig(bits=int(plan.kernel[5:]), block=plan.nbits_block) if plan.kernel.startswith("nbits") else None
    nb4 = NBitsConfig(bits=4, block=plan.int4_block)
    lin8 = {u for u in by_op["MatMul"] if u not in plan.int4}
    lin_map = {units[u]["weights"][0]: u for u in by_op["MatMul"]}
    gcfg = GroupedMoEConfig(wmax=plan.wmax, fold=plan.fold, nbits=nb, layout=plan.moe_layout)
    def gcfg_of(u):   # static activation scales of this layer's experts, when the plan has them
        s = plan.expert_scales.get(u)
        return dataclasses.replace(gcfg, static_x=s[0], static_h=tuple(s[1])) if s else gcfg

    def moe_of(u):        # 4-bit experts: QMoE 4-bit in blocks of int4_block, or grouped MatMulNBits 4-bit
        if plan.moe_path == "grouped":
            return rewrite_moe_grouped(proto, units[u]["node"], dataclasses.replace(gcfg_of(u), nbits=nb4)
                                       if u in plan.int4 else gcfg_of(u), base)
        if u in plan.int4:
            return rewrite_moe(proto, units[u]["node"], 0 if plan.int4_moe_rows else plan.int4_block, base, bits=4)
        return rewrite_moe(proto, units[u]["node"], plan.moe_block, base)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        # an export with external data: each rewrite's new weights go to a spill file at once (_spill)
        spill = _Spill(tmp / SPILL_FILE) if spec.get("external_data") else None
        done = rewrite_linears(proto, lin_map, lin8, plan.static_scales, merge=plan.merge, wmax=plan.wmax,
                               fold=plan.fold, nbits=nb, base_dir=base)
        proto = _spill(proto, spill)
        done4 = rewrite_linears(proto, lin_map, set(by_op["MatMul"]) - lin8, None, merge=plan.merge, nbits=nb4,
                                base_dir=base)     # 4-bit linears: MatMulNBits
        done += done4
        proto = _spill(proto, spill)
        emb_done = [u for u in by_op["Gather"] if rewrite_embedding(proto, units[u]["weights"][0], base)]
        proto = _spill(proto, spill)
        moe = {}
        for u in by_op["MoE"]:
            moe[u] = moe_of(u)
            proto = _spill(proto, spill)
        for u in by_op["If"]:
            moe[u] = rewrite_sparse_experts(proto, units[u]["node"], *units[u]["weights"], qmax=plan.wmax,
                                            base_dir=base)
            proto = _spill(proto, spill)
        floats = sorted(u for u in units if u not in plan.int8 and u not in plan.pinned_fp32)
        f16 = store_fp16_(proto, [w for u in floats for w in units[u]["weights"]], base_dir=base) \
            if plan.float_weights == "fp16" else None
        cache = fp16_cache_(proto) if plan.cache == "fp16" else None
        if cache:
            per_token = spec["cache"]["bytes_per_token"]   # fp32 figures of the export
            spec["cache"].update(dtype="float16", bytes_per_token=(
                {**per_token, "latent": per_token["latent"] // 2, "per_head_kv": per_token["per_head_kv"] // 2}
                if isinstance(per_token, dict) else per_token // 2))
        ensure_ms_opset(proto)
        for p in src.iterdir():
            if p.is_file() and p.name != spec["graph"] and not p.name.endswith(".data"):
                shutil.copy(p, tmp / p.name)
        large = bool(spec.get("external_data")) or proto.ByteSize() > 2**31 - 2**26
        if large:
            write_external(proto, src, tmp / (spec["graph"] + ".data"), spill=tmp)
        if spill:
            spill.close()
            (tmp / SPILL_FILE).unlink()
        onnx.save_model(proto, str(tmp / spec["graph"]))
        static = sorted(u for u in plan.static_scales if u in plan.int8)
        summary = {"linears_int8": len(done), "embedding_int8": emb_done, "moe": moe, "weight_max": plan.wmax,
                   "expert_activation_scales": "static" if plan.expert_scales else "per token",
                   "kernel": plan.kernel, **({"nbits_block": plan.nbits_block} if nb else {}),
                   **({"int4": {"block": plan.int4_block, "linears": sorted(done4),
                                "moe": sorted(u for u in by_op["MoE"] if u in plan.int4)}} if plan.int4 else {}),
                   "activation_scales": "static" if static else "dynamic",
                   "static_units": static, "merged_siblings": plan.merge,
                   **({"float_weights": "fp16", "fp16": {**f16, "units": floats}} if f16 else {}),
                   **({"latent_cache": cache} if cache else {})}
        spec.update(dtype="int8", external_data=large, quantization=summary)
        (tmp / "export.json").write_text(json.dumps(spec, indent=2) + "\n")
        size = sum(p.stat().st_size for p in tmp.glob(spec["graph"] + "*"))
        report = {**plan.report, "int8_units": len(plan.int8), "fp32_units": plan.fp32,
                  "sensitivity_top": dict(sorted(plan.sensitivity.items(), key=lambda kv: -kv[1])[:10]),
                  "static_scales": sorted(plan.static_scales), "expert_scales": plan.expert_scales,
                  "moe_path": plan.moe_path, "moe_block": plan.moe_block,
                  "graph": summary, "size_bytes": size}
        (tmp / "quantize.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


SPILL_FILE = ".int8-weights.data"   # new weights of the pass, until write_external gathers them


class _Spill:
    """The pass's new weights, appended to a file as each rewrite makes them (``_spill``)."""

    def __init__(self, path: Path, threshold: int = 1024):
        self.f, self.name, self.offset, self.threshold = open(path, "wb"), path.name, 0, threshold

    def take(self, t) -> None:
        import onnx

        raw = t.raw_data
        self.f.write(raw)
        t.ClearField("raw_data")
        for k, v in (("location", self.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        t.data_location = onnx.TensorProto.EXTERNAL
        self.offset += len(raw)

    def close(self) -> None:
        self.f.close()


def _spill(proto, spill: _Spill | None):
    """``proto`` with every inline tensor of at least ``spill.threshold`` bytes moved to the spill
    file, as a fresh message: protobuf (upb) frees a message's bytes only with the whole message, so
    the rewritten one is dropped and the pass holds graph structure, not the int8 weights. The same
    tensors, in the same order, are what ``write_external`` would move: the output is unchanged."""
    if spill is None:
        return proto
    import onnx

    for t in _tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data") and \
                len(t.raw_data) >= spill.threshold:
            spill.take(t)
    spill.f.flush()
    fresh = onnx.ModelProto()
    fresh.ParseFromString(proto.SerializeToString())
    return fresh


def _tensors(g):
    """Every TensorProto of graph ``g``: initializers, node attributes, subgraphs (recursively)."""
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(sub)


def write_external(proto, src: Path, data: Path, align: int = 64, threshold: int = 1024,
                   spill: Path | None = None) -> None:
    """Point every tensor of ``proto`` over ``threshold`` bytes into the new file ``data``, one tensor
    at a time: bytes held inline are moved there, bytes still in ``src``'s external data (or in the
    ``SPILL_FILE`` in directory ``spill``) are copied."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    from ..bundle import member

    with open(data, "wb") as f:
        offset = 0
        for t in _tensors(proto.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(t)
                where = spill if spill is not None and info.location == SPILL_FILE else src
                with open(member(where, info.location, "model.onnx"), "rb") as s:
                    s.seek(info.offset or 0)
                    raw = s.read(info.length) if info.length else s.read()
                del t.external_data[:]
            elif t.HasField("raw_data") and len(t.raw_data) >= threshold:
                raw = t.raw_data
            else:
                continue
            pad = (-offset) % align
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            t.ClearField("raw_data")
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            t.data_location = onnx.TensorProto.EXTERNAL
            offset += len(raw)
