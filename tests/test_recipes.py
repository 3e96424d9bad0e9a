"""Recipes: shipped targets parse; unknown keys / bad values / unknown targets are one-line errors."""

import pytest

from edgekit.errors import EdgekitError
from edgekit.recipes import load_recipe, parse_recipe, recipe_to_toml, target_names, with_overrides


def test_every_shipped_target_parses_and_round_trips(tmp_path):
    assert {"cpu4", "cpu2", "mobile-arm64", "web"} <= set(target_names())
    for name in target_names():
        r = load_recipe(name)
        f = tmp_path / f"{name}.toml"
        f.write_text(recipe_to_toml(r))
        assert load_recipe(str(f)) == load_recipe(str(f)), "recipe.toml as applied must reload"
        assert load_recipe(str(f)).goals == r.goals and load_recipe(str(f)).target == r.target


def test_cpu4_budgets_are_the_v3x_guide_numbers():
    r = load_recipe("cpu4")
    assert r.target.threads == 4
    assert (r.goals.latency_prefill_p95_ms, r.goals.latency_decode_p95_ms, r.goals.accuracy_drop) == (180, 50, 0.008)


@pytest.mark.parametrize("data,msg", [
    ({"target": {"name": "x", "thread": 4}}, "unknown key target.thread; valid keys"),
    ({"target": {"name": "x"}, "goals": {"accuracy_drop": 2}}, "accuracy_drop"),
    ({"target": {"name": "x"}, "prune": {"expert": 0.5}}, "unknown key prune.expert"),
    ({"target": {"name": "x"}, "prune": {"experts": 1.5}}, "experts"),
    ({"target": {"name": "x"}, "bogus": {}}, "unknown table"),
    ({"goals": {}}, "missing \\[target\\] name"),
    ({"target": {"name": "x", "ops": "gpu"}}, "ops"),
])
def test_bad_recipes_name_the_fix(data, msg):
    with pytest.raises(EdgekitError, match=msg) as e:
        parse_recipe(data, "r.toml")
    assert "\n" not in str(e.value)


def test_unknown_target_lists_the_choices():
    with pytest.raises(EdgekitError, match="cpu4"):
        load_recipe("cpu44")


def test_overrides_are_validated():
    r = load_recipe("cpu4")
    assert with_overrides(r, prune={"experts": 0.5}).prune.experts == 0.5
    with pytest.raises(EdgekitError):
        with_overrides(r, prune={"experts": -1})
