"""Recipes: shipped targets parse; unknown keys / bad values / unknown targets are one-line errors."""

import dataclasses

import pytest

from edgekit.errors import EdgekitError
from edgekit.pipeline import STAGE_CONFIGS
from edgekit.recipes import Goals, load_recipe, parse_recipe, recipe_to_toml, target_names, with_overrides


def test_every_shipped_target_parses_and_round_trips(tmp_path):
    assert {"cpu4", "cpu2", "mobile-arm64", "web"} <= set(target_names())
    for name in target_names():
        r = load_recipe(name, STAGE_CONFIGS)
        f = tmp_path / f"{name}.toml"
        f.write_text(recipe_to_toml(r))
        assert load_recipe(str(f)) == load_recipe(str(f)), "recipe.toml as applied must reload"
        assert dataclasses.replace(load_recipe(str(f), STAGE_CONFIGS), source=r.source) == r
        assert load_recipe(str(f)).goals == r.goals and load_recipe(str(f)).target == r.target
        if r.prune.recover_fake_quant:   # QAT recipes (cpu4-moe): no SmoothQuant after it (qat.py)
            assert not r.smooth.enabled and r.prune.recover_steps > 0
        else:
            assert len(r.auto.candidates) >= 4 and r.smooth.enabled


def test_cpu4_budgets_are_the_v3x_guide_numbers():
    r = load_recipe("cpu4")
    assert r.target.threads == 4
    assert (r.goals.latency_prefill_p95_ms, r.goals.latency_decode_p95_ms, r.goals.accuracy_drop) == (180, 50, 0.008)


@pytest.mark.parametrize("data,msg", [
    ({"target": {"name": "x", "thread": 4}}, "unknown key target.thread; valid keys"),
    ({"target": {"name": "x"}, "goals": {"accuracy_drop": 2}}, "accuracy_drop"),
    ({"target": {"name": "x"}, "prune": {"expert": 0.5}}, "unknown key prune.expert"),
    ({"target": {"name": "x"}, "prune": {"experts": 1.5}}, "experts"),
    ({"target": {"name": "x"}, "prune": {"recover_fake_quant_block": -1}}, "recover_fake_quant_block"),
    ({"target": {"name": "x"}, "prune": {"recover_fake_quant": "int3"}}, "fake_quant"),
    ({"target": {"name": "x"}, "bogus": {}}, "unknown table"),
    ({"target": {"name": "x"}, "data": {"recover": "all"}}, "recover='all': use \"recover\""),
    ({"target": {"name": "x"}, "data": {"domain": "c", "recover": "train"}}, "domain 'c' ships recover only"),
    ({"goals": {}}, "missing \\[target\\] name"),
    ({"target": {"name": "x"}, "validate": {"rounds": 0}}, "rounds >= 1"),
    ({"target": {"name": "x", "ops": "gpu"}}, "ops"),
    ({"target": {"name": "x", "format": "flatbuffer"}}, "format"),
    ({"target": {"name": "x"}, "auto": {"select": "biggest"}}, "select"),
    ({"target": {"name": "x"}, "auto": {"candidates": {"a": {"prune": {"expert": 0.5}}}}},
     "candidate 'a'.*prune.expert"),
    ({"target": {"name": "x"}, "auto": {"candidates": {"a": {"bogus": {}}}}}, "not a stage table"),
])
def test_bad_recipes_name_the_fix(data, msg):
    with pytest.raises(EdgekitError, match=msg) as e:
        parse_recipe(data, "r.toml", STAGE_CONFIGS)
    assert "\n" not in str(e.value)


def test_device_side_parse_keeps_stage_tables_as_data():
    r = parse_recipe({"target": {"name": "x"}, "prune": {"expert": 0.5}}, "r.toml")   # no stage configs given
    assert r.prune == {"expert": 0.5} and r.quantize is None and "expert = 0.5" in recipe_to_toml(r)


def test_int8_budget_split_is_recipe_data():
    g = Goals(accuracy_drop=0.008, accuracy_drop_relative=0.5)   # margin 1/4, floor 1/4; points gate binds
    assert g.int8_budget(0.6, pruning_cost=0.001, cap=1.0) == pytest.approx(0.005)    # 0.006 - 0.001
    assert g.int8_budget(0.6, pruning_cost=0.0055, cap=1.0) == pytest.approx(0.002)   # floor: 0.008 / 4
    assert g.int8_budget(0.6, pruning_cost=0.0, cap=0.003) == pytest.approx(0.003)    # [quantize] max_drop caps it
    split = Goals(accuracy_drop=0.008, accuracy_drop_relative=0.5, int8_margin=0.0, int8_floor=0.5)
    assert split.int8_budget(0.6, 0.0055, 1.0) == pytest.approx(0.004)
    rel = Goals(accuracy_drop=0.008, accuracy_drop_relative=0.008)   # at 50% fp32 accuracy: 0.4 points binds
    assert rel.int8_budget(0.5, pruning_cost=0.0, cap=1.0) == pytest.approx(0.003)      # 0.004 * 3/4


def test_unknown_target_lists_the_choices():
    with pytest.raises(EdgekitError, match="cpu4"):
        load_recipe("cpu44")


def test_overrides_are_validated():
    r = load_recipe("cpu4", STAGE_CONFIGS)
    assert with_overrides(r, prune={"experts": 0.5}).prune.experts == 0.5
    with pytest.raises(EdgekitError):
        with_overrides(r, prune={"experts": -1})


def test_shipped_recipes_declare_only_what_applies():
    """A portable export has no com.microsoft expert kernel to pick, so its recipe names none; an
    .ort target (mobile operator set) exports portable experts (edgekit/mobile.py refuses contrib)."""
    from edgekit.recipes import recipes_dir, tomllib  # tomllib, or tomli on Python 3.10

    for name in target_names():
        raw = tomllib.loads((recipes_dir() / f"{name}.toml").read_text())
        if raw.get("export", {}).get("moe") == "portable":
            assert "moe" not in raw.get("quantize", {}), f"{name}: [quantize] moe does not apply to portable experts"
        if raw["target"].get("format") == "ort":
            assert raw.get("export", {}).get("moe") == "portable", f"{name}: an .ort target needs portable experts"
