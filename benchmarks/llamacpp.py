"""llama.cpp as its users run it: built offline from a pinned source with cmake + ninja, a checkpoint
converted to Q8_0 with llama.cpp's own converter, timed by ``llama-bench`` and served by ``llama-server``.

What:
- ``ensure_source(home)``: the llama.cpp tree in ``home/src/llama.cpp-<commit>``, extracted from (first
  found) ``home/pack/<PACKED>`` (the trimmed tarball ``pack`` writes, for offline hosts) or the pinned
  llama-cpp-python sdist in ``home/sdist`` (``pip download`` of it when absent; it vendors llama.cpp's
  whole source incl. ``convert_hf_to_gguf.py`` and ``gguf-py``). Both are checked against sha256s.
- ``ensure_built(home)``: ``cmake -G Ninja`` (``CMAKE_OPTIONS``) + ``ninja TARGETS`` into ``home/build``,
  once; ``home/build/edgekit-build.json`` records version, commit, options and build time.
- ``convert(ckpt, gguf, src)``: HF checkpoint -> GGUF with the vendored converter (``convert_args``).
- ``bench(gguf, bindir, threads)``: ``llama-bench -p 128 -n 32 -d 0,128,1024 -t T -o json`` with flash
  attention left at llama.cpp's default (``auto``: on where the backend supports it; the log line that
  says what auto resolved to is kept), parsed by ``parse_bench``; peak RSS of the llama-bench process.
- ``server_command`` / ``start_server``: ``llama-server`` on loopback with ``--parallel N`` slots and
  continuous batching, for ``benchmarks/load_test.py``.
- ``python -m benchmarks.llamacpp pack``: ``home/pack`` = one trimmed source tarball (< 20 MB) that an
  offline host with cmake, ninja and a C++ compiler builds from (carry that folder).

Routing: edgekit's checkpoints write ``scoring_func`` (sigmoid), ``topk_method`` (noaux_tc: the
``e_score_correction_bias`` picks experts), ``n_group``/``topk_group``, ``norm_topk_prob`` and
``routed_scaling_factor`` into config.json; the converter maps them to ``expert_gating_func``,
``exp_probs_b``, the expert-group counts, ``expert_weights_norm`` and ``expert_weights_scale``, so
llama.cpp routes as edgekit's model does. ``check_routing_config`` refuses a config lacking them, or
one with per-layer overrides (non-uniform pruning), which a GGUF cannot express.

Tokenizer workaround (the smallest honest one): the converter identifies BPE pre-tokenizers by the
sha256 of the token ids of a probe string and refuses unknown hashes. Our tokenizer.json uses the
plain GPT-2 byte-level pre-tokenizer (``ByteLevel``, ``use_regex=True``, no normalizer), which is
llama.cpp's ``"gpt-2"`` pre-type. At conversion time only (in a subprocess, nothing vendored is
patched) we wrap ``TextModel.get_vocab_base_pre``: if the original raises "not recognized" AND the
tokenizer.json's pre-tokenizer is exactly that GPT-2 one, return ``"gpt-2"``; otherwise re-raise.

Invariants: everything lives under ``home`` (default ``benchmarks/.llama``, git-ignored); outputs appear
complete or not at all (temp name + rename); nothing vendored is edited.

Failure modes: a wrong sha256, a failed download, configure, build, conversion or bench raises
``LlamaCppError`` with the log's tail; run.py marks the row failed and goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from edgekit.bundle import sha256  # one streamed file hash for the project

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "benchmarks" / ".llama"

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_TREE = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp"   # llama.cpp inside the sdist
LLAMA_COMMIT = "0c1e57098"    # ggml-org/llama.cpp commit the sdist vendors (its CHANGELOG says so)
TREE = f"llama.cpp-{LLAMA_COMMIT}"
PACKED = f"{TREE}.tar.xz"
# Parts of the tree neither the CPU build nor the converter reads (vocab test files, docs, images,
# examples (LLAMA_BUILD_EXAMPLES=OFF), GPU/NPU backends, the web UI's tests): the pack must travel
# beside the repository within the device machine's 64 MiB transfer.
TRIM = (".git", "models", "docs", "media", ".github", ".devops", "examples", "tools/ui/tests",
        *(f"ggml/src/ggml-{b}" for b in ("cuda", "vulkan", "metal", "sycl", "opencl", "hexagon", "cann", "et",
                                          "webgpu", "openvino", "virtgpu", "musa", "hip", "zdnn", "zendnn")))

TARGETS = ("llama-bench", "llama-server", "llama-quantize", "llama-cli")
CMAKE_OPTIONS = (
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",              # -march=native: the ISA of the host that runs the numbers
    "-DBUILD_SHARED_LIBS=OFF",       # self-contained binaries
    "-DLLAMA_OPENSSL=OFF",           # HTTPS client for model downloads (this version's LLAMA_CURL); not needed
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",   # else the server build downloads its web UI
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_COMMIT}",  # no .git in the sdist: stamp the commit into build info
)
ROUTING_KEYS = ("scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
BENCH_PROMPT, BENCH_GEN, BENCH_DEPTHS = 128, 32, (0, 128, 1024)


class LlamaCppError(RuntimeError):
    pass


def _run(cmd: list[str], log: Path, **kw) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
    if rc:
        raise LlamaCppError(f"{' '.join(map(str, cmd[:4]))}... failed (rc {rc}); log {log}:\n{log.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------
# Source and build
# ---------------------------------------------------------------------------------------------
def _sdist(home: Path, log=print) -> Path:
    """The pinned sdist, downloaded with pip once; its sha256 is checked every time."""
    p = home / "sdist" / SDIST_NAME
    if not p.exists():
        log(f"downloading the {SDIST_PACKAGE} {SDIST_VERSION} sdist (~77 MB, vendors llama.cpp {LLAMA_COMMIT}) ...")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"{SDIST_PACKAGE}=={SDIST_VERSION}", "-d", home / "sdist"], home / "download.log")
    got = sha256(p)
    if got != SDIST_SHA256:
        raise LlamaCppError(f"{p}: sha256 {got}, expected {SDIST_SHA256}; delete it and run again")
    return p


def _extract(tarball: Path, prefix: str, dest: Path) -> None:
    """Members of ``tarball`` under ``prefix/`` into ``dest`` (prefix stripped), atomically."""
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tarball) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix + "/"):
                m.name = m.name[len(prefix) + 1:]
                if m.name != ".git" and not m.name.startswith(".git/"):  # the sdist's submodule pointer: its
                    members.append(m)                                     # index would become a build input
        if not members:
            raise LlamaCppError(f"{tarball} has no {prefix}/")
        tf.extractall(tmp, members=members, filter="data")
    os.replace(tmp, dest)


def ensure_source(home: Path = HOME, log=print) -> Path:
    """The llama.cpp source tree (see the module doc for where it comes from)."""
    src = home / "src" / TREE
    if (src / "CMakeLists.txt").exists():
        return src
    packed = home / "pack" / PACKED
    if packed.exists():
        want = json.loads((home / "pack" / "pack.json").read_text())["sha256"]
        if sha256(packed) != want:
            raise LlamaCppError(f"{packed}: sha256 differs from pack.json; rebuild it with `python -m "
                                "benchmarks.llamacpp pack`")
        log(f"extracting {packed.name}")
        _extract(packed, TREE, src)
    else:
        _extract(_sdist(home, log), SDIST_TREE, src)
    return src


def ensure_built(home: Path = HOME, jobs: int | None = None, log=print) -> dict:
    """Configure + build TARGETS once (ninja is incremental: a finished build returns at once).
    Returns {src, bin, version, commit, build_s, cmake_options}."""
    src = ensure_source(home, log)
    build = home / "build"
    info_file = build / "edgekit-build.json"
    bindir = build / "bin"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    done = info.get("cmake_options") == list(CMAKE_OPTIONS) and all((bindir / t).exists() for t in TARGETS)
    if not done:
        t0 = time.perf_counter()
        if _cached_source(build) not in (None, src.resolve()):   # configured from another tree
            shutil.rmtree(build)
        if not (build / "build.ninja").exists() or info.get("cmake_options") != list(CMAKE_OPTIONS):
            log(f"configuring llama.cpp {LLAMA_COMMIT}: cmake {' '.join(CMAKE_OPTIONS)}")
            _run(["cmake", "-S", src, "-B", build, *CMAKE_OPTIONS], home / "configure.log")
        j = jobs or os.cpu_count() or 2
        log(f"building {', '.join(TARGETS)} with ninja -j{j} (minutes) ...")
        _run(["ninja", "-C", build, f"-j{j}", *TARGETS], home / "build.log")
        info = {"version": SDIST_VERSION, "commit": LLAMA_COMMIT, "cmake_options": list(CMAKE_OPTIONS),
                "build_s": round(time.perf_counter() - t0, 1) + info.get("build_s", 0), "jobs": j}
        info_file.write_text(json.dumps(info, indent=1))
    return {"src": str(src), "bin": str(bindir), "version": f"llama.cpp {LLAMA_COMMIT} (from {SDIST_PACKAGE} "
            f"{SDIST_VERSION})", "commit": LLAMA_COMMIT, "build_s": info.get("build_s"),
            "cmake_options": info["cmake_options"]}


def _cached_source(build: Path) -> Path | None:
    cache = build / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
            return Path(line.split("=", 1)[1]).resolve()
    return None


def built(home: Path = HOME) -> dict | None:
    """ensure_built's answer when the build is already there, else None (no building)."""
    if all((home / "build" / "bin" / t).exists() for t in TARGETS) and (home / "build" / "edgekit-build.json").exists():
        return ensure_built(home)
    return None


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
# Runs inside a subprocess: cwd = the llama.cpp tree; argv = the converter's own arguments.
_CONVERT_DRIVER = r'''
import json, sys
from pathlib import Path
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
sys.path.insert(0, ".")
import convert_hf_to_gguf as conv
from conversion.base import TextModel

_orig = TextModel.get_vocab_base_pre

def _is_gpt2_bytelevel(d):
    t = json.loads((Path(d) / "tokenizer.json").read_text())
    pre = t.get("pre_tokenizer") or {}
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and t.get("normalizer") is None and t["model"]["type"] == "BPE")

def get_vocab_base_pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        if _is_gpt2_bytelevel(self.dir_model):
            print("edgekit-bench: unknown BPE hash; tokenizer.json is GPT-2 byte-level -> pre-type 'gpt-2'")
            return "gpt-2"
        raise

TextModel.get_vocab_base_pre = get_vocab_base_pre
conv.main()
'''


