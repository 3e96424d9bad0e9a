"""Benchmarks side by side: edgekit against onnxruntime and llama.cpp (and torch, NNCF) on one machine.

    python benchmarks/run.py --shape v3-1.6b --threads 4 [--bundle DIR] [--quick] [--out PREFIX]
    python benchmarks/run.py --checkpoint DIR --threads 4 ...
    python benchmarks/run.py --quick --threads 2            # v3-nano (trained) and v3-50m

Models: ``--shape NAME`` (a named shape of edgekit/data/shapes.toml, written by ``edgekit synth``;
``v3-nano`` is the shipped trained model of that shape), ``--checkpoint DIR`` (an HF checkpoint), or
``--models`` (default v3-nano,v3-50m); several may be given. For each, in one run with the same
thread count (each variant in its own child process, one after another), by default:
- ``ort-fp32``: the model's plain fp32 ONNX export on onnxruntime;
- ``ort-dynamic-int8``: onnxruntime ``quantize_dynamic`` (defaults) of that export;
- ``llama-q8_0``: llama.cpp built from its pinned source (benchmarks/llamacpp.py: cmake + ninja, GGML_NATIVE),
  the checkpoint (or ``--llama-checkpoint``) converted to Q8_0 by llama.cpp's ``convert_hf_to_gguf.py``,
  timed by ``llama-bench -p 128 -n 32 -d 0,128,1024`` with flash attention at llama.cpp's default;
- ``edgekit-cpu4``: the ``edgekit compress --target cpu4`` bundle (``--bundle DIR`` reuses one);
and on request (``--variants``) torch eager fp32 / dynamic int8, NNCF, edgekit's fp32 export.
Measured: size, 128-token prefill p50/p95, decode ms/token at context 128 and 1024, peak RSS,
next-token accuracy on the eval split (trained v3-nano only, not for llama-bench), ratios to
onnxruntime fp32, and the bandwidth floor (bytes read per decoded token / this machine's numpy copy
bandwidth at the same threads).

Writes ``OUT.json`` (host, settings, llama.cpp build, one object per variant) and ``OUT.md`` (the table).
``--quick``: fewer repetitions and 8 eval windows; ``--prepare``: build the artifacts (checkpoint,
exports, GGUF, llama.cpp) and stop, so a time-limited host can split the work over several commands.
Artifacts are cached in ``--work`` (default .cache/bench) and reused by later runs.
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
from benchmarks.llamacpp import BENCH_GEN  # noqa: E402
from benchmarks.rounds_plot import plot as plot_rounds  # noqa: E402

VARIANTS = ("ort-fp32", "torch-fp32", "torch-int8", "ort-dynamic-int8", "nncf-int8", "llama-q8_0",
            "edgekit-fp32", "edgekit-cpu4")
DEFAULT_VARIANTS = ("ort-fp32", "ort-dynamic-int8", "llama-q8_0", "edgekit-cpu4")
QUICK = dict(prefill_warmup=2, prefill_reps=10, decode_tokens=16, eval_windows=8, calib_rows=8,
             llama_reps=3, timeout_s=900)
FULL = dict(prefill_warmup=3, prefill_reps=30, decode_tokens=32, eval_windows=None, calib_rows=32,
            llama_reps=5, timeout_s=1800)
PREFILL_TOKENS, SEQ_LEN = 128, 512


START = time.perf_counter()


def _rel(p) -> str:
    """``p`` relative to the repo when inside it, else its last component (results must not name paths
    outside the project)."""
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return f".../{Path(p).name}"


def _rel_arg(arg: str) -> str:
    """A command-line argument with an absolute path in it (``DIR`` or ``MODEL=DIR``) made safe by ``_rel``."""
    head, sep, tail = arg.rpartition("=")
    return f"{head}{sep}{_rel(tail)}" if tail.startswith("/") else arg


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.0f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, 8 eval windows")
    ap.add_argument("--threads", type=int, default=measure_cores(), help="intra-op threads for every row")
    ap.add_argument("--out", type=Path, help="output path prefix (.json and .md are appended); "
                    "default benchmarks/results/run_<cores>c_t<threads>[_quick]")
    ap.add_argument("--shape", action="append", default=[], metavar="NAME",
                    help="a named shape (edgekit/data/shapes.toml; v3-nano = the trained model); repeatable")
    ap.add_argument("--checkpoint", action="append", default=[], type=Path, metavar="DIR",
                    help="a Hugging Face DeepSeek-V3 checkpoint dir; repeatable")
    ap.add_argument("--models", default=None,
                    help="comma list of shapes (the default when no --shape/--checkpoint: v3-nano,v3-50m)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--llama-checkpoint", action="append", default=[], metavar="[MODEL=]DIR",
                    help="convert this checkpoint for MODEL's llama-q8_0 row instead of MODEL's own (e.g. the "
                    "pruned checkpoint edgekit compress made: $EDGEKIT_CACHE/prune/<key>)")
    ap.add_argument("--llama-home", type=Path, default=None,
                    help="llama.cpp source/build folder (default benchmarks/.llama; an offline host extracts "
                    "benchmarks/.llama/pack there, see `python -m benchmarks.llamacpp pack`)")
    ap.add_argument("--jobs", type=int, default=None, help="ninja -j for the llama.cpp build (default: all cores)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench", help="artifact cache directory")
    ap.add_argument("--bundle", action="append", default=[], metavar="[MODEL=]DIR",
                    help="use this prebuilt edgekit bundle for MODEL's edgekit-cpu4 row (default: "
                    "edgekit-out/<model>-cpu4 if present, else built by compress in a full run)")
    ap.add_argument("--prepare", action="store_true", help="build every artifact, measure nothing")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every variant this many times, interleaved (order rotated per round); a row "
                    "is the median over rounds, and edgekit-cpu4 / llama-q8_0 is also compared round by round "
                    "(a machine whose speed drifts over minutes biases one-after-another runs)")
    ap.add_argument("--machine", default=None, help="a name for the machine, written into the results")
    ap.add_argument("--note", default="", help="a label put at the head of the table's note (what the run is, caveats)")
    ap.add_argument("--rebuild", action="store_true",
                    help="delete cached checkpoints/exports/quantized graphs/bundles first (not the llama.cpp build)")
    return ap.parse_args(argv)


def per_model(opts: list[str], models: list[str], flag: str) -> dict[str, str]:
    """``[MODEL=]DIR`` options -> {model: dir}; a bare DIR applies to the only model."""
    out = {}
    for o in opts:
        if "=" in o and o.split("=", 1)[0] in models:
            m, d = o.split("=", 1)
        elif len(models) == 1:
            m, d = models[0], o
        else:
            raise SystemExit(f"{flag} {o}: name the model (MODEL=DIR), one of {', '.join(models)}")
        out[m] = d
    return out


def measure_cores() -> int:
    from edgekit.host import usable_cores
    return usable_cores()


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------
def build_artifacts(model: str, spec: dict, wanted: list[str], a, s: dict, llama: dict | None) -> dict:
    """variant -> {"artifact": path, "env": {...}, "cache_elem_bytes": int, "note": str} or {"error": str}."""
    out: dict = {}
    work = a.work / "work"
    t = time.perf_counter()
    ckpt = variants.prepare_model(model, work, spec)
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
        if llama is None or "error" in llama:
            out["llama-q8_0"] = {"error": f"build failed: {(llama or {}).get('error', 'llama.cpp not built')}"[:300]}
        else:
            from benchmarks import llamacpp
            src_ckpt = Path(a.llama_ckpt.get(model, ckpt))
            gguf = work / model / (f"q8_0-{_digest(src_ckpt)}.gguf" if model in a.llama_ckpt else "q8_0.gguf")
            out["llama-q8_0"] = _guarded("llama-q8_0", model, lambda: {
                "artifact": str(llamacpp.convert(src_ckpt, gguf, Path(llama["src"]))), "cache_elem_bytes": 2,
                "checkpoint": _rel(src_ckpt), "config": json.loads((src_ckpt / "config.json").read_text()),
                "note": f"{llama['version']}, llama-bench, flash attention at its default; KV cache f16"
                        + (f"; converted from {_rel(src_ckpt)}" if model in a.llama_ckpt else "")})
    if "edgekit-fp32" in wanted:
        out["edgekit-fp32"] = _guarded("edgekit-fp32", model, lambda: {
            "artifact": str(variants.export_edgekit(ckpt)), "cache_elem_bytes": 4,
            "note": "edgekit.export defaults (absorbed MLA, com.microsoft MoE), fp32, no pruning"})
    if "edgekit-cpu4" in wanted:
        out["edgekit-cpu4"] = _guarded("edgekit-cpu4", model, lambda: _edgekit_bundle(model, ckpt, work, a))
    return out


def _digest(p: Path) -> str:
    import hashlib
    return hashlib.sha256(str(Path(p).resolve()).encode()).hexdigest()[:8]


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
    given = a.bundles
    cand = ([Path(given[model])] if model in given
            else [ROOT / "edgekit-out" / f"{model}-cpu4", work / model / "edgekit-cpu4"])
    d = next((c for c in cand if (c / "manifest.json").exists()), None)
    if d is None and model in given:
        raise FileNotFoundError(f"--bundle {model}={given[model]} has no manifest.json; pass a compress output dir")
    if d is None and a.quick:
        name = _rel(ckpt) if model != "v3-nano" else "v3-nano"
        raise NotImplementedError(f"not built in --quick (compress takes long): run `edgekit compress "
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
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else None
    return {"artifact": str(d), "cache_elem_bytes": per_token // (spec["num_layers"] * cache["width"]),
            "config": cfg,  # the bundle's own (pruned) model: its active parameters set the floor
            "note": f"bundle {_rel(d)}; " + (f"failed gates: {', '.join(failed)}" if failed else "no failed gates")}


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
def run_worker(spec: dict, env: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        sp, op = Path(d) / "spec.json", Path(d) / "out.json"
        sp.write_text(json.dumps(spec))
        e = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), **env}
        e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH"), os.environ.get("PYTHONPATH"))
                                          if p)
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


def run_llama_worker(gguf: str, threads: int, reps: int, home: Path, timeout: float) -> dict:
    """llama-bench through ``python -m benchmarks.llamacpp bench`` in a child: its peak RSS is llama-bench's."""
    with tempfile.TemporaryDirectory() as d:
        op = Path(d) / "out.json"
        cmd = [sys.executable, "-m", "benchmarks.llamacpp", "--home", str(home), "bench", gguf, "-t", str(threads),
               "-r", str(reps), "--out", str(op)]
        try:
            p = subprocess.run(cmd, cwd=ROOT, timeout=timeout, check=False, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)})
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f}s"}
        if not op.exists():
            return {"error": (p.stderr.strip().splitlines() or ["llama-bench worker died"])[-1][:300]}
        res = json.loads(op.read_text())
    keys = ("prefill_p50_ms", "prefill_p95_ms", "decode_ms_ctx0", "decode_ms_ctx128", "decode_ms_ctx1024",
            "peak_rss_mb", "size_mb")
    row = {k: res.get(k) for k in keys}
    row["accuracy"] = None
    row["llama_bench"] = {k: v for k, v in res.items() if k not in keys}
    return row


