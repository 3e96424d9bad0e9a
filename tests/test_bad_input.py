"""Bad input at every trust boundary of the CLI (issue "Trust boundaries", items 1, 2, 4 and 6), as one table.

Each case builds its inputs in a fresh directory (the working directory and the stage cache live
there too), runs one command, and asserts: exit code 2, one line on stderr that names the problem,
no traceback, and nothing on disk changed (the output path included: every case is refused
before any work). Bundle cases also run through ``Engine.from_bundle``. Tests that need a real
process (SIGTERM, a file-size limit standing in for a full disk, stale staging dirs of killed
runs) and the accepted counterparts (``--force``, replacing edgekit's own output) follow the table.
"""

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edgekit.bundle import baseline_digest, sha256
from edgekit.checkpoint import reference_model_dir, save
from edgekit.cli import cli
from edgekit.errors import EdgekitError

from .conftest import tiny_model
from .test_runtime_engine import build_tiny_bundle

RECIPE = """
[target]
name = "tiny"
threads = 1
[goals]
accuracy_drop = 0.99
latency_prefill_p95_ms = {prefill}
latency_decode_p95_ms = 1000.0
size_ratio = 0.9
prefill_tokens = 16
[validate]
warmup = 1
runs = 2
decode_tokens = 4
eval_max_tokens = 600
seq_len = {seq_len}
[prune]
experts = 0.25
layers = {layers}
calib_seq_len = 64
[quantize]
calib_max_tokens = 512
seq_len = 64
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save(tiny_model(vocab_size=4096, max_position_embeddings=128),
                tmp_path_factory.mktemp("bad-ck") / "tiny", tokenizer_from=reference_model_dir())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    b = build_tiny_bundle(tmp_path_factory.mktemp("bad-bundle") / "bundle")
    baseline = {"accuracy": 0.5, "onnx_bytes": (b / "model.onnx").stat().st_size}
    (b / "report.json").write_text(json.dumps({"target": "tiny", "baseline": baseline}))
    m = json.loads((b / "manifest.json").read_text())
    m["baseline_sha256"] = baseline_digest(baseline)
    (b / "manifest.json").write_text(json.dumps(m))
    return b


# -- case builders: each takes the case dir ``t`` and returns a path (str) --------------------------
def ck(t, ckpt):
    return str(shutil.copytree(ckpt, t / "ck"))


def config(t, ckpt, **changes):
    d = Path(ck(t, ckpt))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def foreign(t):
    (t / "proj" / "src").mkdir(parents=True)
    (t / "proj" / "README.txt").write_text("my notes\n")
    return str(t / "proj")


def a_file(t):
    (t / "notes.txt").write_text("keep me\n")
    return str(t / "notes.txt")


def recipe(t, prefill="1000.0", layers=0, seq_len=64):
    (t / "r.toml").write_text(RECIPE.format(prefill=prefill, layers=layers, seq_len=seq_len))
    return str(t / "r.toml")


def short_text(t):
    (t / "short.txt").write_text("ab")
    return str(t / "short.txt")


def sharded(t, ckpt, shard_name, place):
    """Checkpoint whose index names ``shard_name``; the real weights are put at ``place`` (outside)."""
    d = Path(ck(t, ckpt))
    keys = list(load_file(d / "model.safetensors"))
    target = place(t)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(d / "model.safetensors", target)       # the weights exist where the index points
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard_name for k in keys}}))
    return str(d)


def symlinked_shard(t, ckpt):
    d = Path(ck(t, ckpt))
    keys = list(load_file(d / "model.safetensors"))
    (t / "elsewhere").mkdir()
    shutil.move(d / "model.safetensors", t / "elsewhere" / "w.safetensors")
    (d / "model-00001-of-00001.safetensors").symlink_to(t / "elsewhere" / "w.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    return str(d)


def more_layers_in_weights(t, ckpt):
    d = Path(ck(t, ckpt))
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2          # the weights hold 3 layers
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def export_dir(t, bundle, spec_edit):
    d = shutil.copytree(bundle, t / "onnx")
    (d / "manifest.json").unlink()        # an `edgekit export` dir, not a bundle
    f = d / "export.json"
    if isinstance(spec_edit, str):
        f.write_text(spec_edit)
    else:
        spec = json.loads(f.read_text())
        spec_edit(spec)
        f.write_text(json.dumps(spec))
    return str(d)


def weights(t, ckpt, how):
    d = Path(ck(t, ckpt))
    f = d / "model.safetensors"
    if how == "missing":
        f.unlink()
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "pickle":
        f.unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")        # a pickle: never loaded
    elif how == "nan":
        sd = load_file(f)
        sd["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("nan")
        save_file(sd, f)
    return str(d)


def text(t, data: bytes, name: str = "text.txt"):
    (t / name).write_bytes(data)
    return str(t / name)


def corrupt_tokenizer(t, ckpt):
    d = Path(ck(t, ckpt))
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1, 2')
    return str(d)


# -- bundle tampering -----------------------------------------------------------------------------
def tampered(t, bundle, how):
    b = shutil.copytree(bundle, t / "bd", symlinks=True)
    mf = b / "manifest.json"
    m = json.loads(mf.read_text())
    entry = {"sha256": "0" * 64, "bytes": 1}
    if how == "dotdot":
        m["files"]["../../../../etc/passwd"] = entry
    elif how == "absolute":
        m["files"]["/etc/shadow"] = entry
    elif how == "/dev/zero":
        m["files"]["/dev/zero"] = entry
    elif how == "symlink out":
        (b / "extra.txt").symlink_to("/etc/hostname")
        m["files"]["extra.txt"] = entry
    elif how == "symlink to /dev/zero":
        (b / "zero.bin").symlink_to("/dev/zero")
        m["files"]["zero.bin"] = entry
    elif how == "fifo":
        os.mkfifo(b / "pipe")
        m["files"]["pipe"] = entry
    elif how == "no files":
        m["files"] = {}
    elif how == "files is a list":
        m["files"] = []
    elif how == "entry without hash":
        m["files"]["model.onnx"] = {"bytes": 5}
    elif how == "unlisted tokenizer":
        del m["files"]["tokenizer.json"]
    elif how == "unlisted graph":
        del m["files"]["model.onnx"]
    elif how == "wrong format":
        m["format"] = "something-else/9"
    elif how == "model tampered":
        data = bytearray((b / "model.onnx").read_bytes())
        mid = len(data) // 2
        data[mid: mid + 64] = bytes(64)                       # same size: only the hash can tell
        (b / "model.onnx").write_bytes(bytes(data))
    elif how == "model truncated":
        (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:1000])
    elif how == "baseline edited":
        r = json.loads((b / "report.json").read_text())
        r["baseline"]["accuracy"] = 0.0
        (b / "report.json").write_text(json.dumps(r))
    elif how == "tokenizer corrupt (rehashed)":
        (b / "tokenizer.json").write_text("{not a tokenizer")
        m["files"]["tokenizer.json"] = {"sha256": sha256(b / "tokenizer.json"),
                                        "bytes": (b / "tokenizer.json").stat().st_size}
    if how == "manifest not JSON":
        mf.write_text("{")
    elif how == "manifest is a list":
        mf.write_text("[]")
    else:
        mf.write_text(json.dumps(m))
    return str(b)


BUNDLE_CASES = [
    ("dotdot", "not a plain relative path"), ("absolute", "not a plain relative path"),
    ("/dev/zero", "not a plain relative path"),
    ("symlink out", "points outside"), ("symlink to /dev/zero", "points outside"), ("fifo", "not a regular file"),
    ("no files", "lists no files"), ("files is a list", "'files'"), ("entry without hash", "needs sha256"),
    ("unlisted tokenizer", "does not list tokenizer.json"), ("unlisted graph", "does not list model.onnx"),
    ("wrong format", "format"),
    ("model tampered", "does not match its manifest hash"), ("model truncated", "bytes, the manifest says"),
    ("baseline edited", "baseline does not match"), ("tokenizer corrupt (rehashed)", "not a valid tokenizer"),
    ("manifest not JSON", "not valid JSON"), ("manifest is a list", "not a JSON object"),
]

# (id, args builder (t, ckpt, bundle) -> argv, words the one-line message contains)
CASES = [
    # item 1: -o never deletes what edgekit did not write; checked before any work
    ("export -o foreign dir", lambda t, c, b: ["export", ck(t, c), "-o", foreign(t)], "not written by edgekit"),
    ("export -o foreign/.", lambda t, c, b: ["export", ck(t, c), "-o", foreign(t) + "/."], "not written by edgekit"),
    ("compress -o foreign dir", lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t), "-o", foreign(t)],
     "not written by edgekit"),
    ("prune -o foreign dir", lambda t, c, b: ["prune", ck(t, c), "--experts", "0.25", "-o", foreign(t)],
     "not written by edgekit"),
    ("quantize -o foreign dir", lambda t, c, b: ["quantize", ck(t, c), "-o", foreign(t)], "not written by edgekit"),
    ("export -o a file", lambda t, c, b: ["export", ck(t, c), "-o", a_file(t)], "is a file"),
    ("export -o a file --force", lambda t, c, b: ["export", ck(t, c), "-o", a_file(t), "--force"], "is a file"),
    ("compress -o a file", lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t), "-o", a_file(t)],
     "is a file"),
    ("export -o under a file", lambda t, c, b: ["export", ck(t, c), "-o", a_file(t) + "/out"], "is a file"),
    ("compress -o under a file", lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t),
                                                  "-o", a_file(t) + "/out"], "is a file"),
    ("export -o the input --force", lambda t, c, b: ["export", ck(t, c), "-o", str(t / "ck"), "--force"],
     "holds the input"),
    ("prune -o the input's parent --force", lambda t, c, b: ["prune", str(shutil.copytree(c, t / "models" / "ck")),
                                                             "-o", str(t / "models"), "--force"], "holds the input"),
    ("export -o . --force", lambda t, c, b: ["export", ck(t, c), "-o", ".", "--force"], "current directory"),
    ("export -o a symlink", lambda t, c, b: ["export", ck(t, c), "-o", str(_link(t))], "symbolic link"),
    ("validate --report-dir a file", lambda t, c, b: ["validate", b, "--report-dir", a_file(t)], "is a file"),
    # item 6: config.json, tokenizer, data, options, recipes, shards
    ("config.json is []", lambda t, c, b: ["info", _raw_config(t, c, "[]")], "not an object"),
    ("hidden_size is a string", lambda t, c, b: ["info", config(t, c, hidden_size="256")], "wrong type"),
    ("num_hidden_layers is true", lambda t, c, b: ["info", config(t, c, num_hidden_layers=True)], "wrong type"),
    ("rms_norm_eps is NaN", lambda t, c, b: ["info", _raw_config(t, c, None, rms_norm_eps="NaN")], "finite"),
    ("hidden_size is negative", lambda t, c, b: ["info", config(t, c, hidden_size=-4)], ">= 1"),
    ("intermediate_size 4e8 vs the weights", lambda t, c, b: ["info", config(t, c, intermediate_size=400_000_000)],
     "config.json implies"),
    ("max_position_embeddings 4e12", lambda t, c, b: ["info", config(t, c, max_position_embeddings=4 * 10**12)],
     "position tables"),
    ("fewer layers in config than weights", lambda t, c, b: ["info", more_layers_in_weights(t, c)],
     "num_hidden_layers=3"),
    ("no weights", lambda t, c, b: ["eval", weights(t, c, "missing")], "model.safetensors"),
    ("truncated safetensors", lambda t, c, b: ["eval", weights(t, c, "truncated")], "corrupt or truncated"),
    ("pickle weights only", lambda t, c, b: ["eval", weights(t, c, "pickle")], "never unpickles"),
    ("NaN weights", lambda t, c, b: ["eval", weights(t, c, "nan")], "NaN"),
    ("empty eval text", lambda t, c, b: ["eval", ck(t, c), "--data", text(t, b"")], "empty"),
    ("damaged .gz eval text", lambda t, c, b: ["eval", ck(t, c), "--data", text(t, b"\x1f\x8b\x08" + b"x" * 40,
                                                                                 "text.txt.gz")], "gzip"),
    ("non-UTF-8 eval text", lambda t, c, b: ["eval", ck(t, c), "--data", text(t, b"caf\xe9 \xff\xfe" * 50)],
     "UTF-8"),
    ("recipe with an unknown key", lambda t, c, b: ["compress", ck(t, c), "--target", _bad_key_recipe(t),
                                                    "-o", str(t / "out")], "unknown key target.thread"),
    ("unknown target", lambda t, c, b: ["compress", ck(t, c), "--target", "cpu5", "-o", str(t / "out")],
     "unknown target 'cpu5'"),
    ("corrupt tokenizer.json (eval)", lambda t, c, b: ["eval", corrupt_tokenizer(t, c)], "not a valid tokenizer"),
    ("corrupt tokenizer.json (compress)", lambda t, c, b: ["compress", corrupt_tokenizer(t, c), "--target",
                                                           recipe(t), "-o", str(t / "out")], "not a valid tokenizer"),
    ("eval --seq-len 0", lambda t, c, b: ["eval", ck(t, c), "--seq-len", "0"], "--seq-len"),
    ("eval --seq-len -5", lambda t, c, b: ["eval", ck(t, c), "--seq-len", "-5"], "--seq-len"),
    ("eval --seq-len over the model's positions", lambda t, c, b: ["eval", ck(t, c), "--seq-len", "512"],
     "--seq-len 512 is over the model's 128 positions"),
    ("eval an export with --seq-len over its positions", lambda t, c, b: ["eval", b, "--seq-len", "4096"],
     "pass --seq-len"),
    ("recipe [validate] seq_len over the model's positions",
     lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t, seq_len=512), "-o", str(t / "out")],
     "[validate] seq_len = 512 is over the model's 128 positions"),
    ("eval --max-tokens -5", lambda t, c, b: ["eval", ck(t, c), "--max-tokens", "-5"], "--max-tokens"),
    ("eval --threads 0", lambda t, c, b: ["eval", b, "--threads", "0"], "--threads"),
    ("corrupt export.json", lambda t, c, b: ["eval", export_dir(t, b, "{")], "not valid JSON"),
    ("export.json graph outside", lambda t, c, b: ["eval", export_dir(t, b, lambda s: s.update(graph="../x.onnx"))],
     "not a plain relative path"),
    ("export.json without num_layers", lambda t, c, b: ["eval", export_dir(t, b, lambda s: s.pop("num_layers"))],
     "num_layers"),
    ("shard path with ..", lambda t, c, b: ["info", sharded(t, c, "../outside/w.safetensors",
                                                            lambda t: t / "outside" / "w.safetensors")],
     "not a plain relative path"),
    ("shard path absolute", lambda t, c, b: ["info", sharded(t, c, str(t / "abs" / "w.safetensors"),
                                                             lambda t: t / "abs" / "w.safetensors")],
     "not a plain relative path"),
    ("shard symlinked outside", lambda t, c, b: ["info", symlinked_shard(t, c)], "points outside"),
    ("NaN latency budget in a recipe", lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t, prefill="nan"),
                                                        "-o", str(t / "out")], "finite"),
    ("inf latency budget in a recipe", lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t, prefill="inf"),
                                                        "-o", str(t / "out")], "finite"),
    ("quantize --max-drop nan", lambda t, c, b: ["quantize", ck(t, c), "--max-drop", "nan", "-o", str(t / "q")],
     "finite"),
    ("prune --experts nan", lambda t, c, b: ["prune", ck(t, c), "--experts", "nan", "-o", str(t / "p")], "experts"),
    ("2-token calibration (compress)", lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t), "--calib",
                                                        short_text(t), "-o", str(t / "out")], "calibration text"),
    ("2-token calibration (prune)", lambda t, c, b: ["prune", ck(t, c), "--experts", "0.25", "--calib",
                                                     short_text(t), "-o", str(t / "p")], "calibration text"),
    ("prune --layers 6 of 3", lambda t, c, b: ["prune", ck(t, c), "--layers", "6", "-o", str(t / "p")],
     "cannot remove 6 of 3 layers"),
    ("prune --layers -1", lambda t, c, b: ["prune", ck(t, c), "--layers", "-1", "-o", str(t / "p")], "--layers"),
    ("compress recipe removing 6 of 3 layers", lambda t, c, b: ["compress", ck(t, c), "--target", recipe(t, layers=6),
                                                                "-o", str(t / "out")], "cannot remove 6 of 3 layers"),
    ("unknown command", lambda t, c, b: ["frobnicate"], "No such command"),
]


def _bad_key_recipe(t):
    (t / "bad.toml").write_text('[target]\nname = "x"\nthread = 4\n')
    return str(t / "bad.toml")


def _link(t):
    (t / "real").mkdir()
    (t / "link").symlink_to(t / "real")
    return t / "link"


def _raw_config(t, ckpt, text, **raw):
    d = Path(ck(t, ckpt))
    if text is None:   # splice raw JSON values (NaN is not JSON, but Python's json reads it)
        cfg = json.loads((d / "config.json").read_text())
        body = json.dumps(cfg)[:-1] + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}"
        (d / "config.json").write_text(body)
    else:
        (d / "config.json").write_text(text)
    return str(d)


def snapshot(root: Path) -> dict:
    """Every entry under root: type and mode; files also size, mtime and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = os.lstat(p)
            key = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                out[key] = (st.st_mode, st.st_size, st.st_mtime_ns, sha256(p))
            else:
                out[key] = (st.st_mode, os.readlink(p) if p.is_symlink() else None)
    return out