def check_routing_config(cfg: dict) -> None:
    """A DeepSeek-V3 config.json must spell out its routing, else llama.cpp falls back to other defaults."""
    missing = [k for k in ROUTING_KEYS if k not in cfg]
    if missing:
        raise LlamaCppError(f"config.json lacks {', '.join(missing)}: llama.cpp would route differently; "
                            "write the checkpoint with edgekit (checkpoint.save / edgekit synth)")
    if cfg.get("layer_overrides"):
        raise LlamaCppError("config.json has per-layer overrides (layer_overrides, from non-uniform pruning); a "
                            "GGUF holds one value per model: convert a checkpoint pruned uniformly")


def convert_args(ckpt: Path, out: Path, outtype: str = "q8_0") -> list[str]:
    """The converter's arguments (the driver puts them in sys.argv)."""
    return [str(Path(ckpt).resolve()), "--outfile", str(Path(out).resolve()), "--outtype", outtype]


def convert_env(src: Path, environ: dict | None = None) -> dict:
    """The converter imports ``gguf`` from the tree's gguf-py (PYTHONPATH first), never an installed one."""
    env = dict(os.environ if environ is None else environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(src) / "gguf-py"), env.get("PYTHONPATH")) if p)
    return env


def convert(ckpt: Path, out: Path, src: Path, outtype: str = "q8_0") -> Path:
    """HF checkpoint dir -> GGUF (``outtype`` q8_0 by default) with the vendored converter; reused if present."""
    out = Path(out)
    if out.exists():
        return out
    check_routing_config(json.loads((Path(ckpt) / "config.json").read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    _run([sys.executable, "-c", _CONVERT_DRIVER, *convert_args(ckpt, tmp, outtype)],
         out.with_suffix(".convert.log"), cwd=src, env=convert_env(src))
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# llama-bench
# ---------------------------------------------------------------------------------------------
def bench_command(bindir: Path, gguf: Path, threads: int, reps: int = 5) -> list[str]:
    """llama-bench as the issue runs it (flash attention not set: llama.cpp's default, auto)."""
    return [str(Path(bindir) / "llama-bench"), "-m", str(gguf), "-p", str(BENCH_PROMPT), "-n", str(BENCH_GEN),
            "-d", ",".join(map(str, BENCH_DEPTHS)), "-t", str(threads), "-r", str(reps), "-o", "json", "-v"]


def flash_attn_resolved(log_text: str) -> str | None:
    """What llama.cpp's ``auto`` flash attention resolved to, from its verbose log (None if not logged)."""
    states = set()
    for line in log_text.splitlines():
        if "Flash Attention" in line:
            states.add("on" if "enabled" in line else "off" if "not supported" in line or "disabled" in line else "?")
    return "/".join(sorted(states)) or None


def parse_bench(text: str) -> dict:
    """llama-bench ``-o json`` -> prefill p50/p95 ms (n_prompt tokens at depth 0), decode ms/token at
    each depth (mean over the reps of n_gen tokens), and what the build/run says about itself."""
    import numpy as np

    tests = json.loads(text)
    if not isinstance(tests, list) or not tests:
        raise LlamaCppError("llama-bench printed no tests")
    out: dict = {}
    for t in tests:
        ms = np.asarray(t["samples_ns"], dtype=np.float64) / 1e6
        if t["n_prompt"] and not t["n_gen"] and t["n_depth"] == 0:
            out["prefill_tokens"] = t["n_prompt"]
            out["prefill_p50_ms"] = float(np.percentile(ms, 50))
            out["prefill_p95_ms"] = float(np.percentile(ms, 95))
            out["prefill_samples"] = len(ms)
        elif t["n_gen"] and not t["n_prompt"]:
            out[f"decode_ms_ctx{t['n_depth']}"] = float(ms.mean() / t["n_gen"])
            out["decode_samples"] = len(ms)
    first = tests[0]
    out.update(build_commit=first.get("build_commit"), n_threads=first.get("n_threads"),
               flash_attn_setting={-1: "auto", 0: "off", 1: "on"}.get(first.get("flash_attn"), first.get("flash_attn")),
               type_k=first.get("type_k"), cpu_info=first.get("cpu_info"), model_type=first.get("model_type"),
               model_size_mb=first["model_size"] / 1e6 if first.get("model_size") else None,
               model_n_params=first.get("model_n_params"))
    return out


# llama-bench aborts in its scheduler when weight repacking (its default: CPU "extra" buffer types,
# AMX included on hosts that have it) leaves an op of this model's graph with no backend; seen at
# 0c1e570 on the pruned v3-1.6b (16-core Xeon, AMX) and a pruned v3-nano shape (2-core EPYC).
REPACK_ABORT = "cur_backend_id != -1"


def failure_line(stderr: str) -> str:
    """The line of a failed llama.cpp run that says why: its GGML_ASSERT (from the assert on, without
    the source path), else the first line naming an error, else the last line (one line either way;
    the tail of a crash is a debugger backtrace that names nothing)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "GGML_ASSERT" in ln:
            return ln[ln.index("GGML_ASSERT"):]
    return next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no output")


def bench(gguf: Path, bindir: Path, threads: int, reps: int = 5, timeout: float = 1800) -> dict:
    """Run llama-bench in a child and parse it; adds the child's peak RSS and the resolved flash attention.
    When its default weight repacking aborts (``REPACK_ABORT``), runs again with ``--repack 0`` and
    says so in ``note``."""
    import resource

    cmd = bench_command(bindir, gguf, threads, reps)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    note = None
    if p.returncode and REPACK_ABORT in p.stderr:
        cmd += ["--repack", "0"]
        note = ("llama-bench's default weight repacking aborts on this model (GGML_ASSERT(*cur_backend_id != -1)); "
                "measured with --repack 0")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode:
        raise LlamaCppError(f"llama-bench failed (rc {p.returncode}): {failure_line(p.stderr)}")
    out = parse_bench(p.stdout)
    if note:
        out["note"] = note
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out["peak_rss_mb"] = rss / 1024 if rss > before else None   # KiB on Linux; None if a bigger child ran before
    out["flash_attn"] = flash_attn_resolved(p.stderr)
    out["command"] = " ".join(["llama-bench", "-m", Path(gguf).name, *cmd[3:]])
    out["size_mb"] = os.path.getsize(gguf) / 1e6
    return out


# ---------------------------------------------------------------------------------------------
# llama-server
# ---------------------------------------------------------------------------------------------
def server_command(bindir: Path, gguf: Path, port: int, threads: int, parallel: int = 16,
                   ctx_per_slot: int = 1024) -> list[str]:
    """llama-server on 127.0.0.1 only: ``parallel`` slots sharing ``parallel * ctx_per_slot`` tokens of
    context, continuous batching on (``-cb``, its default, spelled out), flash attention at its default."""
    return [str(Path(bindir) / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel), "-cb",
            "-c", str(parallel * ctx_per_slot), "--no-webui"]


def start_server(bindir: Path, gguf: Path, threads: int, parallel: int = 16, ctx_per_slot: int = 1024,
                 log: Path | None = None, ready_s: float = 180) -> tuple[subprocess.Popen, int]:
    """Start llama-server on a free loopback port and wait (bounded) for GET /health = 200.
    Returns (process, port); the caller stops it (``stop_server``)."""
    import http.client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = server_command(bindir, gguf, port, threads, parallel, ctx_per_slot)
    f = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    if log:
        f.close()
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise LlamaCppError(f"llama-server exited ({p.returncode}): {' '.join(cmd)}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return p, port
        except OSError:
            pass
        time.sleep(0.25)
    stop_server(p)
    raise LlamaCppError(f"llama-server not ready after {ready_s:.0f} s: {' '.join(cmd)}")


def stop_server(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Packing for an offline host
# ---------------------------------------------------------------------------------------------
# Wheels of edgekit's own dependencies that the lent device host's Python 3.12 lacks (its package
# list has torch, onnx, onnxruntime, transformers, safetensors, tokenizers, click, rich, numpy, pyyaml,
# but not these); pinned within pyproject.toml's ranges.
DEVICE_WHEELS = ("onnxsim==0.8.1", "tomli-w==1.2.0")
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pack(home: Path = HOME, wheels: bool = False, log=print) -> Path:
    """Write ``home/pack/PACKED`` (the llama.cpp tree minus TRIM, as ``TREE/...``) and ``pack.json``
    (its sha256, where it came from); with ``wheels``, also ``home/pack/wheels/`` (DEVICE_WHEELS for
    CPython 3.12 x86-64). Carry ``home/pack`` to an offline host: ``ensure_source`` there extracts the
    tarball. Returns the pack folder."""
    src = ensure_source(home, log)
    d = home / "pack"
    d.mkdir(parents=True, exist_ok=True)
    if wheels:
        shutil.rmtree(d / "wheels", ignore_errors=True)
        plats = [x for p in DEVICE_PLATFORMS for x in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
              "--implementation", "cp", *plats, "-d", d / "wheels", *DEVICE_WHEELS], home / "wheels.log")
    tmp = d / (PACKED + ".tmp")

    def keep(ti: tarfile.TarInfo):
        rel = ti.name[len(TREE) + 1:] if ti.name.startswith(TREE + "/") else ""
        if any(rel == t or rel.startswith(t + "/") for t in TRIM):
            return None
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    with tarfile.open(tmp, "w:xz", preset=9) as tf:
        tf.add(src.resolve(), arcname=TREE, filter=keep)   # resolve: src may be a link to the tree
    os.replace(tmp, d / PACKED)
    meta = {"file": PACKED, "sha256": sha256(d / PACKED), "bytes": (d / PACKED).stat().st_size,
            "llama_cpp_commit": LLAMA_COMMIT, "from": f"{SDIST_NAME} (sha256 {SDIST_SHA256}), vendor/llama.cpp",
            "trimmed": list(TRIM), "wheels": sorted(p.name for p in (d / "wheels").glob("*.whl"))}
    (d / "pack.json").write_text(json.dumps(meta, indent=1) + "\n")
    return d


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=HOME, help="source/build/pack folder (default benchmarks/.llama)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="write benchmarks/.llama/pack (the source tarball an offline host builds from)")
    pk.add_argument("--wheels", action="store_true", help="also the wheels the device host lacks (DEVICE_WHEELS)")
    b = sub.add_parser("build", help="build llama-bench, llama-server, llama-quantize, llama-cli")
    b.add_argument("-j", "--jobs", type=int, default=None)
    c = sub.add_parser("convert", help="HF checkpoint -> GGUF with the vendored converter")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("gguf", type=Path)
    c.add_argument("--outtype", default="q8_0")
    r = sub.add_parser("bench", help="llama-bench a GGUF; prints the parsed JSON")
    r.add_argument("gguf", type=Path)
    r.add_argument("-t", "--threads", type=int, required=True)
    r.add_argument("-r", "--reps", type=int, default=5)
    r.add_argument("--out", type=Path, help="also write the JSON here")
    s = sub.add_parser("server", help="start llama-server on a GGUF (loopback) and wait until interrupted")
    s.add_argument("gguf", type=Path)
    s.add_argument("-t", "--threads", type=int, required=True)
    s.add_argument("--parallel", type=int, default=16)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "pack":
            d = pack(a.home, wheels=a.wheels)
            meta = json.loads((d / "pack.json").read_text())
            total = sum(f.stat().st_size for f in d.rglob("*")) / 1e6
            print(f"{d / meta['file']}: {meta['bytes'] / 1e6:.1f} MB, sha256 {meta['sha256']}; wheels: "
                  f"{', '.join(meta['wheels']) or 'none'}; folder {total:.1f} MB")
        elif a.cmd == "build":
            print(json.dumps(ensure_built(a.home, jobs=a.jobs), indent=1))
        elif a.cmd == "convert":
            print(convert(a.checkpoint, a.gguf, ensure_source(a.home), a.outtype))
        elif a.cmd == "bench":
            info = built(a.home)
            if info is None:
                raise LlamaCppError("llama.cpp is not built: run `python -m benchmarks.llamacpp build` first")
            res = bench(a.gguf, Path(info["bin"]), a.threads, a.reps)
            text = json.dumps(res, indent=1)
            if a.out:
                a.out.write_text(text + "\n")
            print(text)
        elif a.cmd == "server":
            info = built(a.home)
            if info is None:
                raise LlamaCppError("llama.cpp is not built: run `python -m benchmarks.llamacpp build` first")
            p, port = start_server(Path(info["bin"]), a.gguf, a.threads, a.parallel)
            print(f"llama-server on http://127.0.0.1:{port} (pid {p.pid}); Ctrl-C stops it", flush=True)
            try:
                p.wait()
            except KeyboardInterrupt:
                stop_server(p)
    except (LlamaCppError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