def measure_variant(v: str, art: dict, a, s: dict, home, prompt_ids: Path, eval_ids: Path | None) -> dict:
    """One variant's timings (and accuracy when ``eval_ids``) in a child process of its own."""
    if v == "llama-q8_0":
        return run_llama_worker(art["artifact"], a.threads, s["llama_reps"], home, s["timeout_s"])
    spec = {"variant": v, "artifact": art["artifact"], "threads": a.threads,
            "prompt": str(prompt_ids), "prefill_tokens": PREFILL_TOKENS,
            "prefill_warmup": s["prefill_warmup"], "prefill_reps": s["prefill_reps"],
            "decode_ctx": list(tables.CONTEXTS), "decode_tokens": s["decode_tokens"],
            "eval": str(eval_ids) if eval_ids else None, "eval_windows": s["eval_windows"], "seq_len": SEQ_LEN}
    return run_worker(spec, art.get("env", {}), s["timeout_s"])


def model_list(a) -> list[tuple[str, dict]]:
    specs = [variants.model_spec(n) for n in a.shape] + [variants.model_spec(checkpoint=c) for c in a.checkpoint]
    if a.models or not specs:
        specs += [variants.model_spec(m.strip()) for m in (a.models or "v3-nano,v3-50m").split(",") if m.strip()]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise SystemExit(f"a model is named twice: {', '.join(names)}")
    return specs


