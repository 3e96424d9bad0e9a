"""Where prefill and decode time goes at scale, and what the int8 expert path changes.

    python benchmarks/scale_speed.py --shape v3-1.6b --experts 16 --threads 4,16 \
        --moe row,grouped --profile --out benchmarks/results/scale_v3-1.6b

For a named shape (``edgekit/data/shapes.toml``; ``--experts N`` keeps N routed experts per MoE
layer, as structured expert pruning would; ``--layers N`` keeps the first N decoder layers, for
profiling a big shape's per-layer graph on a small machine), random init (std 0.02, ``edgekit.synth.random_model``):
exports the fp32 graph once, rewrites it to int8 with each ``--moe`` path (``edgekit.quantize.
quantize_export``: every linear, the embedding and the routed experts int8, routers fp32), then per
path and thread count measures prefill (``--prefill`` tokens) and decode ms/token in a clean
process (``edgekit.latency.measure``) and, with ``--profile``, runs onnxruntime's profiler and sums
kernel time per op type and per layer kind (routed experts, shared expert, attention, dense FFN,
lm_head, int8 quantization glue, other fp32 ops), prefill and decode separately.

Writes OUT.json (everything, including each profile's tables) and OUT.md (the tables), and prints
as it goes. Artifacts are kept in ``--work`` and reused by a later run with the same settings.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)


def layer_kind(name: str, op: str) -> str:
    """Profile bucket of a node, from the names the export and the int8 rewrite give nodes."""
    if re.match(r"^(moe\.\d+|m\d+)", name):
        return "routed experts (all ops)"
    m = re.match(r"^q8:([^:]+):([\w.]+)", name)
    if m:
        tag, what = m.groups()
        part = {"attn": "attention", "shared": "shared expert", "mlp": "dense FFN"}.get(tag.split(".")[-1],
                                                                                      tag.split(".")[-1])
        return f"{part} int8 GEMM" if what == "gemm" else "int8 quantize/rescale glue"
    if "/gate/" in name or "gate" in name.split("/")[-1].lower():
        return "router (fp32)"
    if "layernorm" in name or "norm" in name:
        return "RMSNorm (fp32)"
    if re.match(r"^/(ffn|mlp)\.?\d*/", name) and "shared_experts" not in name:
        return "MoE routing glue (fp32)"
    return "attention core + other fp32 ops"


def summarize_profile(path: Path, runs: int, skip_runs: int = 0) -> dict:
    """Per op type and per layer kind: ms per run (kernel time) and share; the first ``skip_runs``
    session runs (a prefill before decode steps) are left out."""
    events = json.loads(path.read_text())
    starts = sorted((ev["ts"] + ev.get("dur", 0)) for ev in events if ev.get("name") == "model_run")
    after = starts[skip_runs - 1] if skip_runs and len(starts) >= skip_runs else -1
    by_op, by_kind, by_kind_op = collections.Counter(), collections.Counter(), collections.Counter()
    nodes = collections.Counter()
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time") or ev.get("ts", 0) < after:
            continue
        args = ev.get("args", {})
        op, name = args.get("op_name", "?"), ev["name"][: -len("_kernel_time")]
        if op in ("If", "Loop", "Scan"):      # their time includes their subgraph's nodes, logged too
            continue
        us = ev.get("dur", 0)
        by_op[op] += us
        by_kind[layer_kind(name, op)] += us
        by_kind_op[f"{layer_kind(name, op)} / {op}"] += us
        nodes[op] += 1
    total = sum(by_op.values()) or 1
    table = lambda c: {k: {"ms_per_run": round(v / 1e3 / runs, 3), "share": round(v / total, 4)}  # noqa: E731
                       for k, v in c.most_common()}
    return {"kernel_ms_per_run": round(total / 1e3 / runs, 2), "by_op_type": table(by_op),
            "by_layer_kind": table(by_kind), "by_kind_and_op": dict(list(table(by_kind_op).items())[:25]),
            "nodes_run_per_run": {k: v // runs for k, v in nodes.most_common()}}


PROFILE_WORKER = r"""
import json, sys, numpy as np, onnxruntime as ort
from edgekit.runtime.session import OrtModel
d, phase, out = sys.argv[1], sys.argv[3], sys.argv[6]
threads, tokens, runs = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
m = OrtModel(d, threads=threads)
ids = np.random.default_rng(0).integers(2, m.vocab_size, (1, tokens))
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
so.enable_profiling = True; so.profile_file_prefix = out
m.session = ort.InferenceSession(d + "/" + m.spec["graph"], so, providers=["CPUExecutionProvider"])
if phase == "prefill":
    for _ in range(runs):
        m.prefill(ids)
else:
    last, cache = m.prefill(ids)
    tok = np.asarray([int(last.argmax(-1)[0])])
    for _ in range(runs):
        m.decode(tok, cache)
