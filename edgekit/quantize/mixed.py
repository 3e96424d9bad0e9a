"""Accuracy-aware mixed precision: which units stay fp32 so the int8 model stays within budget.

What: ``plan_precision(model, rows, cfg, ...) -> Plan``:
1. start from the overrides (exact names or ``re:`` patterns, ``_default`` for the rest; routers
   stay fp32 by default) -> the candidate int8 set;
2. score fp32 and the emulated int8 model (emulate.py) on calibration rows: next-token accuracy;
3. while the drop exceeds ``max_drop``: rank the remaining int8 units by sensitivity (mean
   KL(fp32 || model with only that unit int8), measured once) and move the most sensitive one back
   to fp32, re-scoring after each move. ``Plan.fp32`` records every unit kept in fp32 and why.

Why greedy by single-unit KL: one forward per unit to rank and one per revert, which is what a
CPU-only tool can afford; reverting the highest-KL units first is what NNCF's accuracy control and
ModelOpt's auto-quantize approximate as well.

Invariants: units forced by an override never move; the returned drop is the last measured one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..evaluate import Reference, score_rows
from .emulate import emulated, match, units


@dataclass
class Plan:
    int8: set[str]
    fp32: dict[str, str] = field(default_factory=dict)          # unit -> why
    sensitivity: dict[str, float] = field(default_factory=dict)  # unit -> KL when alone int8
    accuracy_fp32: float = 0.0
    accuracy_int8: float = 0.0
    steps: list[dict] = field(default_factory=list)

    @property
    def drop(self) -> float:
        return self.accuracy_fp32 - self.accuracy_int8


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
                   experts_as_linears: bool = False, wmax: float = 127.0, rank_always: bool = False,
                   ref: Reference | None = None, in_graph: set[str] | None = None, log=print) -> Plan:
    """``in_graph``: the units the exported graph has as quantizable ops (others, e.g. kv_b_proj
    whose products the absorbed attention precomputes, stay fp32 and are not emulated as int8)."""
    names = list(units(model))
    prec = resolve_overrides(names, overrides)
    forced = {n for n, p in prec.items() if p == "fp32"}
    absent = {n for n in names if in_graph is not None and n not in in_graph and n not in forced}
    plan = Plan(int8={n for n in names if n not in forced and n not in absent},
                fp32={**{n: "override" for n in sorted(forced)},
                      **{n: "not a quantizable op in the exported graph" for n in sorted(absent)}})
    kw = dict(static_scales=static_scales, moe_block=moe_block, experts_as_linears=experts_as_linears, wmax=wmax)
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


def next_to_revert(plan: Plan) -> str | None:
    """The most sensitive unit still int8 (used when onnxruntime disagrees with the emulation)."""
    left = [n for n in plan.int8 if n in plan.sensitivity]
    return max(left, key=lambda n: plan.sensitivity[n]) if left else None
