"""Stage cache: every entry carries a content record checked on every hit; a corrupted, truncated or
edited entry is rebuilt with a warning, never used; `edgekit cache ls|verify|clear`."""

import json

import pytest
from click.testing import CliRunner

from edgekit.cli import cli
from edgekit.stagecache import ENTRY_FILE, StageCache, verify_entry


def _build(calls):
    def build(tmp):
        calls.append(1)
        (tmp / "model.onnx").write_bytes(bytes(range(256)) * 64)
        (tmp / "meta.json").write_text(json.dumps({"accuracy": 0.46}))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part.bin").write_bytes(b"x" * 100)
    return build


def _entry(tmp_path):
    calls, warnings = [], []
    cache = StageCache(tmp_path / "cache", log=warnings.append)
    d = cache.get("quantize", ["k"], _build(calls))
    return cache, d, calls, warnings


def test_hit_reuses_an_intact_entry(tmp_path):
    cache, d, calls, warnings = _entry(tmp_path)
    assert verify_entry(d) is None and (d / ENTRY_FILE).exists()
    assert cache.get("quantize", ["k"], _build(calls)) == d and len(calls) == 1 and cache.hits == ["quantize"]
    assert not warnings


@pytest.mark.parametrize("how, why", [
    ("same-size corruption", "does not match its hash"),
    ("truncated meta.json", "bytes"),
    ("edited meta.json", "bytes"),
    ("record deleted", "no content record"),
    ("record corrupt", "record is corrupt"),
    ("extra file", "not in its record"),
    ("file deleted", "missing"),
    ("nested file changed", "does not match its hash"),
])
def test_damaged_entries_are_rebuilt_with_a_warning(tmp_path, how, why):
    cache, d, calls, warnings = _entry(tmp_path)
    if how == "same-size corruption":
        data = bytearray((d / "model.onnx").read_bytes())
        data[4000:6000] = bytes(2000)
        (d / "model.onnx").write_bytes(bytes(data))
    elif how == "truncated meta.json":
        (d / "meta.json").write_text('{"accur')
    elif how == "edited meta.json":
        (d / "meta.json").write_text(json.dumps({"accuracy": 0.0}))
    elif how == "record deleted":
        (d / ENTRY_FILE).unlink()
    elif how == "record corrupt":
        (d / ENTRY_FILE).write_text("[1, 2")
    elif how == "extra file":
        (d / "evil.onnx").write_bytes(b"x")
    elif how == "file deleted":
        (d / "meta.json").unlink()
    elif how == "nested file changed":
        (d / "sub" / "part.bin").write_bytes(b"y" * 100)
    assert why in verify_entry(d)
    again = cache.get("quantize", ["k"], _build(calls))
    assert again == d and len(calls) == 2 and cache.rebuilt == ["quantize"] and not cache.hits
    assert len(warnings) == 1 and "not intact" in warnings[0] and why in warnings[0], warnings
    assert verify_entry(d) is None and json.loads((d / "meta.json").read_text())["accuracy"] == 0.46


def test_cache_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    StageCache().get("export", ["a"], _build([]))
    bad = StageCache().get("quantize", ["b"], _build([]))
    (bad / "meta.json").write_text('{"accuracy": 1.0}')
    (tmp_path / "cache" / "notes.txt").write_text("not an entry")
    r = CliRunner().invoke(cli, ["cache", "ls"])
    assert r.exit_code == 0 and "export" in r.output and "quantize" in r.output and "2 entries" in r.output, r.output
    r = CliRunner().invoke(cli, ["cache", "verify"])
    assert r.exit_code == 1 and "ok" in r.output and "meta.json" in r.output, r.output
    r = CliRunner().invoke(cli, ["cache", "clear", "--stage", "quantize"])
    assert r.exit_code == 0 and "removed 1 entries" in r.output and not bad.exists()
    assert CliRunner().invoke(cli, ["cache", "verify"]).exit_code == 0
    r = CliRunner().invoke(cli, ["cache", "clear"])
    assert r.exit_code == 0 and "removed 1 entries" in r.output
    assert (tmp_path / "cache" / "notes.txt").exists(), "clear removes only cache entries"
