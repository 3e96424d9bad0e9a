"""``edgekit compress --auto``: build every ``[auto]`` candidate of the recipe and keep one.

What: ``search(recipe, build, measure, log)`` applies each candidate of ``recipe.auto.candidates``
(stage-table overrides, e.g. ``{prune = {experts = 0.25}}``) over the recipe, builds it with
``build(recipe) -> built`` and measures it with ``measure(built) -> {"accuracy", "fp32_accuracy",
"accuracy_drop", "size_ratio"}`` (the pipeline passes both: its cached stages, and scoring on the
dev split). A candidate passes when its drop meets both accuracy gates of ``[goals]``
(``recipes.drop_budget`` of the fp32 dev accuracy) and its size ratio meets size_ratio;
``pick`` applies ``[auto] select`` among the passing ones ("smallest" size or "most_accurate"),
else takes the most accurate. Returns the chosen (recipe, built), and the candidates with their
Pareto front (size ratio vs accuracy drop) for the report. Latency is validated on the winner.

Why the grid is data: which ratios are worth trying depends on the model and the target (on
v3-nano pruning is what costs accuracy, int8 ~0.1 points; see benchmarks/results/prune_*), so the
recipe lists them (export_recipes/*.toml). Every stage is cached, so a second ``--auto`` is cheap.

Invariants: candidates are tried in the recipe's order; selection reads only ``measure``'s dev
figures, never the eval split the gates read. Failure modes: a candidate whose overrides are not
valid stage fields raises ``EdgekitError`` (checked when the recipe is parsed).
"""

from __future__ import annotations

from .recipes import SELECT, drop_budget, with_overrides


def pareto(cands: list[dict]) -> list[dict]:
    """Candidates not dominated in (size_ratio, accuracy_drop), both lower-is-better."""
    return [c for c in cands if not any(
        o is not c and o["size_ratio"] <= c["size_ratio"] and o["accuracy_drop"] <= c["accuracy_drop"]
        and (o["size_ratio"] < c["size_ratio"] or o["accuracy_drop"] < c["accuracy_drop"]) for o in cands)]


def pick(cands: list[dict], select: str = "smallest") -> dict:
    """Among passing candidates the smallest (or the most accurate); none passing: the most accurate."""
    if select not in SELECT:
        raise ValueError(f"select={select!r}: use one of {SELECT}")
    passing = [c for c in cands if c["passed"]]
    if passing and select == "smallest":
        return min(passing, key=lambda c: c["size_ratio"])
    return min(passing or cands, key=lambda c: c["accuracy_drop"])


def search(recipe, build, measure, log=print):
    goals, cands, built = recipe.goals, [], {}
    for name, over in recipe.auto.candidates.items():
        r = with_overrides(recipe, **over)
        b = build(r)
        c = {"name": name, "overrides": over, **measure(b)}
        c["passed"] = (c["accuracy_drop"] <= drop_budget(goals, c["fp32_accuracy"])
                       and c["size_ratio"] <= goals.size_ratio)
        log(f"candidate {name}: dev drop {100 * c['accuracy_drop']:.2f} points, size {c['size_ratio']:.3f}, "
            f"{'passes' if c['passed'] else 'fails'}")
        cands.append(c)
        built[name] = (r, b)
    best = pick(cands, recipe.auto.select)
    r, b = built[best["name"]]
    return r, b, {"candidates": cands, "pareto": pareto(cands), "chosen": best["name"],
                  "select": recipe.auto.select}
