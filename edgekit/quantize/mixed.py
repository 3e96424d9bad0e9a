"""Accuracy-aware mixed precision: which units stay fp32 so the int8 model stays within budget.

What: ``plan_(model, export_dir, config, calib_tokens, max_drop) -> Plan`` is the planning step of
the pipeline (inputs: the smoothed fp32 model, its export, calibration tokens, the budget; output:
a ``Plan``, written as ``plan.json`` by the caller). It picks static activation scales
(``config.mode``), the routed-expert path and QMoE block size (``choose_moe_path``), the weight
range (7-bit with ``reduce_range``), then ``plan_precision`` on the torch emulation of the int8
graph, and finally checks the planned graph on onnxruntime (``apply.quantize_export`` into a
scratch dir): while the onnxruntime drop on the calibration rows exceeds the budget, the next most
sensitive unit reverts to fp32 (at most ``config.max_ort_rounds`` times).

``plan_precision(model, rows, overrides, max_drop, ...) -> Plan``:
1. start from the overrides (exact names or ``re:`` patterns, ``_default`` for the rest; routers
   stay fp32 by default) -> the candidate int8 set;
2. score fp32 and the emulated int8 model (emulate.py) on calibration rows: next-token accuracy;
3. while the drop exceeds ``max_drop``: rank the remaining int8 units by sensitivity (mean
   KL(fp32 || model with only that unit int8), measured once) and move the most sensitive one back
   to fp32, re-scoring after each move. ``Plan.fp32`` records every unit kept in fp32 and why.

``plan_int4(model, rows, plan, candidates, max_drop, ...)``, after 1-3: of the int8 units the
recipe names as 4-bit candidates (``[quantize] int4``, names or ``re:`` patterns), measure each
one's KL alone in 4-bit, then move them to 4-bit least sensitive first while the emulated drop of
the whole plan stays within ``max_drop`` (the first one that breaks it goes back to 8-bit and the
search stops). The bytes 4-bit saves are what lets a bundle meet its size gate with less pruning;
the accuracy budget it spends is the same one int8 spends. If onnxruntime then measures more than
the budget, 4-bit units go back to 8-bit (most sensitive first) before any unit reverts to fp32.
``max_drop = inf`` (``int4_search = false``) takes every candidate without measuring any (one
emulated forward of the whole plan afterwards, as always, instead of two per candidate).

Why greedy by single-unit KL: one forward per unit to rank and one per revert, which is what a
CPU-only tool can afford; reverting the highest-KL units first is what NNCF's accuracy control and
ModelOpt's auto-quantize approximate as well.

Invariants: units forced by an override never move; the returned drop is the last measured one;
units the export holds no quantizable op for (``apply.quantizable_units``) stay fp32 with that reason.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..evaluate import Reference, score_rows
from ..int8 import QMAX, QMAX_7BIT
from .apply import quantizable_units, quantize_export
from .emulate import agreement, emulated, expert_absmax, input_absmax, int4_fits, match, routing, units
from .plan import Plan


def resolve_overrides(names: list[str], overrides: dict[str, str]) -> dict[str, str]:
    """Per unit: "int8" or "fp32". Exact names win over ``re:`` patterns (first match), then
    ``_default`` (int8 when absent)."""
    default = overrides.get("_default", "int8")
    out = {}
    for n in names:
        if n in overrides:
            out[n] = overrides[n]
            continue
        pat = next((p for p in overrides if p.startswith("re:") and match(n, p)), None)
        out[n] = overrides[pat] if pat else default
    return out


def plan_precision(model, rows: np.ndarray, overrides: dict[str, str], max_drop: float,
                   static_scales: dict[str, float] | None = None, moe_block: int = 0,
                   experts_as_linears: bool = False, wmax: float = QMAX, expert_act_int8: bool = True,
                   rank_always: bool = False, expert_scales: dict | None = None,
                   ref: Reference | None = None, in_graph: set[str] | None = None, log=print) -> Plan:
    """``in_graph``: the units the exported graph has as quantizable ops (others, e.g. kv_b_proj
    whose products the absorbed attention precomputes, stay fp32 and are not emulated as int8)."""
    names = list(units(model))
    prec = resolve_overrides(names, overrides)
    forced = {n for n, p in prec.items() if p == "fp32"}
    absent = {n for n in names if in_graph is not None and n not in in_graph and n not in forced}
    plan = Plan(int8={n for n in names if n not in forced and n not in absent},
                fp32={**{n: "override" for n in sorted(forced)},
                      **{n: "not a quantizable op in the exported graph" for n in sorted(absent)}},
                static_scales=dict(static_scales or {}), moe_block=moe_block, wmax=wmax, pinned_fp32=forced,
                expert_scales={k: [float(v[0]), [float(h) for h in v[1]]] for k, v in (expert_scales or {}).items()})
    kw = dict(static_scales=static_scales, moe_block=moe_block, experts_as_linears=experts_as_linears, wmax=wmax,
              expert_act_int8=expert_act_int8, expert_scales=expert_scales)
    if ref is None:
        fp32 = score_rows(model, rows, as_reference=True)
        ref = fp32.reference
    else:
        fp32 = score_rows(model, rows)
    plan.accuracy_fp32 = fp32.accuracy

    def measure(int8: set[str]) -> float:
        with emulated(model, int8, **kw):
            return score_rows(model, rows).accuracy

    plan.accuracy_int8 = measure(plan.int8)
    plan.steps.append({"fp32_units": len(plan.fp32), "accuracy": plan.accuracy_int8})
    log(f"quantize: fp32 accuracy {plan.accuracy_fp32:.4f}, all-int8 {plan.accuracy_int8:.4f} "
        f"(drop {plan.drop * 100:+.2f} points, budget {max_drop * 100:.2f})")
    if plan.drop <= max_drop and not rank_always:
        return plan
    for n in sorted(plan.int8):
        with emulated(model, {n}, **kw):
            plan.sensitivity[n] = score_rows(model, rows, ref=ref).kl
    ranked = sorted(plan.int8, key=lambda n: -plan.sensitivity[n])
    for n in ranked:
        if plan.drop <= max_drop:
            break
        plan.int8.discard(n)
        plan.fp32[n] = f"sensitivity rank {ranked.index(n) + 1} (KL {plan.sensitivity[n]:.2e}); " \
                       f"drop {plan.drop * 100:.2f} > {max_drop * 100:.2f} points"
        plan.accuracy_int8 = measure(plan.int8)
        plan.steps.append({"fp32_units": len(plan.fp32), "reverted": n, "accuracy": plan.accuracy_int8})
        log(f"quantize: kept {n} in fp32 -> drop {plan.drop * 100:+.2f} points")
    return plan


def int4_candidates(model, plan: Plan, patterns: list[str]) -> list[str]:
    """The plan's int8 units that a ``[quantize] int4`` entry (name or ``re:`` pattern) names and
    that 4-bit blocks of ``plan.int4_block`` fit (``emulate.int4_fits``; QMoE experts with
    ``plan.int4_moe_rows`` have one scale per row, which fits any width)."""
    mods = units(model)
    rows = plan.int4_moe_rows and plan.moe_path in ("row", "block")
    return sorted(n for n in plan.int8 if any(match(n, p) for p in patterns)
                  and int4_fits(mods[n], 1 if rows and n.endswith("mlp.experts") else plan.int4_block))


def plan_int4(model, rows: np.ndarray, plan: Plan, candidates: list[str], max_drop: float, ref: Reference,
              log=print, **kw) -> Plan:
    """Move ``candidates`` (int8 units) to 4-bit, least sensitive first, while the emulated drop of
    the whole plan on ``rows`` stays within ``max_drop`` (see module doc). ``kw``: ``emulated``'s
    int8 options. Updates and returns ``plan``."""
    if not candidates:
        return plan
    if max_drop == float("inf"):          # no search (int4_search = false): every candidate, nothing to rank
        plan.int4 |= set(candidates)
        plan.steps.append({"int4": sorted(candidates), "kept": True, "searched": False})
        log(f"quantize: {len(candidates)} 4-bit candidates taken without a search (int4_search = false)")
        return plan
    for n in candidates:
        with emulated(model, {n}, int4={n}, int4_block=plan.int4_block, int4_moe_rows=plan.int4_moe_rows, **kw):
            plan.sensitivity_int4[n] = score_rows(model, rows, ref=ref).kl
    order = sorted(candidates, key=lambda n: plan.sensitivity_int4[n])
    for i, n in enumerate(order):
        with emulated(model, plan.int8, int4=plan.int4 | {n}, int4_block=plan.int4_block,
                      int4_moe_rows=plan.int4_moe_rows, **kw):
            acc = score_rows(model, rows).accuracy
        ok = plan.accuracy_fp32 - acc <= max_drop
        plan.steps.append({"int4": n, "kept": ok, "accuracy": acc})
        log(f"quantize: {n} 4-bit (KL rank {i + 1} of {len(order)}, {plan.sensitivity_int4[n]:.2e}) -> drop "
            f"{(plan.accuracy_fp32 - acc) * 100:+.2f} points{'' if ok else ' over budget: stays 8-bit'}")
        if not ok:
            break
        plan.int4.add(n)
        plan.accuracy_int8 = acc
    return plan


def next_to_revert(plan: Plan) -> str | None:
    """The most sensitive unit still int8 (used when onnxruntime disagrees with the emulation)."""
    left = [n for n in plan.int8 if n in plan.sensitivity]
    return max(left, key=lambda n: plan.sensitivity[n]) if left else None


def choose_moe_path(cfg, args) -> str:
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


def _moe_block(config, args) -> int:
    if choose_moe_path(config, args) in ("row", "grouped"):
        return 0
    if config.moe_block:
        return config.moe_block
    sizes = [args.hidden_size] + [args.for_layer(i).moe_intermediate_size for i in range(args.num_hidden_layers)]
    return next((b for b in (128, 64, 32, 16) if all(s % b == 0 for s in sizes)), 0)


def _static_choice(absmax: dict[str, np.ndarray], mode: str, ratio: float = 1.25) -> dict[str, float]:
    """Static scale (calibrated max) per unit: all units for "static"; for "auto" only where the
    calibrated max is within ``ratio`` of the median per-call max (a stable range, so a constant
    scale loses little resolution and saves the 4 run-time scale ops)."""
    out = {}
    for n, v in absmax.items():
        if len(v) and (mode == "static" or v.max() <= ratio * np.median(v)):
            out[n] = float(v.max())
    return out


def graph_choices(config, args, spec: dict) -> tuple[bool, str, int, float]:
    """What the int8 graph will be, whatever the precision search decides: (portable experts, the
    routed-expert path, QMoE block, weight range)."""
    portable = spec.get("moe") == "portable"
    block = 0 if portable else _moe_block(config, args)
    return portable, choose_moe_path(config, args), block, QMAX_7BIT if config.reduce_range else QMAX


def overrides_plan(export_dir, config, args, max_drop: float) -> Plan:
    """The plan without a precision search, for models that do not fit in memory (the streamed
    pipeline): every unit ``config.overrides`` make int8 and the export holds a quantizable op for
    is int8, with ``plan_``'s graph choices; dynamic activation scales. A miss of the budget shows in
    the accuracy gate. Equals ``plan_``'s plan whenever the all-int8 drop is within the budget."""
    spec = json.loads((Path(export_dir) / "export.json").read_text())
    names = sorted(spec["units"])
    prec = resolve_overrides(names, config.overrides)
    in_graph = quantizable_units(spec)
    forced = {n for n, p in prec.items() if p == "fp32"}
    absent = {n for n in names if n not in in_graph and n not in forced}
    portable, path, block, wmax = graph_choices(config, args, spec)
    plan = Plan(int8={n for n in names if n not in forced and n not in absent},
                fp32={**{n: "override" for n in sorted(forced)},
                      **{n: "not a quantizable op in the exported graph" for n in sorted(absent)}},
                moe_path="portable" if portable else path, moe_block=block, wmax=wmax, merge=config.merge,
                float_weights=config.float_weights, cache=config.cache)
    plan.report = {"config": asdict(config), "max_drop": max_drop,
                   "mixed_precision": "not searched (streamed): every unit the overrides allow is int8",
                   **({"int4": {"units": [], "candidates": list(config.int4),
                                "note": "not searched (streamed): 4-bit candidates stay 8-bit"}}
                      if config.int4 else {}),
                   "accuracy": {"ort": []}}
    return plan


