"""--auto selection logic: Pareto front and the smallest passing candidate."""

from edgekit.autosearch import pareto, pick


def _c(name, size, drop, passed):
    return {"name": name, "size_ratio": size, "accuracy_drop": drop, "passed": passed}


def test_pareto_drops_dominated_candidates():
    cands = [_c("a", 0.30, 0.001, True), _c("b", 0.25, 0.004, True), _c("c", 0.26, 0.005, True),
             _c("d", 0.20, 0.030, False)]
    assert [c["name"] for c in pareto(cands)] == ["a", "b", "d"]


def test_pick_smallest_passing_else_most_accurate():
    cands = [_c("a", 0.30, 0.001, True), _c("b", 0.25, 0.004, True), _c("d", 0.20, 0.030, False)]
    assert pick(cands)["name"] == "b"
    assert pick([_c("x", 0.2, 0.05, False), _c("y", 0.3, 0.02, False)])["name"] == "y"