def _invoke(args, cwd: Path, monkeypatch):
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("EDGEKIT_CACHE", str(cwd / "cache"))
    return CliRunner().invoke(cli, args)


def _assert_one_line_exit_2(r, words):
    err = r.stderr.strip()
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and len(err.splitlines()) == 1, r.output
    assert words in err, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input(case, ckpt, bundle, tmp_path, monkeypatch):
    name, build, words = case
    t = tmp_path / "case"
    t.mkdir()
    args = build(t, ckpt, str(bundle))
    before = snapshot(t)
    import edgekit.pipeline
    import edgekit.prune

    def no_work(*a, **k):
        raise AssertionError("bad input must be refused before any work starts")
    monkeypatch.setattr(edgekit.prune, "collect_stats", no_work)
    monkeypatch.setattr(edgekit.pipeline, "baseline_for", no_work)
    r = _invoke(args, t, monkeypatch)
    _assert_one_line_exit_2(r, words)
    assert snapshot(t) == before, "a refused command changed files"


@pytest.mark.parametrize("how, words", BUNDLE_CASES, ids=[c[0] for c in BUNDLE_CASES])
def test_tampered_bundles_are_refused_everywhere(how, words, bundle, tmp_path, monkeypatch):
    from edgekit.runtime import Engine

    t = tmp_path / "case"
    t.mkdir()
    b = tampered(t, bundle, how)
    before = snapshot(t)
    for cmd in (["eval", b], ["validate", b]):
        _assert_one_line_exit_2(_invoke(cmd, t, monkeypatch), words)
    with pytest.raises(EdgekitError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        Engine.from_bundle(b)
    assert "\n" not in str(e.value)
    assert snapshot(t) == before


@pytest.mark.parametrize("how, words", [("model tampered", "manifest hash"),
                                        ("tokenizer corrupt (rehashed)", "not a valid tokenizer"),
                                        ("baseline edited", "baseline does not match")])
def test_server_refuses_a_tampered_bundle_with_one_line(how, words, bundle, tmp_path):
    b = tampered(tmp_path, bundle, how)
    app = Path(__file__).resolve().parents[1] / "sample_apps" / "server" / "app.py"
    p = subprocess.run([sys.executable, str(app), "--bundle", b, "--port", "0"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr


# -- accepted counterparts -----------------------------------------------------------------------
def test_force_replaces_a_foreign_dir_and_edgekit_output_is_replaced_without_it(ckpt, tmp_path, monkeypatch):
    proj = foreign(tmp_path)
    r = _invoke(["export", str(ckpt), "-o", proj, "--force", "--no-verify"], tmp_path, monkeypatch)
    assert r.exit_code == 0, r.output
    assert not (Path(proj) / "README.txt").exists() and (Path(proj) / "model.onnx").exists()
    r = _invoke(["export", str(ckpt), "-o", proj, "--no-verify"], tmp_path, monkeypatch)
    assert r.exit_code == 0, r.output          # now edgekit's own output: replaced without --force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"], "no staging dirs may be left"


def _can_make_readonly(d: Path) -> str | None:
    """Make ``d`` unwritable (chmod, else chattr +i as root); returns how, or None when impossible."""
    d.chmod(0o555)
    try:
        (d / ".probe").mkdir()
    except OSError:
        return "chmod"
    (d / ".probe").rmdir()
    d.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        try:
            (d / ".probe").mkdir()
        except OSError:
            return "chattr"
        (d / ".probe").rmdir()
        subprocess.run(["chattr", "-i", str(d)])
    return None


def test_read_only_output_parent_is_refused_before_work(ckpt, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    how = _can_make_readonly(ro)
    if how is None:
        pytest.skip("cannot make a read-only directory here (root without chattr)")
    try:
        import edgekit.pipeline
        monkeypatch.setattr(edgekit.pipeline, "baseline_for", lambda *a, **k: pytest.fail("work started"))
        r = _invoke(["compress", str(ckpt), "--target", recipe(tmp_path), "-o", str(ro / "out")], tmp_path,
                    monkeypatch)
        _assert_one_line_exit_2(r, "not writable")
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", str(ro)])
        ro.chmod(0o755)


def test_full_disk_is_one_line_and_leaves_no_staging_dir(ckpt, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes writes fail like a full disk would."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", "export", str(ckpt), "-o", "out", "--no-verify"],
                       cwd=tmp_path, capture_output=True, text=True, preexec_fn=limit, timeout=300,
                       env={**os.environ, "EDGEKIT_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "too large" in p.stderr.lower(), p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == [], "nothing may be left behind"


def test_sigterm_mid_export_leaves_no_staging_dir(ckpt, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "export", str(ckpt), "-o", "out"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.tmp-*")), "the export never started staging"
    time.sleep(0.5)                              # mid-export
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode != 0 and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_staging_and_scratch_dirs_of_killed_runs_are_swept(ckpt, tmp_path, monkeypatch):
    from edgekit.atomic import _host, scratch_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                  # a pid that no longer runs
    stale = tmp_path / f".out.tmp-{_host()}-{dead.pid}-abc123"
    (stale / "half").mkdir(parents=True)
    other_host = tmp_path / f".out.tmp-0000beef-{dead.pid}-abc123"   # another machine's: left alone
    other_host.mkdir()
    live = tmp_path / f".out.tmp-{_host()}-{os.getpid()}-abc123"      # a running process's: left alone
    live.mkdir()
    r = _invoke(["export", str(ckpt), "-o", "out", "--no-verify"], tmp_path, monkeypatch)
    assert r.exit_code == 0, r.output
    assert not stale.exists() and other_host.exists() and live.exists()
    nocache = tmp_path / "tmp" / f"edgekit-nocache-{_host()}-{dead.pid}-xyz"
    nocache.mkdir(parents=True)
    fresh = scratch_dir("edgekit-nocache-", tmp_path / "tmp")
    assert not nocache.exists() and fresh.exists()


def test_an_interrupted_swap_restores_the_previous_output(ckpt, tmp_path, monkeypatch):
    """kill -9 between the two renames of a replacement leaves .NAME.old and no NAME: the next run puts it back."""
    r = _invoke(["export", str(ckpt), "-o", "out", "--no-verify"], tmp_path, monkeypatch)
    assert r.exit_code == 0
    os.replace(tmp_path / "out", tmp_path / ".out.old")
    from edgekit.atomic import staging_dir
    tmp = staging_dir(tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").exists() and not (tmp_path / ".out.old").exists()
    shutil.rmtree(tmp)


def test_a_sigterm_during_cleanup_waits_until_the_staging_dir_is_gone(tmp_path, monkeypatch):
    """torchrun follows a dead rank with SIGTERM to the others: when that lands while a failed write's
    staging dir is being removed, the removal still finishes, and then the signal's handler runs."""
    from edgekit import atomic

    d = tmp_path / ".out.tmp-x"
    d.mkdir()
    for name in "abc":
        (d / name).write_text(name)
    real = shutil.rmtree

    def rmtree(p, ignore_errors=False):
        os.kill(os.getpid(), signal.SIGTERM)    # arrives mid-removal
        (Path(p) / "a").unlink()
        real(p, ignore_errors=ignore_errors)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    prev = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(SystemExit):
            atomic.discard(d)
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, prev)
    assert not d.exists(), sorted(p.name for p in d.iterdir())
