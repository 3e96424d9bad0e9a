"""Size vs accuracy frontier of the cpu4 pipeline: bundle size ratio against the accuracy drop, in
points and relative to fp32, per model and target domain, for pruning x precision x recovery points.

Run:  python benchmarks/frontier.py --model v3-nano --domain python --eval-tokens 32768
      python benchmarks/frontier.py --model v3-mini --domain python --points mini
      python benchmarks/frontier.py --model v3-nano --only "int4 experts (searched)"

Every point is the shipped cpu4 recipe (``export_recipes/cpu4.toml``, or ``--recipe``) with the
point's table overrides, built by the pipeline's own ``build`` (prune + recover -> smooth -> export
-> score -> plan -> quantize, every stage through the stage cache, so points sharing a pruned model
share its stage). Like ``compress --auto``, the planner's accuracy budget is taken on the target
domain's dev split and calibration/distillation read its calib/recover splits (``--recover
python/train``: the domain's whole training text, as cpu4-moe distills); the eval split (its
first ``--eval-tokens`` tokens, 0 = all; windows of the recipe's seq_len; ``--dev-tokens`` likewise
for dev) is only measured: fp32
(torch) and each bundle (onnxruntime). Size ratio = the bundle's ONNX bytes / the unpruned fp32
export's bytes (the size gate's reading). The other domains' eval splits are scored too with
``--ood`` (reported, as compress does).

Writes benchmarks/results/frontier_<model>_<domain>.{json,md} (``--out`` to change), and a PNG
plot of both readings when matplotlib is importable. The command and the machine are recorded in
both files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.checkpoint import load_tokenizer, resolve  # noqa: E402
from edgekit.data import load_tokens  # noqa: E402
from edgekit.domains import plan_data  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.host import host_facts  # noqa: E402
from edgekit.pipeline import STAGE_CONFIGS, baseline_for, build, fp32_accuracy, load_texts  # noqa: E402
from edgekit.recipes import load_recipe, with_overrides  # noqa: E402
from edgekit.stagecache import StageCache  # noqa: E402
from edgekit.stages import Stages  # noqa: E402
from edgekit.validate import graph_bytes, score  # noqa: E402

NO_PRUNE = {"experts": 0.0, "ffn": 0.0, "heads": 0.0, "layers": 0, "recover_steps": 0}
EXPERTS = "re:.*mlp\\.experts"
LINEARS = "re:.*(self_attn|mlp|shared_experts).*_proj"        # every Linear but the routers; lm_head apart

# fixed precision (no search, no onnxruntime re-check): routed experts (in blocks, whatever the recipe says;
# rows() for one scale per row) + lm_head 4-bit, the rest int8,
# routers fp32; the int8 budget is the whole accuracy budget, so no unit reverts to fp32 unless the
# all-int8 model alone misses it. The plan then measures only that all-int8 check (and the report's
# emulated accuracy), which 2,048 calibration tokens decide as well as 8,192 at a quarter of the time
FIXED = {"quantize": {"int4": [EXPERTS, "lm_head"], "int4_moe_rows": False, "int4_search": False, "verify_ort": False,
                      "calib_max_tokens": 2048},
         "goals": {"int8_floor": 1.0}}


def fixed(*int4: str) -> dict:
    """Fixed precision: ``int4`` 4-bit, every other quantizable unit int8, routers fp32 (see FIXED)."""
    return {"quantize": {**FIXED["quantize"], "int4": list(int4)}, "goals": FIXED["goals"]}


def pruned(experts: float, steps: int = 0, qat: str = "") -> dict:
    """Remove ``experts`` of each MoE layer's routed experts (REAP), distill ``steps`` steps (through
    ``qat`` fake quantization when set; SmoothQuant is then off, as qat.py requires)."""
    p = {"prune": {**NO_PRUNE, "experts": experts, "recover_steps": steps, "recover_fake_quant": qat}}
    return {**p, "smooth": {"enabled": False}} if qat else p


ALL4 = (EXPERTS, LINEARS, "lm_head")


def rows(over: dict) -> dict:
    """``over`` with 4-bit experts at one scale per row (``int4_moe_rows``; QAT rounds them so too):
    no scale per block of 32, so fewer bytes per expert, and onnxruntime 1.30's fast QMoE form."""
    return {**over, "prune": {**over["prune"], "recover_fake_quant_block": 0},
            "quantize": {**over["quantize"], "int4_moe_rows": True}}

