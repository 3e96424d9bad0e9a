"""CLI: bad input exits 2 with one line and no traceback; info/eval --json are machine-readable."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgekit.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, list(args))


def test_version():
    r = _run("--version")
    assert r.exit_code == 0 and "edgekit, version" in r.output


def test_info_json(tiny_ckpt):
    r = _run("info", str(tiny_ckpt), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["params_total"] > d["params_active"] > 0 and d["kv_cache_bytes_per_token"] > 0


@pytest.mark.parametrize("args", [
    ["info", "/nonexistent/model"],
    ["eval", "/nonexistent/model"],
    ["compress", "--target", "cpu44"],
    ["validate", "/nonexistent/bundle"],
])
def test_bad_input_exits_2_with_one_line(args):
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", *args], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_eval_rejects_empty_data(tiny_ckpt, tmp_path):
    (tiny_ckpt / "tokenizer.json").write_text((__import__("edgekit").checkpoint.reference_model_dir()
                                               / "tokenizer.json").read_text())
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = _run("eval", str(tiny_ckpt), "--data", str(empty))
    assert r.exit_code == 2 and "empty" in r.output
