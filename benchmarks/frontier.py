"""Size vs accuracy frontier of the cpu4 pipeline: bundle size ratio against the accuracy drop, in
points and relative to fp32, per model and target domain, for pruning x precision x recovery points.

Run:  python benchmarks/frontier.py --model v3-nano --domain python --eval-tokens 32768
      python benchmarks/frontier.py --model v3-mini --domain python --points mini
      python benchmarks/frontier.py --model v3-nano --only "int4 experts (searched)"

Every point is the shipped cpu4 recipe (``export_recipes/cpu4.toml``, or ``--recipe``) with the
point's table overrides, built by the pipeline's own ``build`` (prune + recover -> smooth -> export
-> score -> plan -> quantize, every stage through the stage cache, so points sharing a pruned model
share its stage). Like ``compress --auto``, the planner's accuracy budget is taken on the target
domain's dev split and calibration/distillation read its calib/recover splits; the eval split (its
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
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.checkpoint import load_tokenizer, resolve  # noqa: E402
from edgekit.data import load_tokens  # noqa: E402
from edgekit.domains import plan_data  # noqa: E402
from edgekit.host import host_facts  # noqa: E402
from edgekit.pipeline import STAGE_CONFIGS, baseline_for, build, fp32_accuracy, load_texts  # noqa: E402
from edgekit.recipes import load_recipe, with_overrides  # noqa: E402
from edgekit.stagecache import StageCache  # noqa: E402
from edgekit.stages import Stages  # noqa: E402
from edgekit.validate import graph_bytes, score  # noqa: E402

NO_PRUNE = {"experts": 0.0, "ffn": 0.0, "heads": 0.0, "layers": 0, "recover_steps": 0}
EXPERTS = "re:.*mlp\\.experts"
LINEARS = "re:.*(self_attn|mlp|shared_experts).*_proj"        # every Linear but the routers; lm_head apart

# fixed precision (no search, no onnxruntime re-check): routed experts + lm_head 4-bit, the rest int8,
# routers fp32; the int8 budget is the whole accuracy budget, so no unit reverts to fp32 unless the
# all-int8 model alone misses it
FIXED = {"quantize": {"int4": [EXPERTS, "lm_head"], "int4_search": False, "verify_ort": False},
         "goals": {"int8_floor": 1.0}}

# name -> recipe table overrides; "nano": v3-nano (8 experts: every one busy), "mini": v3-mini
# (64 fine-grained experts: the target domain leaves some idle)
POINTS = {
    "nano": {
        "int8": {"prune": NO_PRUNE, "quantize": {"int4": []}},
        "int8 + experts 12.5% + KD 200": {"prune": {**NO_PRUNE, "experts": 0.125, "recover_steps": 200},
                                          "quantize": {"int4": []}},
        "int4 experts (searched)": {"prune": NO_PRUNE, "quantize": {"int4": [EXPERTS, "lm_head"]}},
        "int4 experts": {"prune": NO_PRUNE, "quantize": {"int4": [EXPERTS], "int4_search": False}},
        "int4 experts + lm_head": {"prune": NO_PRUNE,
                                   "quantize": {"int4": [EXPERTS, "lm_head"], "int4_search": False}},
        "int4 all linears": {"prune": NO_PRUNE, "quantize": {"int4": [EXPERTS, LINEARS, "lm_head"],
                                                             "int4_search": False}},
        "experts 25% + KD 200 + int4 all": {"prune": {**NO_PRUNE, "experts": 0.25, "recover_steps": 200},
                                            "quantize": {"int4": [EXPERTS, LINEARS, "lm_head"],
                                                         "int4_search": False}},
        "experts 50% + KD 200 + int4 all": {"prune": {**NO_PRUNE, "experts": 0.5, "recover_steps": 200},
                                            "quantize": {"int4": [EXPERTS, LINEARS, "lm_head"],
                                                         "int4_search": False}},
    },
    "mini": {
        "int8": {"prune": NO_PRUNE, "quantize": {"int4": []}},
        "int4 experts + lm_head": {"prune": NO_PRUNE, **FIXED},
        "experts 50% + int4": {"prune": {**NO_PRUNE, "experts": 0.5}, **FIXED},
        "experts 50% + QAT 200 + int4": {"prune": {**NO_PRUNE, "experts": 0.5, "recover_steps": 200,
                                                   "recover_fake_quant": "int4-experts"},
                                         "smooth": {"enabled": False}, **FIXED},
        "experts 37.5% + int4": {"prune": {**NO_PRUNE, "experts": 0.375}, **FIXED},
        "experts 62.5% + QAT 200 + int4": {"prune": {**NO_PRUNE, "experts": 0.625, "recover_steps": 200,
                                                     "recover_fake_quant": "int4-experts"},
                                           "smooth": {"enabled": False}, **FIXED},
        "experts 50% + KD 200 + int4": {"prune": {**NO_PRUNE, "experts": 0.5, "recover_steps": 200}, **FIXED},
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
    ap.add_argument("--device", default="cpu", help="where torch stages run: cpu, cuda, auto")
    ap.add_argument("--no-simplify", action="store_true",
                    help="skip onnxsim in every export, the fp32 baseline's too (hosts without onnxsim)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    src = resolve(a.model)
    grid = POINTS[a.points or ("mini" if "mini" in src.name else "nano")]
    points = {k: v for k, v in grid.items() if not a.only or k in a.only}
    if a.recover_steps:
        n = a.recover_steps
        points = {k.replace(" 200", f" {n}"): {**v, "prune": {**v["prune"], "recover_steps": n}}
                  if v["prune"].get("recover_steps") else v for k, v in points.items()}
    recipe = load_recipe(a.recipe, STAGE_CONFIGS)
    if a.no_simplify:
        recipe = with_overrides(recipe, export={"simplify": False})
    tok = load_tokenizer(src)
    plan = plan_data(src, recipe, a.domain, None, None)
    texts = load_texts(src, tok, recipe, plan, auto=True)          # dev = the domain's dev split
    if a.eval_tokens:
        texts.eval = texts.eval[: a.eval_tokens + 1]
    if a.dev_tokens:
        texts.dev = texts.dev[: a.dev_tokens + 1]
    seq = recipe.validate.seq_len
    cache = StageCache()
    st = Stages(None, total=0, device=a.device)
    t0 = time.perf_counter()
    baseline = baseline_for(src, recipe, texts.eval, cache, st)     # what compress's gates compare with
    fp32_eval, base_bytes = baseline["accuracy"], baseline["onnx_bytes"]
    fp32_dev = fp32_accuracy(src, texts.dev, recipe, cache, st, "dev")
    ood = {}
    if a.ood:
        for d in plan.out_of_domain:
            toks = load_tokens(f"{d}/eval", tok)[: (a.eval_tokens or 10**9) + 1]
            ood[d] = (toks, fp32_accuracy(src, toks, recipe, cache, st, f"{d}/eval"))
    out = Path(a.out or f"benchmarks/results/frontier_{src.name}_{a.domain}")
    rows = []
    for name, over in points.items():
        r = with_overrides(recipe, **over)
        t = time.perf_counter()
        b = build(src, r, texts, texts.dev, fp32_dev, cache, st)
        acc = score(b.quantized, texts.eval, seq)["accuracy"]
        dev = score(b.quantized, texts.dev, seq)["accuracy"]
        q = json.loads((b.quantized / "quantize.json").read_text())
        pr = json.loads((b.pruned / "prune.json").read_text())
        row = {"name": name, "overrides": over, "params": pr.get("params_after"),
               "size_bytes": graph_bytes(b.quantized), "size_ratio": graph_bytes(b.quantized) / base_bytes,
               "accuracy": acc, "fp32_accuracy": fp32_eval, "drop_points": 100 * (fp32_eval - acc),
               "drop_relative_pct": 100 * (fp32_eval - acc) / fp32_eval,
               "pruned_fp32_dev_accuracy": b.pruned_accuracy, "dev_accuracy": dev, "dev_fp32_accuracy": fp32_dev,
               "dev_drop_points": 100 * (fp32_dev - dev), "int8_budget_points": 100 * b.int8_budget,
               "precision": _precision_summary(q), "seconds": round(time.perf_counter() - t, 1)}
        for d, (toks, f32) in ood.items():
            o = score(b.quantized, toks, seq)["accuracy"]
            row.setdefault("out_of_domain", {})[d] = {"accuracy": o, "fp32_accuracy": f32,
                                                      "drop_points": 100 * (f32 - o)}
        rows.append(row)
        _write(out, _result(a, argv, src, texts, seq, fp32_eval, fp32_dev, base_bytes, t0, rows))
        print(f"{name:40s} size {row['size_ratio']:.4f}  drop {row['drop_points']:+.2f} points "
              f"({row['drop_relative_pct']:+.2f}%)  dev {row['dev_drop_points']:+.2f}  [{row['seconds']:.0f}s]",
              flush=True)
    _plot(_result(a, argv, src, texts, seq, fp32_eval, fp32_dev, base_bytes, t0, rows), out.with_suffix(".png"))
    print(f"wrote {out}.json / .md")
    return 0


def _result(a, argv, src, texts, seq, fp32_eval, fp32_dev, base_bytes, t0, rows) -> dict:
    facts = host_facts()
    return {"command": "python benchmarks/frontier.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
            "model": src.name, "domain": a.domain, "recipe": a.recipe,
            "eval": {"split": f"{a.domain}/eval", "tokens": int(len(texts.eval) - 1), "seq_len": seq},
            "dev": {"split": texts.dev_name, "tokens": int(len(texts.dev))},
            "fp32": {"eval_accuracy": fp32_eval, "dev_accuracy": fp32_dev, "onnx_bytes": base_bytes},
            "machine": {"cpu": facts.get("cpu_model") or platform.processor(), "cores": facts.get("cores"),
                        "onnxruntime": facts.get("onnxruntime"), "python": platform.python_version(),
                        "device": a.device},
            "seconds": round(time.perf_counter() - t0, 1), "points": rows}


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
    lines = [f"# Frontier: {r['model']}, target domain {r['domain']} (recipe {r['recipe']})", "",
             f"`{r['command']}`", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, onnxruntime "
             f"{r['machine']['onnxruntime']}; {r['seconds']:.0f} s in all.", "",
             f"Eval: first {r['eval']['tokens']:,} tokens of `{r['eval']['split']}` (windows of "
             f"{r['eval']['seq_len']}); fp32 {100 * r['fp32']['eval_accuracy']:.2f}%. Planner budget and dev "
             f"column: `{r['dev']['split']}` ({r['dev']['tokens']:,} tokens, fp32 "
             f"{100 * r['fp32']['dev_accuracy']:.2f}%). fp32 ONNX {r['fp32']['onnx_bytes'] / 1e6:.2f} MB.", "",
             "| point | params | size MB | size ratio | accuracy | drop (points) | drop (relative) | dev drop | "
             "4-bit units |", "|---|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        n4 = len(p["precision"].get("int4_units", []))
        lines.append(f"| {p['name']} | {p['params'] / 1e6:.2f}M | {p['size_bytes'] / 1e6:.2f} | "
                     f"{p['size_ratio']:.4f} | {100 * p['accuracy']:.2f}% | {p['drop_points']:+.2f} | "
                     f"{p['drop_relative_pct']:+.2f}% | {p['dev_drop_points']:+.2f} | {n4} |")
    lines += ["", "Gates (cpu4): size ratio <= 0.25 (goal 0.125), drop <= 0.8 points and <= 0.8% relative.", ""]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["size_ratio"] for p in r["points"]]
    ax.scatter(xs, [p["drop_points"] for p in r["points"]], label="drop (points)")
    ax.scatter(xs, [p["drop_relative_pct"] for p in r["points"]], marker="x", label="drop (% of fp32)")
    ax.axhline(0.8, ls="--", c="gray")
    ax.axvline(0.125, ls=":", c="gray")
    ax.axvline(0.25, ls=":", c="gray")
    ax.set_xlabel("bundle size / fp32 ONNX size")
    ax.set_ylabel("accuracy drop")
    ax.set_title(f"{r['model']} ({r['domain']}): size vs accuracy drop")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