print(m.session.end_profiling())
"""


def profile(d: Path, threads: int, phase: str, tokens: int, runs: int, work: Path) -> dict:
    prefix = str(work / f"prof_{d.name}_{phase}_t{threads}")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", PROFILE_WORKER, str(d), str(threads), phase, str(tokens),
                          str(runs), prefix], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return summarize_profile(Path(out.stdout.strip().splitlines()[-1]), runs, skip_runs=int(phase == "decode"))


def plan_for(path: str, int8: set[str], calibrated: dict | None = None):
    """``grouped+fold``, ``grouped+nb8``, ``grouped+nb4b128``, ``row``: moe path + kernel flags;
    ``+static``: the calibrated static activation scales (``calibrated``) for linears and experts;
    ``+cache16``: the fp16 latent cache; ``+branch``: grouped experts' elementwise work in one If per
    expert (the layout before "batched")."""
    from edgekit.quantize import Plan

    parts = path.split("+")
    nb = next((p for p in parts[1:] if p.startswith("nb")), None)
    kernel, block = "integer", 32
    if nb:
        bits, _, blk = nb[2:].partition("b")
        kernel, block = f"nbits{bits}", int(blk or 32)
    st = calibrated if "static" in parts else {}
    cache = "fp16" if "cache16" in parts else "fp32"
    return Plan(int8=int8, moe_path=parts[0], wmax=63.0, fold="fold" in parts, kernel=kernel, nbits_block=block,
                static_scales=st.get("linears", {}), expert_scales=st.get("experts", {}), cache=cache,
                moe_layout="branch" if "branch" in parts else "batched")


def calibrate(model, vocab: int, tokens: int = 512, seq: int = 128) -> dict:
    """Static activation scales from random-token rows (speed runs: the values do not matter)."""
    import numpy as np

    from edgekit.quantize.emulate import expert_absmax, input_absmax, units

    rows = np.random.default_rng(0).integers(2, vocab, (tokens // seq, seq + 1))
    lin = [n for n, m in units(model).items() if hasattr(m, "in_features") and not n.endswith("mlp.gate")]
    return {"linears": {n: float(v.max()) for n, v in input_absmax(model, rows, lin).items()},
            "experts": {n: [x, list(h)] for n, (x, h) in expert_absmax(model, rows).items()}}


def build(shape: str, experts: int | None, work: Path, moe_paths: list[str],
          layers: int | None = None) -> dict[str, Path]:
    from edgekit.checkpoint import args_from_config
    from edgekit.export import ExportConfig, export
    from edgekit.quantize import quantize_export
    from edgekit.quantize.apply import quantizable_units
    from edgekit.quantize.emulate import units
    from edgekit.shapes import shape_config
    from edgekit.synth import random_model

    cfg = shape_config(shape)
    if experts:
        cfg["n_routed_experts"] = experts
    if layers:
        cfg["num_hidden_layers"] = layers
    args = args_from_config(cfg)
    fp32 = work / "fp32"
    out = {}
    model = None
    if not (fp32 / "export.json").exists() or any(not (work / p / "export.json").exists() for p in moe_paths):
        model = random_model(args)
        n = sum(p.numel() for p in model.parameters())
        log(f"{shape} with {args.n_routed_experts} routed experts: {n / 1e6:.1f}M parameters")
    if not (fp32 / "export.json").exists():
        export(model, fp32, ExportConfig(moe="contrib", simplify=False))
        log("fp32 export done")
    out["fp32"] = fp32
    int8, cal = None, None
    for path in moe_paths:
        d = work / f"int8-{path}"
        if not (d / "export.json").exists():
            int8 = int8 or {n for n in units(model) if not n.endswith("mlp.gate")} & quantizable_units(
                json.loads((fp32 / "export.json").read_text()))
            if "static" in path.split("+"):
                cal = cal or calibrate(model, args.vocab_size)
            quantize_export(fp32, d, plan_for(path, int8, cal))
            log(f"int8 ({path}) rewrite done")
        out[f"int8-{path}"] = d
    return out


def size_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.glob("model.onnx*")) / 1e6


def main(argv=None) -> dict:
    from edgekit.shapes import shape_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="v3-1.6b", choices=shape_names())
    ap.add_argument("--experts", type=int, default=None, help="routed experts kept per MoE layer")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers kept (the first N)")
    ap.add_argument("--threads", default="4")
    ap.add_argument("--moe", default="row,grouped",
                    help="int8 expert paths: row (QMoE), block (QMoE), grouped; '+fold': column scales in the kernel "
                         "(grouped+fold is the batched layout `edgekit compress` builds; plain grouped runs one If "
                         "per expert)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--parallel", default="0", help="'0', '1' or '0,1': onnxruntime's parallel executor too")
    ap.add_argument("--session-config", default="",
                    help="onnxruntime session config variants to time besides the default, ';'-separated, each "
                    "a ','-list of KEY=VALUE (e.g. 'session.dynamic_block_base=4'); timed one after another, so on a "
                    "drifting host A/B a setting with decode_ab.py --config-after instead")
    ap.add_argument("--dir", type=Path, default=None,
                    help="time (and --profile) this export or bundle as it is instead of building --shape")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "scale")
    ap.add_argument("--out", type=Path, required=True, help="output prefix (.json and .md are appended)")
    a = ap.parse_args(argv)
    from edgekit.host import host_facts
    from edgekit.latency import measure

    name = f"{a.shape}-e{a.experts or 'all'}" + (f"-l{a.layers}" if a.layers else "")
    work = a.work / (a.dir.name if a.dir else name)
    work.mkdir(parents=True, exist_ok=True)
    if a.dir:   # one given graph: its rows are keyed "int8-<dir name>"
        paths, dirs = [a.dir.name], {f"int8-{a.dir.name}": a.dir}
    else:
        paths = [p for p in a.moe.split(",") if p]
        dirs = build(a.shape, a.experts, work, paths, a.layers)
    res = {"shape": str(a.dir) if a.dir else a.shape, "experts": a.experts, "host": host_facts(),
           "python": platform.python_version(),
           "command": "python benchmarks/scale_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "sizes_mb": {k: round(size_mb(d), 1) for k, d in dirs.items()}, "latency": {}, "profiles": {}}
    import onnxruntime
    res["onnxruntime"] = onnxruntime.__version__
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        a.out.with_suffix(".md").write_text(render(res))

    configs = [""] + [c.strip() for c in a.session_config.split(";") if c.strip()]
    for t in [int(x) for x in a.threads.split(",")]:
        for name, par, sc in [(f"int8-{p}", par, sc) for p in paths for par in a.parallel.split(",")
                              for sc in configs]:
            lat = measure(dirs[name], threads=t, prefill_tokens=a.prefill, decode_tokens=a.decode_tokens,
                          runs=a.runs, warmup=2, parallel=par == "1",
                          session_config=dict(kv.split("=", 1) for kv in sc.split(",") if kv))
            key = f"{name}{'+parallel' if par == '1' else ''}{f'+[{sc}]' if sc else ''}@{t}"
            res["latency"][key] = {k: lat[k] for k in ("prefill_ms", "decode_ms", "peak_rss_mb") if k in lat}
            log(f"{key}: prefill p50 {lat['prefill_ms']['p50']:.1f} p95 {lat['prefill_ms']['p95']:.1f} ms"
                f" | decode p50 {lat['decode_ms']['p50']:.2f} p95 {lat['decode_ms']['p95']:.2f} ms/token")
            save()
            if a.profile and t == int(a.threads.split(",")[0]) and par == a.parallel.split(",")[0] and not sc:
                for phase, runs in (("prefill", 4), ("decode", 16)):
                    res["profiles"][f"{name}@{t}:{phase}"] = p = profile(dirs[name], t, phase, a.prefill, runs, work)
                    top = list(p["by_layer_kind"].items())[:4]
                    log(f"  profile {phase}: kernel {p['kernel_ms_per_run']} ms/run; "
                        + ", ".join(f"{k} {v['share']:.0%}" for k, v in top))
                    save()
    save()
    return res


def render(res: dict) -> str:
    lines = [f"# {res['shape']} ({res['experts'] or 'all'} routed experts), onnxruntime {res.get('onnxruntime')}",
             "", f"Host: {res['host']}", "", f"Command: `{res['command']}`", "",
             "| graph | MB | threads | prefill p50 / p95 ms | decode p50 / p95 ms/token | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for key, v in res["latency"].items():
        name, t = key.split("@")
        mb = res["sizes_mb"].get(name.split("+[")[0].removesuffix("+parallel"), "")
        lines.append(f"| {name} | {mb} | {t} | {v['prefill_ms']['p50']:.1f} / "
                     f"{v['prefill_ms']['p95']:.1f} | {v['decode_ms']['p50']:.2f} / {v['decode_ms']['p95']:.2f} | "
                     f"{v.get('peak_rss_mb', 0):.0f} |")
    for key, p in res["profiles"].items():
        lines += ["", f"## Profile {key}: {p['kernel_ms_per_run']} ms kernel time per run", "",
                  "| layer kind | ms/run | share |", "|---|---|---|"]
        lines += [f"| {k} | {v['ms_per_run']} | {v['share']:.1%} |" for k, v in p["by_layer_kind"].items()]
        lines += ["", "| op type | ms/run | share | nodes run |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['ms_per_run']} | {v['share']:.1%} | {p['nodes_run_per_run'].get(k, '')} |"
                  for k, v in list(p["by_op_type"].items())[:15]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
