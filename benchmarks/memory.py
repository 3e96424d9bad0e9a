"""Peak memory of each compression stage against the checkpoint size (checkpoints larger than RAM).

Run: ``python benchmarks/memory.py --shape v3-400m --work /tmp/edgekit-mem --out benchmarks/results/memory_v3-400m_2c``
(add ``--device cuda`` on a GPU host; ``--stages`` to pick a subset; ``--dtype fp8`` for DeepSeek's
release format).

What: writes a random-init checkpoint of a named shape (``edgekit synth``), then runs each stage in
its own subprocess while this process samples the resident memory of the whole process tree (the
stage and everything it starts, e.g. the latency worker of ``validate``) every 50 ms:
- ``synth``: the checkpoint, written shard by shard;
- ``load`` (contrast): ``edgekit.load`` of the whole fp32 model, the first thing the in-memory
  pipeline does (it then holds several more copies);
- ``calibrate``: pruning statistics, streamed (``stream.collect_stats_streamed``);
- ``prune``: statistics + plan + surgery, written shard by shard (``stream.prune_streamed``);
- ``baseline``: streamed fp32 torch accuracy on eval tokens;
- ``export``: layer-by-layer fp32 ONNX export with external data (the baseline's size);
- ``quantize``: the streamed smooth + layer-by-layer export + the overrides' plan + the int8 graph
  pass (``quantize_export``, weights read per unit) of the pruned checkpoint;
- ``validate``: onnxruntime accuracy, latency and size of the int8 graph (``edgekit.validate``);
- ``compress``: the whole ``edgekit compress --stream`` end to end; each of its stages' own peak
  (VmHWM reset at the stage's start) comes from the report's ``timings``;
- ``compress-memory`` (contrast): the same compress in memory (``--no-stream``), same recipe;
- ``validate-bundle``: ``edgekit validate`` of the bundle the last compress wrote (its recipe, the
  baseline it records): the validation stage again, alone.
A stage whose process tree passes ``--rss-limit-gb`` is killed and reported as such (its peak is
then a lower bound), so the in-memory contrast cannot take the machine down.
Prints one row per stage: peak tree RSS, its ratio to the fp32 checkpoint size, the stage's own
VmHWM, wall time; writes ``OUT.json`` and ``OUT.md``.

Needs: edgekit's dependencies; ``tomli_w`` (the stages write their recipe, compress its bundle's
with it: without it the script stops at once naming the fix); onnxsim only for the in-memory
contrast of a model under the protobuf limit (without it that export is not simplified, noted in
the row). The streamed path never runs onnxsim (its export writes every weight to external data).

Why per stage in subprocesses: a process's peak never goes down, so stages measured in one process
would hide each other; VmHWM is exact per process, the tree sample catches child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("synth", "load", "calibrate", "prune", "baseline", "export", "quantize", "validate", "compress",
          "compress-memory", "validate-bundle")


def _children(pid: int) -> list[int]:
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += kids.get(q, [])
    return out


def tree_rss_mb(pid: int) -> float:
    total = 0
    for q in _children(pid):
        try:
            with open(f"/proc/{q}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total / 1024


def run_sampled(cmd: list[str], env=None, limit_mb: float = 0.0) -> dict:
    """Run ``cmd``; sample its process tree's RSS; the stage prints its own result as JSON last.
    ``limit_mb`` > 0: kill the tree when its RSS passes it."""
    import signal

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    peak, killed = [0.0], [False]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mb(p.pid))
            if limit_mb and peak[0] > limit_mb and not killed[0]:
                killed[0] = True
                os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    res = {"peak_tree_rss_mb": round(peak[0], 1), "wall_s": round(wall, 1), "returncode": p.returncode}
    if killed[0]:
        res["killed_over_limit_mb"] = limit_mb
    last = [line for line in out.strip().splitlines() if line.startswith("{")]
    if last:
        res.update(json.loads(last[-1]))
    if p.returncode != 0:
        res["error"] = err.strip().splitlines()[-1] if err.strip() else "failed"
    return res


# ---------------------------------------------------------------------------------------------
# stages (run in a subprocess: ``memory.py --stage NAME``)
# ---------------------------------------------------------------------------------------------
def _tokens(split: str, n: int):
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import load_tokens

    return load_tokens(split, load_tokenizer("v3-nano"), n)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _recipe(a, work: Path, simplify: bool = True) -> Path:
    """cpu4 with the scale runs' settings: half the routed experts, no distillation, bounded data;
    ``simplify=False``: no onnxsim on the in-memory export (where onnxsim is not installed)."""
    import tomli_w

    from edgekit.recipes import load_recipe, recipe_dict

    d = recipe_dict(load_recipe("cpu4"))
    if not simplify:
        d["export"]["simplify"] = False
    d["target"]["name"] = "cpu4"
    d["prune"].update(experts=a.experts, recover_steps=0, calib_max_tokens=a.calib_tokens)
    d["quantize"].update(calib_max_tokens=a.quant_tokens, mode="dynamic")
    d.setdefault("smooth", {}).update(calib_max_tokens=a.quant_tokens)
    d["validate"].update(eval_max_tokens=a.eval_tokens, runs=a.runs, warmup=2)
    d["build"] = {"device": a.device, "stream": "true"}
    p = work / "recipe.toml"
    p.write_text(tomli_w.dumps(d))
    return p


def stage(name: str, a) -> dict:
    import torch

    from edgekit.latency import peak_rss_mb

    torch.set_num_threads(a.threads or torch.get_num_threads())
    work = Path(a.work)
    ck, pruned, int8 = work / "ckpt", work / "pruned", work / "int8"
    info = {}
    if name == "synth":
        from edgekit.synth import synth
        synth(a.shape, ck, seed=0, dtype=a.dtype)
    elif name == "load":
        from edgekit.checkpoint import load
        m = load(ck)
        info["params"] = sum(p.numel() for p in m.parameters())
    elif name == "calibrate":
        from edgekit.stream import collect_stats_streamed
        collect_stats_streamed(ck, _tokens("calib", a.calib_tokens + 1), seq_len=256, device=a.device)
    elif name == "prune":
        from edgekit.prune import PruneConfig
        from edgekit.stream import prune_streamed
        prune_streamed(ck, pruned, PruneConfig(experts=a.experts, calib_max_tokens=a.calib_tokens),
                       _tokens("calib", None), device=a.device)
    elif name == "baseline":
        from edgekit.stream import evaluate_streamed
        info["accuracy"] = evaluate_streamed(ck, _tokens("eval", a.eval_tokens), seq_len=512,
                                             device=a.device).accuracy
    elif name == "export":
        from edgekit.export import ExportConfig
        from edgekit.export.layered import export_layered
        from edgekit.validate import graph_bytes
        export_layered(ck, work / "onnx-fp32", ExportConfig(simplify=False, external_data_threshold=0))
        info["onnx_bytes"] = graph_bytes(work / "onnx-fp32")
    elif name == "quantize":
        from edgekit.export.layered import export_layered
        from edgekit.lazy import CheckpointReader
        from edgekit.pipeline import STAGE_CONFIGS
        from edgekit.quantize import quantize_export
        from edgekit.quantize.mixed import overrides_plan
        from edgekit.recipes import load_recipe
        from edgekit.stream import smooth_streamed
        r = load_recipe(str(_recipe(a, work)), STAGE_CONFIGS)
        smooth_streamed(pruned, work / "smoothed", _tokens("calib", a.quant_tokens + 1), r.smooth, device=a.device)
        export_layered(work / "smoothed", work / "onnx-pruned", r.export, tokenizer_from=ck)
        plan = overrides_plan(work / "onnx-pruned", r.quantize, CheckpointReader(pruned).args, r.quantize.max_drop)
        info["int8_bytes"] = quantize_export(work / "onnx-pruned", int8, plan)["size_bytes"]
    elif name == "validate":
        from edgekit.recipes import load_recipe
        from edgekit.validate import validate
        meta = json.loads((work / "results.json").read_text())
        base = {"accuracy": meta["baseline"].get("accuracy", 0.0), "onnx_bytes": meta["export"]["onnx_bytes"]}
        rep = validate(int8, load_recipe(str(_recipe(a, work))), base, _tokens("eval", a.eval_tokens))
        info.update(size_ratio=rep["gates"]["size_ratio"]["value"], accuracy=rep["compressed"]["accuracy"],
                    prefill_p95_ms=rep["gates"]["latency_prefill_p95_ms"]["value"],
                    decode_p95_ms=rep["gates"]["latency_decode_p95_ms"]["value"])
    elif name == "validate-bundle":
        from edgekit.validate import validate_bundle
        rep = validate_bundle(work / "bundle")
        info.update(status=rep["status"], accuracy=rep["compressed"]["accuracy"],
                    bundle_bytes=rep["compressed"]["size_bytes"],
                    gates={k: (g["status"], g.get("value")) for k, g in rep.get("gates", {}).items()
                           if g.get("status") not in ("pass", None)})
    elif name in ("compress", "compress-memory"):
        from edgekit.pipeline import compress
        simplify = name == "compress" or _has("onnxsim")
        if not simplify:
            info["note"] = "onnxsim is not installed here: the in-memory export was not simplified"
        res = compress(ck, str(_recipe(a, work, simplify)), out=work / "bundle", use_cache=False, force=True,
                       stream=name == "compress", device=a.device)
        info.update(exit_code=res.exit_code, status=res.report["status"],
                    gates={k: g["status"] for k, g in res.report["gates"].items()},
                    accuracy={"fp32": res.report["baseline"]["accuracy"], "int8": res.report["compressed"]["accuracy"]},
                    size_bytes={"fp32_onnx": res.report["baseline"]["onnx_bytes"],
                                "bundle": res.report["compressed"]["size_bytes"]},
                    stages=[{k: r.get(k) for k in ("name", "seconds", "peak_rss_mb", "device")}
                            for r in res.report["timings"]])
    info["vmhwm_mb"] = round(peak_rss_mb(), 1)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="v3-400m")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp8"])
    ap.add_argument("--work", default="/tmp/edgekit-mem")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--stages", default="synth,load,compress",
                    help=f"comma list of {', '.join(STAGES)} (default: the checkpoint, the in-memory load for "
                         "contrast, the whole streamed compress with its per-stage peaks)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--experts", type=float, default=0.5, help="fraction of routed experts removed")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--quant-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=5, help="validate latency repetitions")
    ap.add_argument("--rss-limit-gb", type=float, default=0.0,
                    help="kill a stage whose process tree passes this many GB (0: no limit)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        print(json.dumps(stage(a.stage, a)))
        return
    if not _has("tomli_w"):   # the stages write their recipe, and compress writes the bundle's, with it
        sys.exit("memory.py: tomli_w is not installed (edgekit's recipes are written with it): pip install "
                 "'tomli-w>=1.0,<2', or on a machine without an index install it into a folder elsewhere "
                 "(pip install --target DIR tomli-w), bring DIR along and add it to PYTHONPATH")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    base = [sys.executable, __file__, "--shape", a.shape, "--dtype", a.dtype, "--work", str(work), "--device",
            a.device, "--threads", str(a.threads), "--experts", str(a.experts), "--calib-tokens",
            str(a.calib_tokens), "--quant-tokens", str(a.quant_tokens), "--eval-tokens", str(a.eval_tokens),
            "--runs", str(a.runs)]
    from edgekit.info import shape_info

    fp32_gb = shape_info(a.shape)["params_total"] * 4 / 1e9
    print(f"{a.shape}: fp32 checkpoint {fp32_gb:.2f} GB; stages in subprocesses, tree RSS sampled every 50 ms")
    for name in a.stages.split(","):
        r = run_sampled(base + ["--stage", name], limit_mb=a.rss_limit_gb * 1e3)
        results[name] = r
        results_file.write_text(json.dumps(results, indent=1))
        gb = r["peak_tree_rss_mb"] / 1e3
        print(f"  {name:10s} peak {gb:6.2f} GB = {gb / fp32_gb:5.2f}x "
              f"the fp32 checkpoint (own VmHWM {r.get('vmhwm_mb', 0) / 1e3:.2f} GB), {r['wall_s']:7.1f} s"
              + (f"  KILLED over {a.rss_limit_gb} GB" if "killed_over_limit_mb" in r else
                 f"  ERROR {r['error']}" if "error" in r else ""), flush=True)
        for row in r.get("stages", []):
            if row.get("peak_rss_mb"):
                where = row.get("device") or "-"
                print(f"      {row['name']:45s} peak {row['peak_rss_mb'] / 1e3:6.2f} GB = "
                      f"{row['peak_rss_mb'] / 1e3 / fp32_gb:5.2f}x, {row['seconds']:7.1f} s ({where})")
    ck_bytes = sum(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors")) if (work / "ckpt").exists() else 0
    doc = {"shape": a.shape, "dtype": a.dtype, "params": shape_info(a.shape)["params_total"],
           "fp32_checkpoint_gb": round(fp32_gb, 3), "checkpoint_files_gb": round(ck_bytes / 1e9, 3),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "processor": platform.processor()},
           "args": {k: v for k, v in vars(a).items() if k != "stage"},
           "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]), "stages": results}
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
        rows = ["| stage | peak RSS (process tree) | x fp32 checkpoint | own VmHWM | wall s | notes |",
                "|---|---|---|---|---|---|"]
        for name, r in results.items():
            notes = {k: v for k, v in r.items() if k not in ("peak_tree_rss_mb", "wall_s", "returncode", "vmhwm_mb")}
            gb = r["peak_tree_rss_mb"] / 1e3
            notes.pop("stages", None)
            rows.append(f"| {name} | {gb:.2f} GB | {gb / fp32_gb:.2f} | "
                        f"{r.get('vmhwm_mb', 0) / 1e3:.2f} GB | {r['wall_s']} | {json.dumps(notes)} |")
            for st in r.get("stages", []):
                if st.get("peak_rss_mb"):
                    where = st.get("device") or "-"
                    rows.append(f"| &nbsp;&nbsp;{name}: {st['name']} | | {st['peak_rss_mb'] / 1e3 / fp32_gb:.2f} | "
                                f"{st['peak_rss_mb'] / 1e3:.2f} GB | {st['seconds']} | ran on {where} |")
        Path(a.out + ".md").write_text(
            f"# Peak memory per stage: {a.shape} ({fp32_gb:.2f} GB fp32)\n\n`{doc['command']}`\n\n"
            f"{os.cpu_count()} CPUs, {platform.platform()}\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