# name -> recipe table overrides; "nano": v3-nano (8 experts: every one busy), "mini": v3-mini
# (64 fine-grained experts: the target domain leaves some idle). " 200" in a name is the step count
# (--recover-steps / --time-budget replace it with the steps run).
POINTS = {
    "nano": {
        "int8": {"prune": NO_PRUNE, "quantize": {"int4": []}},
        "int4 experts (searched)": {"prune": NO_PRUNE,
                                    "quantize": {"int4": [EXPERTS, "lm_head"], "int4_moe_rows": False}},
        "int4 experts + lm_head": {"prune": NO_PRUNE, **fixed(EXPERTS, "lm_head")},
        "int4 all linears": {"prune": NO_PRUNE, **fixed(*ALL4)},
        "int8 + experts 12.5% + KD 200": {**pruned(0.125, 200), "quantize": {"int4": []}},
        "experts 25% + int4 all": {**pruned(0.25), **fixed(*ALL4)},
        "experts 25% + KD 200 + int4 all": {**pruned(0.25, 200), **fixed(*ALL4)},
        "experts 25% + QAT 200 + int4 all": {**pruned(0.25, 200, "int4-experts"), **fixed(*ALL4)},
        "experts 50% + int4 all": {**pruned(0.5), **fixed(*ALL4)},
        "experts 50% + KD 200 + int4 all": {**pruned(0.5, 200), **fixed(*ALL4)},
        "experts 50% + QAT 200 + int4 all": {**pruned(0.5, 200, "int4-experts"), **fixed(*ALL4)},
        "experts 75% + int4 all": {**pruned(0.75), **fixed(*ALL4)},
        "experts 75% + QAT 200 + int4 all": {**pruned(0.75, 200, "int4-experts"), **fixed(*ALL4)},
    },
    "mini": {
        "int8": {"prune": NO_PRUNE, "quantize": {"int4": []}},
        "int4 experts + lm_head": {"prune": NO_PRUNE, **FIXED},
        "experts 50% + int4": {**pruned(0.5), **FIXED},
        "experts 50% + QAT 200 + int4": {**pruned(0.5, 200, "int4-experts"), **FIXED},
        "experts 37.5% + int4": {**pruned(0.375), **FIXED},
        "experts 43.75% + QAT 200 + int4": {**pruned(0.4375, 200, "int4-experts"), **FIXED},
        "experts 37.5% + QAT 200 + int4 all": {**pruned(0.375, 200, "int4-experts"), **fixed(*ALL4)},
        "experts 62.5% + QAT 200 + int4": {**pruned(0.625, 200, "int4-experts"), **FIXED},
        "experts 50% + KD 200 + int4": {**pruned(0.5, 200), **FIXED},
        "experts 43.75% + QAT 200 + int4 rows": rows({**pruned(0.4375, 200, "int4-experts"), **FIXED}),
        "experts 37.5% + QAT 200 + int4 rows": rows({**pruned(0.375, 200, "int4-experts"), **FIXED}),
        "experts 31.25% + QAT 200 + int4 rows": rows({**pruned(0.3125, 200, "int4-experts"), **FIXED}),
    },
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="v3-nano")
    ap.add_argument("--domain", default="python")
    ap.add_argument("--recipe", default="cpu4")
    ap.add_argument("--points", default="", help="nano | mini (default: by model name)")
    ap.add_argument("--only", action="append", default=[], help="run only these points (repeatable)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="first N tokens of the eval split (0: all)")
    ap.add_argument("--dev-tokens", type=int, default=0, help="first N tokens of the dev split (0: all)")
    ap.add_argument("--ood", action="store_true", help="also score the other domains' eval splits")
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="distillation steps of every point that distills (0: as the point says)")
    ap.add_argument("--recover-batch-size", type=int, default=0,
                    help="windows per distillation step of every point that distills (0: the recipe's)")
    ap.add_argument("--max-size-ratio", type=float, default=0.0,
                    help="train and score only the points whose size ratio, measured before any training, is "
                         "at most this (0: all)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds the whole run may take (0: no limit): every distilling point's steps are cut "
                         "to what fits (from the distillation step time measured on --device and the other "
                         "stages' measured times); points that do not fit even with --min-steps are skipped")
    ap.add_argument("--min-steps", type=int, default=50,
                    help="with --time-budget: fewest distillation steps worth running")
    ap.add_argument("--recover", default="",
                    help="distillation text of every distilling point: DOMAIN/SPLIT (e.g. python/train) or a "
                         "file (default: the recipe's [data] recover split of --domain)")
    ap.add_argument("--device", default="cpu", help="where torch stages run: cpu, cuda, auto")
    ap.add_argument("--no-simplify", action="store_true",
                    help="skip onnxsim in every export, the fp32 baseline's too (hosts without onnxsim)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    src = resolve(a.model)
    grid = POINTS[a.points or ("mini" if "mini" in src.name else "nano")]
    unknown = [k for k in a.only if k not in grid]
    if unknown:
        print(f"error: unknown point(s) {unknown}; the grid has {list(grid)}", file=sys.stderr)
        return 2
    points = {k: _with_recovery(v, a.recover_steps, a.recover_batch_size)
              for k, v in grid.items() if not a.only or k in a.only}
    recipe = load_recipe(a.recipe, STAGE_CONFIGS)
    if a.no_simplify:
        recipe = with_overrides(recipe, export={"simplify": False})
    tok = load_tokenizer(src)
    try:
        plan = plan_data(src, recipe, a.domain, None, a.recover or None)
        texts = load_texts(src, tok, recipe, plan, auto=True)      # dev = the domain's dev split
    except EdgekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.eval_tokens:
        texts.eval = texts.eval[: a.eval_tokens + 1]
    if a.dev_tokens:
        texts.dev = texts.dev[: a.dev_tokens + 1]
    seq = recipe.validate.seq_len
    cache = StageCache()
    console = Console(stderr=True)
    st = Stages(console, total="*", device=a.device)
    baseline = baseline_for(src, recipe, texts.eval, cache, st)     # what compress's gates compare with
    fp32_eval, base_bytes = baseline["accuracy"], baseline["onnx_bytes"]
    fp32_dev = fp32_accuracy(src, texts.dev, recipe, cache, st, "dev")
    ood = {}
    if a.ood:
        for d in plan.out_of_domain:
            toks = load_tokens(f"{d}/eval", tok)[: (a.eval_tokens or 10**9) + 1]
            ood[d] = (toks, fp32_accuracy(src, toks, recipe, cache, st, f"{d}/eval"))
    out = Path(a.out or f"benchmarks/results/frontier_{src.name}_{a.domain}")
    rows, failed, sizes = [], 0, {}
    ctx = (a, argv, src, texts, seq, fp32_eval, fp32_dev, base_bytes, t0, sizes)

    # 1. sizes first: a point's size does not depend on its training (same shapes, same precision plan
    #    for fixed-precision points), so the point built without recovery measures it
    _say(console, f"fp32 {100 * fp32_eval:.2f}% on {len(texts.eval) - 1:,} eval tokens; sizes before training:")
    for name, over in points.items():
        t, n0 = time.perf_counter(), len(st.rows)
        try:
            probe = _without_recovery(over, list(points.values()))
            b0 = build(src, with_overrides(recipe, **probe), texts, texts.dev, fp32_dev, cache, st)
        except Exception as e:                               # noqa: BLE001 - recorded, the next point runs
            failed += 1
            rows.append(_failed(name, over, e, "size (built without recovery)"))
            _write(out, _result(*ctx, rows))
            continue
        size = graph_bytes(b0.quantized)
        sizes[name] = {"size_bytes": size, "size_ratio": size / base_bytes, "pruned": b0.pruned,
                       "build_seconds": round(time.perf_counter() - t, 1),
                       "score_dev_seconds": sum(r["seconds"] for r in st.rows[n0:] if r["name"].startswith("score"))}
        _write(out, _result(*ctx, rows))
        print(f"{name:44s} size {size / base_bytes:.4f} ({size / 1e6:.2f} MB) before training", flush=True)
    todo = [k for k in points if k in sizes and (not a.max_size_ratio or sizes[k]["size_ratio"] <= a.max_size_ratio)]
    for k in points:
        if k in sizes and k not in todo:
            print(f"{k:44s} skipped: size {sizes[k]['size_ratio']:.4f} > --max-size-ratio {a.max_size_ratio}")
            rows.append({"name": k, "overrides": points[k], "size_ratio": sizes[k]["size_ratio"],
                         "skipped": f"size ratio over --max-size-ratio {a.max_size_ratio}"})

    # 2. distillation step time on this device, per distilling point (a few steps, not cached)
    step_s = {}
    if a.time_budget:
        for k in todo:
            if points[k]["prune"].get("recover_steps"):
                step_s[k] = _step_seconds(src, with_overrides(recipe, **points[k]), sizes[k]["pruned"], texts, a.device)
                print(f"{k:44s} distillation {step_s[k]:.3f} s/step on {a.device}", flush=True)

    # 3. the points in grid order, each row written as soon as it is measured
    # a distilling point's cost besides training, until one is measured: its build again (the probe's
    # time) plus scoring eval, dev and other domains at the probe's dev-scoring rate (x1.5: the
    # quantized graph), or twice the build when the probe's scoring was cached
    n_tok = len(texts.eval) + 2 * len(texts.dev) + sum(len(v[0]) for v in ood.values())
    fixed_est = max((s["build_seconds"] + (1.5 * s["score_dev_seconds"] * n_tok / len(texts.dev)
                                           if s["score_dev_seconds"] > 0.5 else s["build_seconds"])
                     for k, s in sizes.items() if k in todo), default=0.0)
    if a.time_budget:
        print(f"estimated {fixed_est:.0f} s per distilling point besides its training", flush=True)
    for i, name in enumerate(todo):
        over = points[name]
        steps = over["prune"].get("recover_steps", 0)
        if a.time_budget and steps:     # points without recovery are built already (size pass): scores only
            left = a.time_budget - (time.perf_counter() - t0)
            fit = _fit_steps(left, fixed_est, todo[i:], step_s, steps)
            if fit < steps:
                if fit < a.min_steps:
                    print(f"{name:44s} skipped: {left:.0f} s left fit {max(fit, 0)} steps < --min-steps "
                          f"{a.min_steps}", flush=True)
                    rows.append({"name": name, "overrides": over, "size_ratio": sizes[name]["size_ratio"],
                                 "skipped": f"time budget: {max(fit, 0)} steps fit in {left:.0f} s"})
                    _write(out, _result(*ctx, rows))
                    continue
                print(f"{name:44s} {fit} distillation steps fit the time left ({left:.0f} s)", flush=True)
                over = _with_recovery(over, fit, 0)
                steps = fit
        label = _relabel(name, steps)
        t = time.perf_counter()
        try:
            row = _measure(label, over, src, recipe, texts, fp32_dev, fp32_eval, base_bytes, ood, seq, cache, st)
        except Exception as e:                               # noqa: BLE001 - recorded, the next point runs
            failed += 1
            rows.append(_failed(label, over, e, "build / score") | {"grid_name": name})
            _write(out, _result(*ctx, rows))
            continue
        row["seconds"], row["grid_name"] = round(time.perf_counter() - t, 1), name
        if steps and name in step_s:
            row["distill_seconds_per_step"] = round(step_s[name], 4)
            fixed_est = max(fixed_est, row["seconds"] - steps * step_s[name])
        elif not steps:
            fixed_est = max(fixed_est, row["seconds"])
        rows.append(row)
        _write(out, _result(*ctx, rows))
        print(f"{label:44s} size {row['size_ratio']:.4f}  drop {row['drop_points']:+.2f} points "
              f"({row['drop_relative_pct']:+.2f}%)  dev {row['dev_drop_points']:+.2f}"
              + "".join(f"  {d} {v['drop_points']:+.2f}" for d, v in row.get("out_of_domain", {}).items())
              + f"  [{row['seconds']:.0f}s]", flush=True)
    result = _result(*ctx, rows)
    _write(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.json / .md ({time.perf_counter() - t0:.0f} s in all; {failed} point(s) failed)")
    return 1 if failed else 0


def _measure(name, over, src, recipe, texts, fp32_dev, fp32_eval, base_bytes, ood, seq, cache, st) -> dict:
    """Build one point through the cached stages and score its bundle (eval, dev, other domains)."""
    b = build(src, with_overrides(recipe, **over), texts, texts.dev, fp32_dev, cache, st)
    acc = score(b.quantized, texts.eval, seq)["accuracy"]
    dev = score(b.quantized, texts.dev, seq)["accuracy"]
    q = json.loads((b.quantized / "quantize.json").read_text())
    pr = json.loads((b.pruned / "prune.json").read_text())
    size = graph_bytes(b.quantized)
    row = {"name": name, "overrides": over, "params": pr.get("params_after"),
           "size_bytes": size, "size_ratio": size / base_bytes,
           "accuracy": acc, "fp32_accuracy": fp32_eval, "drop_points": 100 * (fp32_eval - acc),
           "drop_relative_pct": 100 * (fp32_eval - acc) / fp32_eval,
           "pruned_fp32_dev_accuracy": b.pruned_accuracy, "dev_accuracy": dev, "dev_fp32_accuracy": fp32_dev,
           "dev_drop_points": 100 * (fp32_dev - dev), "int8_budget_points": 100 * b.int8_budget,
           "precision": _precision_summary(q)}
    for d, (toks, f32) in ood.items():
        o = score(b.quantized, toks, seq)["accuracy"]
        row.setdefault("out_of_domain", {})[d] = {"accuracy": o, "fp32_accuracy": f32, "drop_points": 100 * (f32 - o),
                                                  "drop_relative_pct": 100 * (f32 - o) / f32}
    return row


def _fit_steps(left: float, fixed_est: float, rest: list[str], step_s: dict[str, float], steps: int) -> int:
    """Distillation steps per point that fit ``left`` seconds: every remaining point costs
    ``fixed_est`` besides its training (a point without recovery, built already, half of it: scoring
    only), the distilling ones share what is left equally; at most ``steps``, possibly <= 0."""
    train = sum(step_s.get(k, 0.0) for k in rest)
    if not train:
        return steps
    n_fixed = sum(1.0 if k in step_s else 0.5 for k in rest)
    return min(steps, int((left - fixed_est * n_fixed) / train))


def _with_recovery(over: dict, steps: int, batch: int) -> dict:
    """``over`` with ``steps`` distillation steps / ``batch`` windows per step where it distills."""
    if not over["prune"].get("recover_steps"):
        return over
    prune = {**over["prune"], **({"recover_steps": steps} if steps else {}),
             **({"recover_batch_size": batch} if batch else {})}
    return {**over, "prune": prune}


def _without_recovery(over: dict, selected: list[dict] = ()) -> dict:
    """The point's tables without distillation: the same shapes and precision, hence the same size.
    When one of the ``selected`` points is that build up to smoothing (which only rescales), that
    point's tables, so both share one cached build; otherwise the point's own smoothing setting (a
    QAT point's probe then skips the smoothing stage as the point does)."""
    bare = {**over, "prune": {**over["prune"], "recover_steps": 0, "recover_fake_quant": ""}}
    shared = {k: v for k, v in bare.items() if k != "smooth"}
    return shared if shared in selected else bare


def _relabel(name: str, steps: int) -> str:
    """The point's name with its actual step count (the grid names say 200)."""
    return name.replace(" 200", f" {steps}") if steps else name


def _step_seconds(src, recipe, pruned: Path, texts, device: str, steps: int = 8) -> float:
    """Median seconds per distillation step of ``recipe``'s recovery (fake quantization included) on
    ``device``, timed on a few steps from the pruned checkpoint (the first two are warm-up)."""
    from edgekit.checkpoint import load
    from edgekit.device import pick
    from edgekit.distill import distill_

    cfg = dataclasses.replace(recipe.prune.distill_config(progress=False, device=pick(device).type), steps=steps)
    stamps = [time.perf_counter()]
    distill_(load(pruned), load(src), texts.recover, cfg, on_step=lambda *_: stamps.append(time.perf_counter()))
    return float(np.median(np.diff(stamps)[2:]))


def _failed(name: str, over: dict, e: Exception, where: str) -> dict:
    traceback.print_exc()
    print(f"{name:44s} FAILED in {where}: {type(e).__name__}: {e}", flush=True)
    return {"name": name, "overrides": over, "error": f"{where}: {type(e).__name__}: {e}"}


def _say(console, msg: str) -> None:
    console.print(msg, highlight=False)


def _result(a, argv, src, texts, seq, fp32_eval, fp32_dev, base_bytes, t0, sizes, rows) -> dict:
    facts = host_facts()
    return {"command": "python benchmarks/frontier.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
            "model": src.name, "domain": a.domain, "recipe": a.recipe,
            "eval": {"split": f"{a.domain}/eval", "tokens": int(len(texts.eval) - 1), "seq_len": seq,
                     "subset": bool(a.eval_tokens)},
            "dev": {"split": texts.dev_name, "tokens": int(len(texts.dev))},
            "recover": {"text": texts.recover_name, "tokens": int(len(texts.recover))},
            "fp32": {"eval_accuracy": fp32_eval, "dev_accuracy": fp32_dev, "onnx_bytes": base_bytes},
            "machine": {"cpu": facts.get("cpu_model") or platform.processor(), "cores": facts.get("cores"),
                        "onnxruntime": facts.get("onnxruntime"), "python": platform.python_version(),
                        "device": a.device},
            "seconds": round(time.perf_counter() - t0, 1),
            "sizes_before_training": {k: {"size_bytes": v["size_bytes"], "size_ratio": v["size_ratio"],
                                          "build_seconds": v["build_seconds"]} for k, v in sizes.items()},
            "points": rows}


def _write(out: Path, result: dict) -> None:
    """Both files after every point, so an interrupted run keeps what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))


def _precision_summary(q: dict) -> dict:
    prec = q.get("precision", {})
    out = {}
    for unit, p in prec.items():
        out.setdefault(p, []).append(unit)
    return {p: len(u) for p, u in out.items()} | {"int4_units": sorted(out.get("int4", []))}


def _markdown(r: dict) -> str:
    done = [p for p in r["points"] if "accuracy" in p]
    ood = sorted({d for p in done for d in p.get("out_of_domain", {})})
    lines = [f"# Frontier: {r['model']}, target domain {r['domain']} (recipe {r['recipe']})", "",
             f"`{r['command']}`", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, onnxruntime "
             f"{r['machine']['onnxruntime']}, torch stages on {r['machine']['device']}; {r['seconds']:.0f} s in all.",
             "",
             f"Eval: first {r['eval']['tokens']:,} tokens of `{r['eval']['split']}` (windows of "
             f"{r['eval']['seq_len']}); fp32 {100 * r['fp32']['eval_accuracy']:.2f}%. Planner budget and dev "
             f"column: `{r['dev']['split']}` ({r['dev']['tokens']:,} tokens, fp32 "
             f"{100 * r['fp32']['dev_accuracy']:.2f}%). fp32 ONNX {r['fp32']['onnx_bytes'] / 1e6:.2f} MB."
             + (f" Distillation text: `{r['recover']['text']}` ({r['recover']['tokens']:,} tokens)."
                if r.get("recover") else ""), "",
             "| point | params | size MB | size ratio | accuracy | drop (points) | drop (relative) | dev drop | "
             + "".join(f"{d} drop | " for d in ood) + "4-bit units | seconds |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(ood) + "---|---|"]
    for p in done:
        n4 = len(p["precision"].get("int4_units", []))
        o = p.get("out_of_domain", {})
        lines.append(f"| {p['name']} | {p['params'] / 1e6:.2f}M | {p['size_bytes'] / 1e6:.2f} | "
                     f"{p['size_ratio']:.4f} | {100 * p['accuracy']:.2f}% | {p['drop_points']:+.2f} | "
                     f"{p['drop_relative_pct']:+.2f}% | {p['dev_drop_points']:+.2f} | "
                     + "".join(f"{o[d]['drop_points']:+.2f} | " if d in o else "- | " for d in ood)
                     + f"{n4} | {p.get('seconds', 0):.0f} |")
    if ood:
        lines += ["", "Out-of-domain columns: drop in points on the first tokens of each other domain's eval split "
                  "(as many as the eval column; " + ", ".join(
                      f"{d} fp32 {100 * done[0]['out_of_domain'][d]['fp32_accuracy']:.2f}%"
                      for d in ood if d in done[0].get("out_of_domain", {})) + "); reported, not gated."]
    named = {p.get("grid_name", p["name"]) for p in r["points"]}
    rest = [p for p in r["points"] if "accuracy" not in p] + [
        {"name": k, "size_ratio": v["size_ratio"], "skipped": "not reached yet (size measured before training)"}
        for k, v in r.get("sizes_before_training", {}).items() if k not in named]
    if rest:
        lines += ["", "Not measured:", ""]
        lines += [f"- {p['name']}" + (f" (size ratio {p['size_ratio']:.4f})" if "size_ratio" in p else "")
                  + f": {p.get('skipped') or p.get('error')}" for p in rest]
    lines += ["", "Gates (cpu4): size ratio <= 0.25 (goal 0.125), drop <= 0.8 points and <= 0.8% relative."]
    if r["eval"].get("subset"):
        lines += ["", "The eval column reads a slice of the split (`--eval-tokens`); the gate of `edgekit compress` "
                  "reads the whole split, which can differ by more than the gate's width (v3-mini, python: a point "
                  "read +0.26 points on the first 16,384 tokens; its recipe, with 3,500 steps instead of 3,872, "
                  "read +0.69 on the whole split). Confirm a passing point with `--eval-tokens 0` or a compress "
                  "run."]
    return "\n".join(lines + [""])


def plot(r: dict, path: Path) -> None:
    """Size ratio vs both drops, with the gates; ``r``: {"model", "domain", "points": [{"name",
    "size_ratio", "drop_points", "drop_relative_pct", "accuracy"}]}. No-op without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [p for p in r["points"] if "accuracy" in p]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [p["size_ratio"] for p in done]
    ax.scatter(xs, [p["drop_points"] for p in done], label="drop (points)")
    ax.scatter(xs, [p["drop_relative_pct"] for p in done], marker="x", label="drop (% of fp32)")
    at = {}
    for p in done:                                   # one label per spot: points that coincide share it
        at.setdefault((round(p["size_ratio"], 4), round(p["drop_points"], 2)), []).append(p["name"])
    for (x, y), names in at.items():
        ax.annotate("\n".join(names), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.8, ls="--", c="gray", label="0.8 (points and % gates)")
    ax.axvline(0.125, ls=":", c="tab:red", label="size goal 0.125")
    ax.axvline(0.25, ls=":", c="gray", label="size gate 0.25")
    ax.set_yscale("symlog", linthresh=2.0, linscale=2.0)    # linear around the gates, log beyond
    top = max([2.0] + [max(p["drop_points"], p["drop_relative_pct"]) for p in done])
    ticks = [t for t in (-0.4, 0, 0.4, 0.8, 1.2, 2, 5, 10, 20, 50, 100) if t <= 2 * top]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(bottom=min([-0.6] + [p["drop_points"] - 0.2 for p in done]))
    ax.set_xlabel("bundle size / fp32 ONNX size")
    ax.set_ylabel("accuracy drop (symlog)")
    ax.set_title(f"{r['model']} ({r['domain']}): size vs accuracy drop")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
