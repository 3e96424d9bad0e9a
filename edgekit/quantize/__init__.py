"""Symmetric int8 for onnxruntime CPU with SmoothQuant scaling and accuracy-aware mixed precision.

What: ``quantize_(model, out_dir, QuantConfig(), calib_tokens)`` smooths ``model`` in place
(``edgekit.smooth``), picks which units stay fp32 so next-token accuracy stays within ``max_drop``
of fp32 (mixed.py, on a torch emulation of the int8 graph: emulate.py), exports the fp32 graph
(``edgekit.export``) and rewrites it to int8 (rewrite.py), checks the int8 graph's accuracy on
onnxruntime (reverting more units if it misses the budget), and writes ``out_dir`` (same graph
I/O as the fp32 export; ``export.json`` gains a ``quantization`` section; ``quantize.json`` is the
report). ``quantize_export(src, out, model)`` does the graph part for an existing fp32 export.

Choices per op kind (measured on the 2-core AVX-512-VNNI dev VM, ORT 1.32; benchmarks/quant_bench.py):
- Linears: int8 weights per output channel (zero point 0) x int8 activations with a symmetric
  per-token scale (dynamic; or calibrated constants in ``mode="static"``; ``"auto"`` = static where
  the calibrated range is stable, see ``_static_choice``), on the u8s8 ``MatMulIntegerToFloat``
  kernel with the activation offset by 128. Microbenchmark (8 chained matmuls, us per matmul,
  M=128 / M=1): K256xN640 fp32 843/8.8, quantize_dynamic 342/3.4, this 269-294/4.6,
  MatMulNBits-8 acc4 929/3.8, s8s8 3169/856. MatMulNBits is only fast at M=1, and the graph is
  one for prefill and decode, so it is not used.
- Routed experts: grouped int8 GEMMs (``moe="grouped"``, default: tokens sorted by expert, one u8s8
  GEMM pair per expert with tokens, per-token activation scales; moe_grouped.py), or
  ``com.microsoft::QMoE`` 8-bit per block of K (``moe="block"``) or per row (``moe="row"``, weights
  only). QMoE's CPU kernel dequantizes expert weights to fp32 per call: on the 1.6B V3 shape it was
  ~70% of prefill time (benchmarks/moe_kernels.py, benchmarks/results/).
- Embedding: int8 rows + per-row scale (Gather, Cast, Mul). Routers, norms, RoPE tables and the
  absorbed-attention products stay fp32 (routers overridable).

Invariants: the output dir appears only when complete; the fp32 logits of the smoothed model
match the original (edgekit.smooth); every unit kept in fp32 is listed with its reason.

Failure modes: a non-export directory, an unknown mode/override value or a budget < 0 raise
``EdgekitError``/``ValueError`` naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_dir
from ..errors import EdgekitError

MODES = ("dynamic", "static", "auto")
MOE_PATHS = ("auto", "grouped", "block", "row")
DEFAULT_OVERRIDES = {"re:.*mlp\\.gate": "fp32", "_default": "int8"}


@dataclass
class QuantConfig:
    mode: str = "dynamic"             # activation scales: run-time ("dynamic"), calibrated ("static"), per op ("auto")
    alpha: float | None = None        # SmoothQuant strength; None = searched per norm over SmoothConfig.alphas
    smooth: bool = True
    max_drop: float = 0.008           # next-token accuracy budget vs fp32, as a fraction (0.008 = 0.8 points)
    overrides: dict = field(default_factory=lambda: dict(DEFAULT_OVERRIDES))  # unit name or "re:..." -> int8|fp32
    moe: str = "grouped"              # routed experts: "grouped" int8 GEMMs, QMoE "block"/"row", or "auto" (by size)
    grouped_min_expert_params: int = 1_000_000   # "auto": grouped when one expert has at least this many weights
    moe_block: int = 0                # 0: the largest of 128/64/32/16 dividing hidden and expert sizes
    merge: bool = True                # one matmul for linears sharing an input (q_a + kv_a, gate + up)
    reduce_range: bool = True         # 7-bit weights: exact u8s8 sums on x86 CPUs without VNNI (AVX2); see rewrite.py
    calib: str = "calib"              # calibration split or text file
    calib_max_tokens: int = 8192
    seq_len: int = 256
    verify_ort: bool = True           # score the int8 graph on onnxruntime; revert more units if over budget
    max_ort_rounds: int = 4
    rank_always: bool = False         # rank sensitivity even when the budget already holds (for the report)
    export_moe: str = "contrib"       # the fp32 export's MoE path when quantize_ exports

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize mode={self.mode!r}: use one of {MODES}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"quantize alpha={self.alpha}: use a value in [0, 1] or leave unset to search")
        if self.max_drop < 0:
            raise ValueError(f"quantize max_drop={self.max_drop}: use a fraction >= 0 (0.008 = 0.8 points)")
        if self.moe not in MOE_PATHS:
            raise ValueError(f"quantize moe={self.moe!r}: use one of {MOE_PATHS}")
        bad = {k: v for k, v in self.overrides.items() if v not in ("int8", "fp32")}
        if bad:
            raise ValueError(f"quantize overrides {bad}: values must be 'int8' or 'fp32'")
        if self.moe_block and (self.moe_block < 16 or self.moe_block & (self.moe_block - 1)):
            raise ValueError(f"quantize moe_block={self.moe_block}: use 0 (auto) or a power of two >= 16")


def choose_moe_path(cfg: QuantConfig, args) -> str:
    """The routed-expert path ``cfg.moe`` names; "auto" picks by the size of one expert: grouped
    int8 GEMMs pay off when an expert's GEMMs dominate its ~25 graph nodes (1.6B shape, 2.4M
    weights per expert: prefill 2.2x faster than QMoE), QMoE keeps small experts to one node per
    layer (v3-nano, 123K weights per expert: node overhead dominates decode). The threshold is
    recipe data."""
    if cfg.moe != "auto":
        return cfg.moe
    sizes = [3 * args.hidden_size * args.for_layer(i).moe_intermediate_size for i in range(args.num_hidden_layers)
             if args.for_layer(i).is_moe]
    return "grouped" if sizes and min(sizes) >= cfg.grouped_min_expert_params else "row"


def _moe_block(cfg: QuantConfig, args) -> int:
    if choose_moe_path(cfg, args) in ("row", "grouped"):
        return 0
    if cfg.moe_block:
        return cfg.moe_block
    sizes = [args.hidden_size] + [args.for_layer(i).moe_intermediate_size for i in range(args.num_hidden_layers)]
    return next((b for b in (128, 64, 32, 16) if all(s % b == 0 for s in sizes)), 0)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def unit_map(proto, model) -> dict[str, str]:
    """ONNX initializer name -> unit name, matched by value (export renames and transposes)."""
    from onnx import numpy_helper

    from .emulate import units

    by_hash = {}
    for name, mod in units(model).items():
        if name.endswith("mlp.experts"):
            for lin in (m for m in mod.modules() if hasattr(m, "weight")):
                by_hash[_digest(lin.weight.detach().numpy().T)] = name
        elif type(mod).__name__ == "Embedding":
            by_hash[_digest(mod.weight.detach().numpy())] = name
        else:
            by_hash[_digest(mod.weight.detach().float().numpy().T)] = name
    out = {}
    for t in proto.graph.initializer:
        if t.data_type == 1 and len(t.dims) == 2:
            u = by_hash.get(_digest(numpy_helper.to_array(t)))
            if u:
                out[t.name] = u
    return out


def quantize_export(src_dir, out_dir, model, int8: set[str], static_scales: dict[str, float] | None = None,
                    moe_block: int = 0, merge: bool = True, moe_path: str = "grouped",
                    reduce_range: bool = True, fold_scales: bool = True) -> dict:
    """Rewrite the fp32 export ``src_dir`` (of ``model``) to int8 in ``out_dir``; returns a summary."""
    import onnx

    from .moe_grouped import GroupedMoEConfig, rewrite_moe_grouped
    from .rewrite import ensure_ms_opset, rewrite_embedding, rewrite_linears, rewrite_moe

    src = Path(src_dir)
    if not (src / "export.json").exists():
        raise EdgekitError(f"{src} has no export.json; pass a directory written by `edgekit export`")
    spec = json.loads((src / "export.json").read_text())
    if spec.get("dtype") != "float32":
        raise EdgekitError(f"{src} is already {spec.get('dtype')}; quantize the fp32 export")
    proto = onnx.load(str(src / spec["graph"]))
    umap = unit_map(proto, model)
    wmax = 63.0 if reduce_range else 127.0
    done = rewrite_linears(proto, umap, int8, static_scales, merge=merge, wmax=wmax, fold=fold_scales)
    emb = [w for w, u in umap.items() if u in int8 and u.endswith("embed_tokens")]
    emb_done = [umap[w] for w in emb if rewrite_embedding(proto, w)]
    moe, gcfg = {}, GroupedMoEConfig(wmax=wmax, fold=fold_scales)
    for m in spec.get("moe_nodes", []):
        unit = f"model.layers.{m['layer']}.mlp.experts"
        if unit in int8:
            moe[unit] = (rewrite_moe_grouped(proto, m["node"], gcfg) if moe_path == "grouped"
                         else rewrite_moe(proto, m["node"], moe_block))
    ensure_ms_opset(proto)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for p in src.iterdir():
            if p.is_file() and p.name != spec["graph"] and not p.name.endswith(".data"):
                shutil.copy(p, tmp / p.name)
        large = proto.ByteSize() > 2**31 - 2**26
        onnx.save_model(proto, str(tmp / spec["graph"]), save_as_external_data=large,
                        all_tensors_to_one_file=True, location=spec["graph"] + ".data")
        summary = {"linears_int8": len(done), "embedding_int8": emb_done, "moe": moe, "weight_max": wmax,
                   "activation_scales": "static" if static_scales else "dynamic",
                   "static_units": sorted(static_scales or {}), "merged_siblings": merge}
        spec.update(dtype="int8", external_data=large, quantization=summary)
        (tmp / "export.json").write_text(json.dumps(spec, indent=2) + "\n")
    return summary


def _units_in_graph(export_dir, model) -> set[str]:
    import onnx

    spec = json.loads((Path(export_dir) / "export.json").read_text())
    proto = onnx.load(str(Path(export_dir) / spec["graph"]))
    found = set(unit_map(proto, model).values())
    return found | {f"model.layers.{m['layer']}.mlp.experts" for m in spec.get("moe_nodes", [])}


def _static_choice(absmax: dict[str, np.ndarray], mode: str, ratio: float = 1.25) -> dict[str, float]:
    """Static scale (calibrated max) per unit: all units for "static"; for "auto" only where the
    calibrated max is within ``ratio`` of the median per-call max (a stable range, so a constant
    scale loses little resolution and saves the 4 run-time scale ops)."""
    if mode == "dynamic":
        return {}
    out = {}
    for n, v in absmax.items():
        if len(v) and (mode == "static" or v.max() <= ratio * np.median(v)):
            out[n] = float(v.max())
    return out


def quantize_(model, out_dir, config: QuantConfig | None = None, calib_tokens: np.ndarray | None = None,
              tokenizer_from=None, fp32_export_dir=None, log=print) -> dict:
    """Smooth ``model`` in place, plan precision, export and rewrite to int8 in ``out_dir``.
    Returns the report (also written to ``out_dir/quantize.json``)."""
    import copy

    import torch

    from ..data import windows
    from ..evaluate import score_rows
    from ..export import ExportConfig, export
    from ..runtime.session import OrtModel
    from ..smooth import SmoothConfig, smooth_
    from .emulate import agreement, emulated, input_absmax, routing, units
    from .mixed import next_to_revert, plan_precision

    cfg = config or QuantConfig()
    if calib_tokens is None:
        from ..checkpoint import load_tokenizer
        from ..data import load_tokens
        calib_tokens = load_tokens(cfg.calib, load_tokenizer(tokenizer_from))
    toks = np.asarray(calib_tokens, dtype=np.int64)[: cfg.calib_max_tokens + 1]
    if len(toks) < 2:
        raise EdgekitError("quantize needs calibration tokens; pass a text file with a few thousand tokens")
    seq = min(cfg.seq_len, model.args.max_position_embeddings, len(toks) - 1)
    rows = windows(toks, seq)
    model.eval()
    torch.manual_seed(0)
    ref = copy.deepcopy(model)
    ref_scores = score_rows(ref, rows, as_reference=True)
    acc_fp32 = ref_scores.accuracy
    ref_routes = routing(ref, rows)
    report = {"config": asdict(cfg)}
    if cfg.smooth:
        scfg = SmoothConfig(search=cfg.alpha is None, alpha=cfg.alpha if cfg.alpha is not None else 0.5,
                            calib_seq_len=seq, calib_max_tokens=cfg.calib_max_tokens)
        report["smoothing"] = smooth_(model, toks, scfg)
    lin_units = [n for n, m in units(model).items() if hasattr(m, "in_features") or type(m).__name__ == "Gate"]
    static = _static_choice(input_absmax(model, rows, lin_units), cfg.mode)
    portable = cfg.export_moe == "portable"
    block = 0 if portable else _moe_block(cfg, model.args)
    path = choose_moe_path(cfg, model.args)
    kw = dict(static_scales=static, moe_block=block, experts_as_linears=portable or path == "grouped",
              wmax=63.0 if cfg.reduce_range else 127.0)
    out = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix=".quantize.", dir=out.parent if out.parent.exists() else None))
    try:
        fp32_dir = Path(fp32_export_dir) if fp32_export_dir else work / "fp32"
        if not fp32_export_dir:
            export(model, fp32_dir, ExportConfig(moe=cfg.export_moe), tokenizer_from=tokenizer_from)
        in_graph = _units_in_graph(fp32_dir, model)
        plan = plan_precision(model, rows, cfg.overrides, cfg.max_drop, rank_always=cfg.rank_always,
                              ref=ref_scores.reference, in_graph=in_graph, log=log, **kw)
        with emulated(model, plan.int8, **kw):
            routes_q = routing(model, rows)
            acc_emul = score_rows(model, rows).accuracy
        ort_rows = rows[: max(1, min(len(rows), 16))]
        rounds = []
        for _ in range(cfg.max_ort_rounds + 1):
            summary = quantize_export(fp32_dir, out, model, plan.int8, static, block, cfg.merge, path,
                                      cfg.reduce_range)
            if not cfg.verify_ort:
                break
            s32 = score_rows(OrtModel(fp32_dir), ort_rows, predictions=True)
            s8 = score_rows(OrtModel(out), ort_rows, predictions=True)
            a32, p32, a8, p8 = s32.accuracy, s32.predictions, s8.accuracy, s8.predictions
            rounds.append({"fp32": a32, "int8": a8, "drop": a32 - a8, "top1_agreement": float((p32 == p8).mean())})
            log(f"quantize: onnxruntime accuracy fp32 {a32:.4f} int8 {a8:.4f} (drop {(a32 - a8) * 100:+.2f} points)")
            if a32 - a8 <= cfg.max_drop:
                break
            if not plan.sensitivity:
                for n in sorted(plan.int8):
                    with emulated(model, {n}, **kw):
                        plan.sensitivity[n] = score_rows(model, rows, ref=ref_scores.reference).kl
            n = next_to_revert(plan)
            if n is None:
                break
            plan.int8.discard(n)
            plan.fp32[n] = (f"onnxruntime drop {(a32 - a8) * 100:.2f} > {cfg.max_drop * 100:.2f} points; "
                            "next by sensitivity")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = lambda d: sum(p.stat().st_size for p in Path(d).glob("model.onnx*"))  # noqa: E731
    report.update({
        "int8_units": len(plan.int8), "fp32_units": plan.fp32,
        "sensitivity_top": dict(sorted(plan.sensitivity.items(), key=lambda kv: -kv[1])[:10]),
        "accuracy": {"calib_tokens": int(rows[:, 1:].size), "fp32_torch": acc_fp32,
                     "int8_emulated": acc_emul, "emulated_drop": acc_fp32 - acc_emul, "ort": rounds},
        "routing_agreement": {str(k): v for k, v in agreement(ref_routes, routes_q).items()},
        "static_scales": sorted(static), "moe_block": block, "graph": summary, "size_bytes": size(out),
    })
    (out / "quantize.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
