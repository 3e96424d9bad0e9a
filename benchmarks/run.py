"""Benchmarks side by side: edgekit against torch, onnxruntime, NNCF and llama.cpp on one machine.

    python benchmarks/run.py --quick --threads 4 [--llama-cpp] [--out benchmarks/results/run_NAME]

For v3-nano (trained) and a ~50M-parameter V3 config (random init) it measures, in one run with the
same thread count, torch eager fp32, torch dynamic int8, onnxruntime fp32, onnxruntime
``quantize_dynamic`` (defaults), NNCF ``ModelType.TRANSFORMER`` (defaults), llama.cpp Q8_0
(``--llama-cpp``: builds llama-cpp-python from source, minutes) and the edgekit cpu4 bundle:
size, 128-token prefill p50/p95, decode ms/token at context 128 and 1024, peak RSS (each variant
in its own process), next-token accuracy on the eval split (v3-nano only) and each as a ratio to
onnxruntime fp32; plus the machine's copy bandwidth and the decode floor it implies.

Writes ``OUT.json`` (host, settings, one object per variant) and ``OUT.md`` (the table).
``--quick``: fewer repetitions and 8 evenly spaced eval windows of 512 tokens instead of the whole
eval split; finishes in < 10 minutes on 2 cores without ``--llama-cpp``.

Built artifacts are cached in ``--work`` (default .cache/bench) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import measure, tables, variants  # noqa: E402

VARIANTS = ("ort-fp32", "torch-fp32", "torch-int8", "ort-dynamic-int8", "nncf-int8", "llama-q8_0",
            "edgekit-fp32", "edgekit-cpu4")
QUICK = dict(prefill_warmup=2, prefill_reps=10, decode_tokens=16, eval_windows=8, calib_rows=8,
             timeout_s=300)
FULL = dict(prefill_warmup=3, prefill_reps=30, decode_tokens=32, eval_windows=None, calib_rows=32,
            timeout_s=1800)
PREFILL_TOKENS, SEQ_LEN = 128, 512


START = time.perf_counter()


def _rel(p) -> str:
    """``p`` relative to the repo when inside it (results must not name paths outside the project)."""
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.0f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, 8 eval windows (<10 min on 2 cores)")
    ap.add_argument("--threads", type=int, default=measure_cores(), help="intra-op threads for every row")
    ap.add_argument("--out", type=Path, help="output path prefix (.json and .md are appended); "
                    "default benchmarks/results/run_<cores>c_t<threads>[_quick]")
    ap.add_argument("--models", default="v3-nano,v3-50m", help="comma list of: " + ", ".join(variants.MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--llama-cpp", action="store_true",
                    help="build llama-cpp-python from its sdist (minutes, once) and add the Q8_0 row")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench", help="artifact cache directory")
    ap.add_argument("--bundle", action="append", default=[], metavar="MODEL=DIR",
                    help="use this prebuilt edgekit bundle for MODEL's edgekit-cpu4 row (default: "
                    "edgekit-out/<model>-cpu4 if present, else built by compress in a full run)")
    ap.add_argument("--rebuild", action="store_true",
                    help="delete cached checkpoints/exports/quantized graphs/bundles first (not the llama.cpp build)")
    return ap.parse_args(argv)


def measure_cores() -> int:
    from edgekit.host import usable_cores
    return usable_cores()


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------
def build_artifacts(model: str, wanted: list[str], a, s: dict, llama: dict | None) -> dict:
    """variant -> {"artifact": path, "env": {...}, "cache_elem_bytes": int, "note": str} or {"error": str}."""
    out: dict = {}
    work = a.work / "work"
    t = time.perf_counter()
    ckpt = variants.prepare_model(model, work)
    log(f"{model}: fp32 checkpoint ready ({time.perf_counter() - t:.0f}s)")
    for v in ("torch-fp32", "torch-int8"):
        out[v] = {"artifact": str(ckpt), "cache_elem_bytes": 4}
    onnx_needed = {"ort-fp32", "ort-dynamic-int8", "nncf-int8"} & set(wanted)
    if onnx_needed:
        t = time.perf_counter()
        fp32 = variants.export_fp32(ckpt, work / model)
        note = "plain export of the model's forward_cached (latent cache I/O) + onnxsim"
        log(f"{model}: fp32 ONNX ready ({time.perf_counter() - t:.0f}s)")
        out["ort-fp32"] = {"artifact": str(fp32), "cache_elem_bytes": 4, "note": note}
        for v, build in (("ort-dynamic-int8", lambda: variants.quantize_ort_dynamic(fp32)),
                         ("nncf-int8", lambda: variants.quantize_nncf(fp32, s["calib_rows"]))):
            if v in wanted:
                out[v] = _guarded(v, model, lambda b=build: {"artifact": str(b()), "cache_elem_bytes": 4, "note": note})
    if "llama-q8_0" in wanted:
        if llama is None:
            out["llama-q8_0"] = {"error": "skipped: pass --llama-cpp (builds llama-cpp-python, minutes)"}
        else:
            from benchmarks import llamacpp
            out["llama-q8_0"] = _guarded("llama-q8_0", model, lambda: {
                "artifact": str(llamacpp.convert(ckpt, work / model / "q8_0.gguf", llama)),
                "env": {"PYTHONPATH": llama["site"]}, "cache_elem_bytes": 2,
                "note": f"llama-cpp-python {llama['version']} (GGML_NATIVE), KV cache f16"})
    if "edgekit-fp32" in wanted:
        out["edgekit-fp32"] = _guarded("edgekit-fp32", model, lambda: {
            "artifact": str(variants.export_edgekit(ckpt)), "cache_elem_bytes": 4,
            "note": "edgekit.export defaults (absorbed MLA, com.microsoft MoE), fp32, no pruning"})
    if "edgekit-cpu4" in wanted:
        out["edgekit-cpu4"] = _guarded("edgekit-cpu4", model, lambda: _edgekit_bundle(model, ckpt, work, a))
    return out


def _guarded(v: str, model: str, fn) -> dict:
    t = time.perf_counter()
    try:
        r = fn()
        log(f"{model}: {v} artifact ready ({time.perf_counter() - t:.0f}s)")
        return r
    except NotImplementedError as e:  # a row this run does not build (see the message)
        log(f"{model}: {v} skipped: {e}")
        return {"error": f"skipped: {e}"[:300]}
    except Exception as e:
        log(f"{model}: {v} build FAILED: {e}")
        return {"error": f"build failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def _edgekit_bundle(model: str, ckpt: Path, work: Path, a) -> dict:
    """The edgekit-cpu4 row's bundle: ``--bundle MODEL=DIR``, else ``edgekit-out/<model>-cpu4`` (what
    ``edgekit compress --target cpu4`` writes by default), else built here by ``compress`` (cached in
    the work dir; stage artifacts in $EDGEKIT_CACHE). Building takes far longer than --quick allows
    (measured ~28 min for v3-nano on a loaded 2-core VM), so --quick only uses prebuilt bundles."""
    given = dict(b.split("=", 1) for b in a.bundle)
    cand = ([Path(given[model])] if model in given
            else [ROOT / "edgekit-out" / f"{model}-cpu4", work / model / "edgekit-cpu4"])
    d = next((c for c in cand if (c / "manifest.json").exists()), None)
    if d is None and model in given:
        raise FileNotFoundError(f"--bundle {model}={given[model]} has no manifest.json; pass a compress output dir")
    if d is None and a.quick:
        name = _rel(ckpt) if model != "v3-nano" else "v3-nano"
        raise NotImplementedError(f"not built in --quick (compress takes tens of minutes): run `edgekit compress "
                                  f"{name} --target cpu4` first or pass --bundle")
    if d is None:
        from edgekit.pipeline import compress
        d = work / model / "edgekit-cpu4"
        t = time.perf_counter()
        res = compress(model=str(ckpt), target="cpu4", out=d)
        (d / "bench-compress.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t, 1),
                                                           "exit_code": res.exit_code}))
    spec = json.loads((d / "export.json").read_text())
    cache = spec["cache"]
    per_token = cache["bytes_per_token"]  # an int, or {"latent": .., "per_head_kv": ..} in newer exports
    per_token = per_token["latent"] if isinstance(per_token, dict) else per_token
    gates = json.loads((d / "report.json").read_text()).get("gates", {}) if (d / "report.json").exists() else {}
    failed = [k for k, g in gates.items() if g.get("status") == "fail"]
    return {"artifact": str(d), "cache_elem_bytes": per_token // (spec["num_layers"] * cache["width"]),
            "note": f"bundle {d}; " + (f"failed gates: {', '.join(failed)}" if failed else "no failed gates")}


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
def run_worker(spec: dict, env: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        sp, op = Path(d) / "spec.json", Path(d) / "out.json"
        sp.write_text(json.dumps(spec))
        e = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), **env}
        e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        try:
            subprocess.run([sys.executable, "-m", "benchmarks.worker", str(sp), str(op)], cwd=ROOT, env=e,
                           timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f}s"}
        return json.loads(op.read_text()) if op.exists() else {"error": "worker died (see stderr)"}


def prepare_tokens(work: Path) -> tuple[Path, Path]:
    """eval split ids (.npy) and the prompt ids used for latency (the eval split's first tokens)."""
    import numpy as np

    ev, pr = work / "eval_ids.npy", work / "prompt_ids.npy"
    if not ev.exists():
        from edgekit.checkpoint import load_tokenizer
        from edgekit.data import load_tokens
        work.mkdir(parents=True, exist_ok=True)
        toks = load_tokens("eval", load_tokenizer("v3-nano"))
        np.save(ev, toks)
        np.save(pr, toks[:4096])
    return ev, pr


def main(argv=None) -> int:
    a = parse_args(argv)
    s = QUICK if a.quick else FULL
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    wanted = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [m for m in models if m not in variants.MODELS] + [v for v in wanted if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown model/variant {bad[0]!r}; choose from {list(variants.MODELS)} / {list(VARIANTS)}")
    from edgekit.host import host_facts
    host = host_facts()
    os.environ.setdefault("EDGEKIT_CACHE", str(a.work / "edgekit-cache"))
    out = a.out or ROOT / "benchmarks" / "results" / f"run_{host['cores']}c_t{a.threads}{'_quick' if a.quick else ''}"
    log(f"host: {host['cpu_model']}, {host['cores']} cores; threads {a.threads}; {'quick' if a.quick else 'full'} run")
    load_start = os.getloadavg()[0]
    if load_start > host["cores"] - a.threads + 0.5:
        log(f"warning: load average {load_start:.1f} on {host['cores']} cores: other processes compete, timings "
            "will be noisy (recorded in the JSON)")

    bw = {"gbs_1t": measure.memory_bandwidth_gbs(1), "gbs": measure.memory_bandwidth_gbs(a.threads)}
    log(f"copy bandwidth: {bw['gbs_1t']:.1f} GB/s (1 thread), {bw['gbs']:.1f} GB/s ({a.threads} threads)")
    if a.rebuild:
        shutil.rmtree(a.work / "work", ignore_errors=True)
        shutil.rmtree(a.work / "edgekit-cache", ignore_errors=True)
    eval_ids, prompt_ids = prepare_tokens(a.work / "work")
    llama = None
    if a.llama_cpp and "llama-q8_0" in wanted:
        from benchmarks import llamacpp
        try:
            llama = llamacpp.ensure_built(a.work / "llama", log=log)
            log(f"llama-cpp-python {llama['version']} ready (build took {llama['build_s']}s)")
        except Exception as e:
            log(f"llama-cpp-python build FAILED: {e}")

    rows = []
    for model in models:
        arts = build_artifacts(model, wanted, a, s, llama)
        cfg = json.loads((a.work / "work" / model / "checkpoint" / "config.json").read_text())
        ap = measure.active_params(cfg)
        for v in [v for v in VARIANTS if v in wanted]:
            art = arts.get(v, {"error": "not built"})
            row = {"model": model, "variant": v, "trained": variants.MODELS[model]["trained"]}
            if "error" in art:
                row["error"] = art["error"]
            else:
                spec = {"variant": v, "artifact": art["artifact"], "threads": a.threads,
                        "prompt": str(prompt_ids), "prefill_tokens": PREFILL_TOKENS,
                        "prefill_warmup": s["prefill_warmup"], "prefill_reps": s["prefill_reps"],
                        "decode_ctx": list(tables.CONTEXTS), "decode_tokens": s["decode_tokens"],
                        "eval": str(eval_ids) if variants.MODELS[model]["trained"] else None,
                        "eval_windows": s["eval_windows"], "seq_len": SEQ_LEN}
                t = time.perf_counter()
                res = run_worker(spec, art.get("env", {}), s["timeout_s"])
                if "size_mb" not in res and not res.get("error"):
                    res["size_mb"] = variants.dir_mb(Path(art["artifact"]), (".onnx", ".data"))
                row.update(res)
                row["note"] = art.get("note", "")
                tables.add_floor(row, ap, bw["gbs"], art["cache_elem_bytes"])
                log(f"{model} {v}: " + (row.get("error") or ", ".join(
                    f"{k}={row[k]:.4g}" for k in tables.METRICS if row.get(k) is not None))
                    + f" ({time.perf_counter() - t:.0f}s)")
            row["threads"] = a.threads
            rows.append(row)
    tables.add_ratios(rows)
    for r in rows:
        r["host"] = host
        r.pop("traceback", None) if not r.get("error") else None
    settings = {k: s[k] for k in ("prefill_warmup", "prefill_reps", "decode_tokens", "eval_windows", "calib_rows")}
    settings.update(quick=a.quick, prefill_tokens=PREFILL_TOKENS, eval_seq_len=SEQ_LEN)
    note = (f"Accuracy: next-token top-1 on {'8 evenly spaced windows (4096 tokens)' if a.quick else 'all windows'} "
            f"of 512 tokens of the v3-nano eval split; v3-50m is random-init (speed only).")
    if llama:
        note += f" llama-cpp-python {llama['version']} build time: {llama['build_s']:.0f} s."
    load = {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}
    note += f" 1-min load average {load['start']} at start, {load['end']} at end ({host['cores']} cores)."
    doc = {"host": host, "threads": a.threads, "bandwidth": bw, "load_avg_1min": load, "settings": settings,
           "llama_cpp": llama, "note": note, "rows": rows}
    _write(Path(str(out) + ".json"), json.dumps(doc, indent=1) + "\n")
    _write(Path(str(out) + ".md"), tables.markdown(rows, host, a.threads, bw, note))
    log(f"wrote {out}.json and {out}.md")
    print(tables.markdown(rows, host, a.threads, bw, note))
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