def main(argv=None) -> int:
    from edgekit.errors import EdgekitError

    a = parse_args(argv)
    s = QUICK if a.quick else FULL
    wanted = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in wanted if v not in VARIANTS]
    if a.rounds < 1:
        print(f"error: --rounds {a.rounds}: give 1 or more", file=sys.stderr)
        return 2
    if bad:
        print(f"error: unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        specs = model_list(a)
    except (EdgekitError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [n for n, _ in specs]
    a.bundles = per_model(a.bundle, names, "--bundle")
    a.llama_ckpt = per_model(a.llama_checkpoint, names, "--llama-checkpoint")
    from edgekit.host import host_facts
    host = host_facts()
    if a.machine:
        host["machine"] = a.machine
    os.environ.setdefault("EDGEKIT_CACHE", str(a.work / "edgekit-cache"))
    out = a.out or ROOT / "benchmarks" / "results" / f"run_{host['cores']}c_t{a.threads}{'_quick' if a.quick else ''}"
    log(f"host: {host['cpu_model']}, {host['cores']} cores; threads {a.threads}; models {', '.join(names)}; "
        f"{'prepare only' if a.prepare else 'quick' if a.quick else 'full'} run")
    load_start = os.getloadavg()[0]
    if load_start > host["cores"] - a.threads + 0.5 and not a.prepare:
        log(f"warning: load average {load_start:.1f} on {host['cores']} cores: other processes compete, timings "
            "will be noisy (recorded in the JSON)")
    if a.rebuild:
        shutil.rmtree(a.work / "work", ignore_errors=True)
        shutil.rmtree(a.work / "edgekit-cache", ignore_errors=True)
    eval_ids, prompt_ids = prepare_tokens(a.work / "work")
    llama, home = None, a.llama_home or None
    if "llama-q8_0" in wanted:
        from benchmarks import llamacpp
        home = home or llamacpp.HOME
        try:
            llama = llamacpp.ensure_built(home, jobs=a.jobs, log=log)
            log(f"{llama['version']} built ({llama['build_s']}s)")
        except Exception as e:
            log(f"llama.cpp build FAILED: {e}")
            llama = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}

    arts_by_model = {}
    for model, spec in specs:
        arts_by_model[model] = build_artifacts(model, spec, wanted, a, s, llama)
    if a.prepare:
        for model, arts in arts_by_model.items():
            for v in [v for v in VARIANTS if v in wanted]:
                art = arts.get(v, {})
                log(f"{model} {v}: " + (art.get("error") or _rel(art.get("artifact", "?"))))
        return 0

    bw = {"gbs_1t": measure.memory_bandwidth_gbs(1), "gbs": measure.memory_bandwidth_gbs(a.threads)}
    log(f"copy bandwidth: {bw['gbs_1t']:.1f} GB/s (1 thread), {bw['gbs']:.1f} GB/s ({a.threads} threads)")
    order = [v for v in VARIANTS if v in wanted]
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(a.rounds):
        # each round runs every variant once, the order rotated, so a drift in the machine's speed
        # over minutes reaches every variant alike (tables.paired_ratios compares them round by round)
        turn = order[rnd % len(order):] + order[:rnd % len(order)]
        for model, mspec in specs:
            arts = arts_by_model[model]
            for v in turn:
                art = arts.get(v, {"error": "not built"})
                if "error" in art:
                    results.setdefault((model, v), []).append({"error": art["error"]})
                    continue
                t = time.perf_counter()
                # accuracy once per variant: in its first round that runs (a failed round scores nothing)
                scored = any(not r.get("error") for r in results.get((model, v), []))
                res = measure_variant(v, art, a, s, home, prompt_ids,
                                      eval_ids if mspec["trained"] and not scored else None)
                results.setdefault((model, v), []).append(res)
                log(f"{model} {v}{f' (round {rnd + 1}/{a.rounds})' if a.rounds > 1 else ''}: "
                    + (res.get("error") or ", ".join(f"{k}={res[k]:.4g}" for k in tables.METRICS
                                                     if res.get(k) is not None))
                    + f" ({time.perf_counter() - t:.0f}s)")
    rows = []
    for model, mspec in specs:
        arts = arts_by_model[model]
        ckpt = variants.prepare_model(model, a.work / "work", mspec)
        cfg = json.loads((ckpt / "config.json").read_text())
        for v in order:
            art = arts.get(v, {"error": "not built"})
            row = {"model": model, "variant": v, "trained": mspec["trained"]}
            row.update(tables.merge_rounds(results[(model, v)]))
            if not row.get("error"):
                if "size_mb" not in row:
                    row["size_mb"] = variants.dir_mb(Path(art["artifact"]), (".onnx", ".data"))
                row["note"] = art.get("note", "")
                row_cfg = art.get("config") or cfg   # the model this row runs (a pruned one for bundles)
                row["params"] = measure.active_params(row_cfg).total
                tables.add_floor(row, measure.active_params(row_cfg), bw["gbs"], art["cache_elem_bytes"])
            row["threads"] = a.threads
            rows.append(row)
    tables.add_ratios(rows)
    for r in rows:
        r["host"] = host
        r.pop("traceback", None) if not r.get("error") else None
    settings = {k: s[k] for k in ("prefill_warmup", "prefill_reps", "decode_tokens", "eval_windows", "calib_rows",
                                  "llama_reps")}
    settings.update(quick=a.quick, prefill_tokens=PREFILL_TOKENS, eval_seq_len=SEQ_LEN, rounds=a.rounds)
    load = {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}
    pairs = tables.paired_ratios(rows, "edgekit-cpu4", "llama-q8_0") if a.rounds > 1 else {}
    note = run_note(a, rows, llama, host, load, pairs)
    doc = {"host": host, "threads": a.threads, "bandwidth": bw, "load_avg_1min": load, "settings": settings,
           "command": "python benchmarks/run.py " + " ".join(map(_rel_arg, argv if argv is not None else sys.argv[1:])),
           "llama_cpp": llama and {k: (_rel(v) if k in ("src", "bin") else v) for k, v in llama.items()},
           "note": note, "paired_ratios": pairs, "rows": rows}
    _write(Path(str(out) + ".json"), json.dumps(doc, indent=1) + "\n")
    _write(Path(str(out) + ".md"), tables.markdown(rows, host, a.threads, bw, note))
    plotted = a.rounds > 1 and plot_rounds(doc, Path(str(out) + ".png"))
    log(f"wrote {out}.json and {out}.md" + (f" and {out}.png (timings round by round)" if plotted else ""))
    print(tables.markdown(rows, host, a.threads, bw, note))
    return 0


def run_note(a, rows: list[dict], llama: dict | None, host: dict, load: dict, pairs: dict | None = None) -> str:
    """The table's footnote: what was run how (accuracy, llama.cpp build and flash attention, load,
    interleaved rounds and their paired ratios)."""
    trained = any(r.get("trained") for r in rows)
    machine = host.get("machine") or host.get("cpu_model")
    note = ((a.note + " ") if a.note else "") + (f"Machine: {machine}; {a.threads} threads in every row. "
            + (f"Accuracy: next-token top-1 on {'8 evenly spaced windows (4096 tokens)' if a.quick else 'all windows'} "
               "of 512 tokens of the v3-nano eval split (trained v3-nano only). " if trained else ""))
    lb = [r["llama_bench"] for r in rows if r.get("llama_bench")]
    if llama and "error" not in llama:
        fa = sorted({f"{x.get('flash_attn_setting')} -> {x.get('flash_attn') or 'not logged'}" for x in lb})
        opts = " ".join(llama["cmake_options"][2:6])
        cmd = lb[0]["command"] if lb else "llama-bench"
        note += (f"llama-q8_0: {llama['version']}, built here with cmake + ninja ({opts}, {llama['build_s']:.0f} s); "
                 f"timed by `{cmd}`; flash attention left at llama.cpp's default ({', '.join(fa) or 'auto'}); "
                 f"prefill p50/p95 over its {lb[0].get('prefill_samples') if lb else '?'} reps, decode = mean "
                 f"ms/token of {BENCH_GEN} tokens after a context of 128 / 1024 (other rows: p50 of single-token "
                 "steps from that context). " + "".join(sorted({x["note"] + ". " for x in lb if x.get("note")})))
    if a.rounds > 1:
        note += (f"Each figure is the median over {a.rounds} interleaved rounds (every variant once per round, in a "
                 "child process of its own, the order rotated each round). "
                 + tables.paired_note(pairs or {}, "edgekit-cpu4", "llama-q8_0") + " ")
    note += f"1-min load average {load['start']} at start, {load['end']} at end ({host['cores']} cores)."
    return note


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
