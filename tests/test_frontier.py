"""Pure logic of benchmarks/frontier.py: the size probe of a point, step relabelling, the time
budget's step count and the tables of partial runs (skipped and failed points kept)."""

from benchmarks.frontier import POINTS, _fit_steps, _markdown, _relabel, _with_recovery, _without_recovery


def test_size_probe_is_the_grids_point_without_recovery():
    """A distilled point's size is measured on the build without recovery, which for KD and QAT
    points alike is the grid's no-recovery point of the same pruning (one cached build)."""
    nano = POINTS["nano"]
    sel = list(nano.values())
    for name in ("experts 50% + KD 200 + int4 all", "experts 50% + QAT 200 + int4 all"):
        assert _without_recovery(nano[name], sel) == nano["experts 50% + int4 all"], name
    assert _without_recovery(nano["experts 25% + QAT 200 + int4 all"], sel) == nano["experts 25% + int4 all"]
    mini = POINTS["mini"]
    qat = mini["experts 50% + QAT 200 + int4"]
    assert _without_recovery(qat, list(mini.values())) == mini["experts 50% + int4"]
    # the QAT point alone: its probe keeps the point's smoothing (off), same shapes and precision
    alone = _without_recovery(qat, [qat])
    assert alone["smooth"] == {"enabled": False} and alone["prune"]["recover_steps"] == 0
    assert alone["prune"]["recover_fake_quant"] == "" and alone["quantize"] == qat["quantize"]


def test_recovery_overrides_touch_only_distilling_points():
    nano = POINTS["nano"]
    over = _with_recovery(nano["experts 50% + KD 200 + int4 all"], 40, 16)
    assert over["prune"]["recover_steps"] == 40 and over["prune"]["recover_batch_size"] == 16
    assert nano["experts 50% + KD 200 + int4 all"]["prune"]["recover_steps"] == 200      # grid unchanged
    assert _with_recovery(nano["int8"], 40, 16) is nano["int8"]
    assert _relabel("experts 50% + QAT 200 + int4", 1234) == "experts 50% + QAT 1234 + int4"
    assert _relabel("int8", 0) == "int8"


def test_time_budget_steps():
    step_s = {"a": 0.5, "b": 0.5}
    # 100 s left, 20 s fixed per distilling point and 10 s for the scored-only one: 50 s of training
    # shared by a and b at 1 s per step of both -> 50 steps each, capped by the requested count
    assert _fit_steps(100, 20, ["a", "b", "c"], step_s, 1000) == 50
    assert _fit_steps(100, 20, ["a", "b", "c"], step_s, 30) == 30
    assert _fit_steps(30, 20, ["a", "b"], step_s, 1000) < 0
    assert _fit_steps(5, 20, ["c"], step_s, 7) == 7                  # nothing distils: as asked


def test_markdown_keeps_partial_runs():
    point = {"name": "int4 all linears", "grid_name": "int4 all linears", "params": 8.8e6, "size_bytes": 6.5e6,
             "size_ratio": 0.1836, "accuracy": 0.6, "drop_points": 0.3, "drop_relative_pct": 0.5,
             "dev_drop_points": 0.2, "precision": {"int4_units": ["lm_head"]}, "seconds": 12,
             "out_of_domain": {"c": {"accuracy": 0.5, "fp32_accuracy": 0.51, "drop_points": 1.0}}}
    r = {"model": "v3-nano", "domain": "python", "recipe": "cpu4", "command": "python benchmarks/frontier.py",
         "machine": {"cpu": "x", "cores": 2, "onnxruntime": "1.32.0", "device": "cpu"}, "seconds": 1.0,
         "eval": {"split": "python/eval", "tokens": 1024, "seq_len": 512},
         "dev": {"split": "python/dev", "tokens": 1024},
         "fp32": {"eval_accuracy": 0.6, "dev_accuracy": 0.6, "onnx_bytes": 35e6},
         "sizes_before_training": {"int4 all linears": {"size_ratio": 0.1836},
                                   "experts 50% + QAT 200 + int4 all": {"size_ratio": 0.14}},
         "points": [point, {"name": "experts 50% + KD 40 + int4 all", "error": "build / score: RuntimeError: x"}]}
    md = _markdown(r)
    assert "| int4 all linears | 8.80M | 6.50 | 0.1836 |" in md and "c drop" in md and "+1.00" in md, md
    assert "experts 50% + KD 40 + int4 all: build / score: RuntimeError: x" in md
    assert "experts 50% + QAT 200 + int4 all (size ratio 0.1400): not reached yet" in md


def test_every_grid_point_applies_to_the_cpu4_recipe():
    """Every point's tables are valid recipe overrides (a misspelled key or bad value fails here, not
    on the GPU host); the row-scaled points carry both halves: QAT per row and the QMoE per row."""
    from edgekit.pipeline import STAGE_CONFIGS
    from edgekit.recipes import load_recipe, with_overrides

    base = load_recipe("cpu4", STAGE_CONFIGS)
    for grid in POINTS.values():
        for name, over in grid.items():
            r = with_overrides(base, **over)
            if name.endswith(" rows"):
                assert r.prune.recover_fake_quant_block == 0 and r.quantize.int4_moe_rows is True, name
            elif r.quantize.int4:   # 4-bit points stay in blocks, whatever the recipe's own setting
                assert r.quantize.int4_moe_rows is False, name


def test_compress_runs_tabulates_build_reports_and_refuses_other_files(tmp_path, capsys):
    """benchmarks/compress_runs.py reads the committed v3-mini cpu4-moe reports: the recipe's run is the
    one in device_runs/, and its row carries the gate values of that report."""
    import json
    from pathlib import Path

    from benchmarks.compress_runs import main

    runs = Path(__file__).resolve().parent.parent / "device_runs" / "v3-mini-cpu4-moe-h200"
    rep = json.loads((runs / "report.json").read_text())
    assert main([str(runs / "report.json"), str(runs / "runs" / "rows-5of16-recover-sample.json"),
                 "--out", str(tmp_path / "t")]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    first = res["points"][0]
    assert first["size_ratio"] == rep["gates"]["size_ratio"]["value"]
    assert abs(first["drop_relative_pct"] - 100 * rep["gates"]["accuracy_drop_relative"]["value"]) < 1e-9
    assert first["recover"] == "python/train" and res["points"][1]["recover"] == "python/recover"
    md = (tmp_path / "t.md").read_text()
    assert "| report | 0.5625 | python/train |" in md and "| fail |" in md
    (tmp_path / "x.json").write_text("{}")
    capsys.readouterr()
    assert main([str(tmp_path / "x.json"), "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an edgekit build report" in err and not (tmp_path / "u.md").exists()


def test_frontier_refuses_a_recovery_split_the_domain_does_not_ship(capsys):
    from benchmarks.frontier import main

    assert main(["--model", "v3-mini", "--domain", "c", "--recover", "c/train", "--only", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c/train" in err
