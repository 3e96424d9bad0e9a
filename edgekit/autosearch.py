"""``edgekit compress --auto``: search pruning ratios x precision for the smallest passing model.

What: ``search(...)`` builds each candidate of ``CANDIDATES`` (recipe overrides applied on top of the
target's recipe) through the same cached stages as a plain compress, scores each on the eval tokens
(onnxruntime) and its size, and returns the smallest candidate that meets the accuracy and size
gates (latency is then validated on the winner), the candidates and their Pareto front
(size ratio vs accuracy drop). Every stage is cached, so a second ``--auto`` run is cheap.

Why a small fixed grid: on v3-nano, pruning is what costs accuracy (structured pruning + short
distillation, see benchmarks/results/prune_*), int8 costs ~0.1 points; each candidate is a full
prune + recover + quantize, so the grid covers one axis at a time plus the combinations that
matter. Failure modes: when no candidate passes, the smallest-drop candidate is returned and its
gates fail as usual (exit 1).
"""

from __future__ import annotations

from .recipes import drop_budget, with_overrides
from .validate import graph_bytes, score

# name -> {table: {field: value}}; applied over the target recipe.
CANDIDATES = {
    "int8": {"prune": {"experts": 0.0, "ffn": 0.0, "heads": 0.0, "layers": 0}},
    "int8+experts12": {"prune": {"experts": 0.125, "ffn": 0.0, "heads": 0.0, "layers": 0}},
    "int8+experts25": {"prune": {"experts": 0.25, "ffn": 0.0, "heads": 0.0, "layers": 0}},
    "int8+ffn10": {"prune": {"experts": 0.0, "ffn": 0.1, "heads": 0.0, "layers": 0}},
    "int8+experts12+ffn10": {"prune": {"experts": 0.125, "ffn": 0.1, "heads": 0.0, "layers": 0}},
}


def pareto(cands: list[dict]) -> list[dict]:
    """Candidates not dominated in (size_ratio, accuracy_drop), both lower-is-better."""
    return [c for c in cands if not any(
        o is not c and o["size_ratio"] <= c["size_ratio"] and o["accuracy_drop"] <= c["accuracy_drop"]
        and (o["size_ratio"] < c["size_ratio"] or o["accuracy_drop"] < c["accuracy_drop"]) for o in cands)]


def pick(cands: list[dict]) -> dict:
    passing = [c for c in cands if c["passed"]]
    return min(passing, key=lambda c: c["size_ratio"]) if passing else min(cands, key=lambda c: c["accuracy_drop"])


def search(src, recipe, calib, eval_tokens, baseline, cache, st, recover=None):
    from .pipeline import build_model_dirs

    cands, built = [], {}
    for name, over in CANDIDATES.items():
        r = with_overrides(recipe, **over)
        dirs = build_model_dirs(src, r, calib, eval_tokens, baseline, cache, st, recover)
        acc = score(dirs["quantized"], eval_tokens, recipe.validate.seq_len)["accuracy"]
        c = {"name": name, "overrides": over, "accuracy": acc, "accuracy_drop": baseline["accuracy"] - acc,
             "size_ratio": graph_bytes(dirs["quantized"]) / baseline["onnx_bytes"]}
        c["passed"] = (c["accuracy_drop"] <= drop_budget(recipe.goals, baseline["accuracy"])
                       and c["size_ratio"] <= recipe.goals.size_ratio)
        st.log(f"candidate {name}: drop {100 * c['accuracy_drop']:.2f} points, size {c['size_ratio']:.3f}, "
               f"{'passes' if c['passed'] else 'fails'}")
        cands.append(c)
        built[name] = (r, dirs)
    best = pick(cands)
    r, dirs = built[best["name"]]
    return r, dirs, {"candidates": cands, "pareto": pareto(cands), "chosen": best["name"]}