def plan_(model, export_dir, config, calib_tokens: np.ndarray, max_drop: float | None = None, log=print) -> Plan:
    """The planning step (see module doc). ``model`` is the fp32 model ``export_dir`` was exported
    from (smoothed already); ``max_drop`` defaults to ``config.max_drop``. Leaves ``model`` as it
    found it."""
    from ..atomic import scratch_dir
    from ..data import require_tokens, windows
    from ..runtime.session import OrtModel

    budget = config.max_drop if max_drop is None else max_drop
    toks = np.asarray(calib_tokens, dtype=np.int64)[: config.calib_max_tokens + 1]
    spec = json.loads((Path(export_dir) / "export.json").read_text())
    seq = min(config.seq_len, model.args.max_position_embeddings)
    require_tokens(toks, seq + 1, "calibration text for quantization")
    rows = windows(toks, seq)
    model.eval()
    ref = score_rows(model, rows, as_reference=True)
    ref_routes = routing(model, rows)
    static = {}
    if config.mode != "dynamic":
        lin = [n for n, m in units(model).items() if hasattr(m, "in_features") or type(m).__name__ == "Gate"]
        static = _static_choice(input_absmax(model, rows, lin), config.mode)
    portable, path, block, wmax = graph_choices(config, model.args, spec)
    experts = expert_absmax(model, rows) if config.expert_scales == "static" and path == "grouped" and not portable \
        else {}
    kw = dict(static_scales=static, moe_block=block, experts_as_linears=portable or path == "grouped", wmax=wmax,
              expert_act_int8=not portable, expert_scales=experts)
    plan = plan_precision(model, rows, config.overrides, budget, rank_always=config.rank_always,
                          ref=ref.reference, in_graph=quantizable_units(spec), log=log, **kw)
    plan.merge, plan.moe_path = config.merge, "portable" if portable else path   # [quantize] moe: contrib only
    plan.float_weights, plan.cache = config.float_weights, config.cache
    plan.int4_block, plan.int4_moe_rows = config.int4_block, config.int4_moe_rows
    if config.int4 and not portable:      # the portable experts' If/Loop branches have no 4-bit form
        plan_int4(model, rows, plan, int4_candidates(model, plan, config.int4),
                  budget if config.int4_search else float("inf"), ref.reference, log=log, **kw)
    kw4 = dict(kw, int4=plan.int4, int4_block=plan.int4_block, int4_moe_rows=plan.int4_moe_rows)
    with emulated(model, plan.int8, **kw4):
        routes_q = routing(model, rows)
        acc_emul = score_rows(model, rows).accuracy
    rounds = []
    if config.verify_ort:
        ort_rows = rows[: max(1, min(len(rows), 16))]
        s32 = score_rows(OrtModel(export_dir), ort_rows, predictions=True)
        work = scratch_dir(".plan-check.")
        try:
            for _ in range(config.max_ort_rounds + 1):
                quantize_export(export_dir, work / "int8", plan)
                s8 = score_rows(OrtModel(work / "int8"), ort_rows, predictions=True)
                drop = s32.accuracy - s8.accuracy
                rounds.append({"fp32": s32.accuracy, "int8": s8.accuracy, "drop": drop,
                               "top1_agreement": float((s32.predictions == s8.predictions).mean())})
                log(f"quantize: onnxruntime accuracy fp32 {s32.accuracy:.4f} int8 {s8.accuracy:.4f} "
                    f"(drop {drop * 100:+.2f} points)")
                if drop <= budget:
                    break
                if plan.int4 and config.int4_search:   # 4-bit goes back to 8-bit before anything goes to fp32
                    n = max(plan.int4, key=lambda u: plan.sensitivity_int4.get(u, 0.0))
                    plan.int4.discard(n)
                    plan.steps.append({"int4_reverted": n, "ort_drop": drop})
                    continue
                if not plan.sensitivity:
                    for n in sorted(plan.int8):
                        with emulated(model, {n}, **kw):
                            plan.sensitivity[n] = score_rows(model, rows, ref=ref.reference).kl
                n = next_to_revert(plan)
                if n is None:
                    break
                plan.int8.discard(n)
                plan.fp32[n] = (f"onnxruntime drop {drop * 100:.2f} > {budget * 100:.2f} points; "
                                "next by sensitivity")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    plan.report = {
        "config": asdict(config), "max_drop": budget,
        "accuracy": {"calib_tokens": int(rows[:, 1:].size), "fp32_torch": ref.accuracy,
                     "int8_emulated": acc_emul, "emulated_drop": ref.accuracy - acc_emul, "ort": rounds},
        "routing_agreement": {str(k): v for k, v in agreement(ref_routes, routes_q).items()},
        "precision": {n: plan.precision(n) for n in sorted(units(model))},
        **({"int4": {"block": plan.int4_block, "moe_rows": plan.int4_moe_rows, "units": sorted(plan.int4),
                     "sensitivity": dict(sorted(plan.sensitivity_int4.items(), key=lambda kv: kv[1]))}}
           if config.int4 else {}),
    }
    return plan
