"""The llama.cpp Q8_0 row: build llama-cpp-python from its PyPI sdist, convert the HF checkpoint
with the converter the sdist vendors, and time it through the Python bindings.

What: ``ensure_built(cache)`` (``pip download`` the sdist once, ``CMAKE_ARGS=-DGGML_NATIVE=ON pip
install --no-deps --target cache/site`` it, timed into ``cache/build.json``; unpack the sdist for
``convert_hf_to_gguf.py`` + ``gguf-py``), ``convert(ckpt, gguf, info)`` (Q8_0 GGUF), ``LlamaRunner``.

Tokenizer workaround (the smallest honest one): the converter identifies BPE pre-tokenizers by the
sha256 of the token ids of a probe string and refuses unknown hashes. Our tokenizer.json uses the
plain GPT-2 byte-level pre-tokenizer (``ByteLevel``, ``use_regex=True``, no normalizer), which is
llama.cpp's ``"gpt-2"`` pre-type. At conversion time only (in a subprocess, nothing vendored is
patched) we wrap ``TextModel.get_vocab_base_pre``: if the original raises "not recognized" AND the
tokenizer.json's pre-tokenizer is exactly that GPT-2 one, return ``"gpt-2"``; otherwise re-raise.

Why the Python bindings and not llama-bench: one package, one build, and the same worker timing
loop as every other row. Per call overhead of the bindings (ctypes, a 4096-float logits copy) is
included in the decode time, as ORT's session.run overhead is in its rows.

Failure modes: a failed build or conversion raises RuntimeError with the log tail; run.py marks
the row failed and continues. Offline machines need the sdist in ``cache/sdist`` beforehand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

PACKAGE = "llama-cpp-python"

# Runs inside a subprocess: cwd = vendored llama.cpp dir; argv = [ckpt, outfile].
_CONVERT_DRIVER = r'''
import json, sys
from pathlib import Path
sys.argv = ["convert_hf_to_gguf.py", sys.argv[1], "--outfile", sys.argv[2], "--outtype", "q8_0"]
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


def _run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if rc:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed (rc {rc}); log {log}:\n{tail}")


def ensure_built(cache: Path, log=print) -> dict:
    """Build llama-cpp-python into ``cache/site`` once; returns {site, src, build_s, version}."""
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        log(f"downloading the {PACKAGE} sdist (~77 MB) ...")
        _run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-binary", ":all:", "--no-deps",
              "-d", str(cache / "sdist")], cache / "download.log")
        sdists = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    version = sdist.name[len("llama_cpp_python-"): -len(".tar.gz")]
    src = cache / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not src.exists():
        with tarfile.open(sdist) as tf:
            tf.extractall(cache / "src", filter="data")
    info_file = cache / "build.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if info.get("rc") != 0 or not (cache / "site" / "llama_cpp").exists():
        log(f"building {PACKAGE} {version} with GGML_NATIVE=ON (takes minutes) ...")
        shutil.rmtree(cache / "site", ignore_errors=True)
        t0 = time.perf_counter()
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
        # offline machines: `python -m benchmarks.llamacpp offline` put the build deps beside the sdist
        local = ["--no-index", "--find-links", str(cache / "sdist")] if list((cache / "sdist").glob("*.whl")) else []
        _run([sys.executable, "-m", "pip", "install", *local, "--no-deps", "--target", str(cache / "site"), str(sdist)],
             cache / "build.log", env=env)
        # llama_cpp imports diskcache at import time; its other deps (numpy, jinja2) are in our venv
        _run([sys.executable, "-m", "pip", "install", *local, "--no-deps", "--target", str(cache / "site"),
              "diskcache"], cache / "deps.log")
        info = {"rc": 0, "build_s": round(time.perf_counter() - t0, 1)}
        info_file.write_text(json.dumps(info))
    return {"site": str(cache / "site"), "src": str(src), "build_s": info.get("build_s"), "version": version}


def convert(ckpt: Path, out: Path, info: dict) -> Path:
    """HF checkpoint dir -> Q8_0 GGUF with the vendored converter (tokenizer workaround above)."""
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    _run([sys.executable, "-c", _CONVERT_DRIVER, str(Path(ckpt).resolve()), str(tmp.resolve())],
         out.with_suffix(".convert.log"), cwd=info["src"], env=env)
    os.replace(tmp, out)
    return out


class LlamaRunner:
    """Batch-1 prefill/decode through llama_cpp.Llama (worker-side; needs cache/site on sys.path).
    Latency instance: logits for the last position only (llama.cpp's default); accuracy: a second
    instance with logits_all=True, created lazily after the RSS snapshot."""


    def __init__(self, gguf: Path, threads: int):
        import llama_cpp

        self.gguf, self.threads, self.llama_cpp = str(gguf), threads, llama_cpp
        self.llm = self._open(logits_all=False)
        self.scorer = None

    def _open(self, logits_all: bool):
        return self.llama_cpp.Llama(self.gguf, n_ctx=2048, n_batch=512, n_threads=self.threads,
                                    n_threads_batch=self.threads, logits_all=logits_all, verbose=False)

    def size_mb(self) -> float:
        return os.path.getsize(self.gguf) / 1e6

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval([int(t) for t in ids[0]])

    def start(self, ids):
        self.prefill(ids)
        return None

    def step(self, state, tok):
        self.llm.eval([int(tok)])
        return None

    def logits(self, ids):
        if self.scorer is None:
            self.llm = None  # free the latency instance
            self.scorer = self._open(logits_all=True)
        out = []
        for row in ids:
            self.scorer.reset()
            self.scorer.eval([int(t) for t in row])
            out.append(np.array(self.scorer.scores[: len(row)], dtype=np.float32))
        return np.stack(out)


# Parts of the sdist neither the build nor the converter reads (git history, vocab test files, docs).
TRIM = (".git", "vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/media")


def trim_sdist(cache: Path) -> Path:
    """Rewrite cache/sdist/*.tar.gz without TRIM (77 MB -> 12 MB, small enough to carry to an
    offline machine); the original is kept as cache/<name>.full. Returns the new tarball."""
    sdist = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))[-1]
    full = cache / (sdist.name + ".full")
    if not full.exists():
        os.replace(sdist, full)
    top = sdist.name[: -len(".tar.gz")]
    tmp = sdist.with_name(sdist.name + ".tmp")
    with tarfile.open(full) as src, tarfile.open(tmp, "w:gz") as dst:
        for m in src:
            rel = m.name[len(top) + 1:]
            if any(rel == t or rel.startswith(t + "/") for t in TRIM):
                continue
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    os.replace(tmp, sdist)
    return sdist


def prepare_offline(cache: Path) -> list[Path]:
    """Everything an offline machine needs in cache/sdist (~13 MB): the trimmed sdist plus wheels of
    its build backend (scikit-build-core; a system cmake >= 3.21 and a C++ compiler are assumed)
    and of diskcache. Returns the files."""
    if not list((cache / "sdist").glob("llama_cpp_python-*.tar.gz")):
        ensure_built(cache)
    trim_sdist(cache)
    _run([sys.executable, "-m", "pip", "download", "scikit-build-core>=0.9.2", "diskcache", "-d",
          str(cache / "sdist")], cache / "download.log")
    return sorted((cache / "sdist").iterdir())


if __name__ == "__main__":
    # python -m benchmarks.llamacpp offline [CACHE]: make CACHE/sdist carryable to an offline machine
    if sys.argv[1:2] == ["offline"]:
        c = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / ".cache/bench/llama"
        for p in prepare_offline(c):
            print(f"{p}: {p.stat().st_size / 1e6:.1f} MB")
