"""Distillation throughput (tokens/s) for 1 vs N processes with edgekit.dist (FSDP2, data-parallel).

What: the recovery step of ``edgekit prune`` (``edgekit.distill.distill_``: teacher forward, student
forward + backward, AdamW) on a random-init V3 model of ``--shape`` (teacher) and the same model
with half its routed experts removed (student), timed after ``--warmup`` steps. Weak scaling: every
rank runs ``--batch-per-rank`` windows of ``--seq-len`` tokens per step, so N ranks process N times
the tokens of one; tokens/s = global batch x seq_len x timed steps / seconds, and the scaling
efficiency is tokens/s(N) / (N x tokens/s(1)).

Two ways to run it:

- one measurement, launched by torchrun (one node or several)::

      torchrun --nproc-per-node 2 benchmarks/dist_bench.py --shape v3-1.6b --json-out r2.json

- the comparison in one run (launches ``python -m torch.distributed.run`` on 127.0.0.1 for each N,
  then writes OUT.json + OUT.md with tokens/s and efficiency against the 1-process run)::

      python benchmarks/dist_bench.py --shape v3-1.6b --nprocs 1,2 --out benchmarks/results/dist_h200_1.6b

One process (N=1, ``WORLD_SIZE`` 1) runs edgekit's plain single-device path; N > 1 runs FSDP2
copies of teacher and student (``edgekit.dist.fsdp_copy``), one GPU per rank when CUDA is present
(NCCL), else CPU processes over gloo (``--device cpu``; a functional check, not a GPU figure).

Invariants: the same seed gives every rank the same models and windows; rank 0 alone prints and
writes; a failure in any run makes the launcher exit non-zero and write nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgekit import __version__, dist  # noqa: E402
from edgekit.distill import DistillConfig, distill_  # noqa: E402
from edgekit.model import Transformer  # noqa: E402
from edgekit.prune.surgery import LayerPlan, Plan, apply_plan_  # noqa: E402
from edgekit.shapes import shape_args, shape_names  # noqa: E402


def models(shape: str, seed: int = 0) -> tuple[Transformer, Transformer]:
    """Random-init teacher of ``shape`` and a student with the first half of each MoE layer's experts."""
    torch.manual_seed(seed)
    teacher = Transformer(shape_args(shape)).eval()
    plan = Plan(list(range(teacher.args.num_hidden_layers)))
    for i in plan.layers:
        la = teacher.args.for_layer(i)
        if la.is_moe:
            plan.per_layer[i] = LayerPlan(experts=torch.arange(la.n_routed_experts // 2))
    student = Transformer(teacher.args)
    student.load_state_dict(teacher.state_dict())
    return teacher, apply_plan_(student, plan)


def measure(a) -> dict | None:
    """One measurement in this process group (every rank calls it; rank 0 returns the row)."""
    w = dist.init_from_env()
    teacher, student = models(a.shape, a.seed)
    tokens = np.random.default_rng(a.seed).integers(0, teacher.args.vocab_size, 1 << 20)
    cfg = DistillConfig(steps=a.warmup + a.steps, batch_size=a.batch_per_rank * w.size, seq_len=a.seq_len,
                        device=a.device, progress=False)
    stamps = []
    cuda = a.device != "cpu" and torch.cuda.is_available()
    t0 = time.perf_counter()
    distill_(student, teacher, tokens, cfg, on_step=lambda i, loss: stamps.append((time.perf_counter(), loss)))
    total = time.perf_counter() - t0
    timed = stamps[-1][0] - stamps[a.warmup - 1][0]
    tokens_timed = a.steps * cfg.batch_size * cfg.seq_len
    row = {
        "world_size": w.size, "backend": (torch.distributed.get_backend() if w.enabled else "none"),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "shape": a.shape, "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "global_batch": cfg.batch_size, "seq_len": cfg.seq_len, "warmup_steps": a.warmup, "timed_steps": a.steps,
        "tokens_per_s": round(tokens_timed / timed, 1), "seconds_timed": round(timed, 3),
        "seconds_total_incl_setup": round(total, 3), "first_losses": [round(s[1], 6) for s in stamps[:3]],
        "peak_gpu_mem_gb_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "torch": torch.__version__, "edgekit": __version__, "omp_threads": torch.get_num_threads(),
    }
    dist.shutdown()
    return row if w.is_main else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a, n: int) -> dict:
    """Run ``measure`` under torchrun with ``n`` processes on this host (loopback rendezvous)."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "row.json"
        own = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
               if k in ("shape", "seq_len", "batch_per_rank", "steps", "warmup", "seed", "device")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), __file__, *own, "--json-out", str(out)]
        # the same intra-op threads per process for every N (torchrun sets 1 only when N > 1)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
        if a.device == "cpu":
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        print("$ " + " ".join(cmd), file=sys.stderr)
        p = subprocess.run(cmd, env=env, cwd=ROOT)
        if p.returncode:
            sys.exit(f"dist_bench: the {n}-process run failed (exit {p.returncode}); nothing written")
        return json.loads(out.read_text())


def _write(path: Path, text: str) -> None:
    """Complete or absent: a temp file beside ``path``, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["world_size"] == 1), None)
    lines = ["| processes | backend | device | global batch x seq | tokens/s | vs 1 process | scaling efficiency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        lines.append(f"| {r['world_size']} | {r['backend']} | {r['device']} | {r['global_batch']} x {r['seq_len']} "
                     f"| {r['tokens_per_s']:,.0f} | {x:.2f}x | {x / r['world_size']:.0%} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=shape_names(), default="v3-nano", help="a shape of edgekit/data/shapes.toml")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-per-rank", type=int, default=4, help="windows per rank per step (weak scaling)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (FSDP lazy init, kernels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=1, help="with --nprocs: OMP_NUM_THREADS of every process")
    ap.add_argument("--nprocs", default=None, help="comma list, e.g. 1,2: launch one torchrun per count here")
    ap.add_argument("--out", default=None, help="with --nprocs: write OUT.json and OUT.md")
    ap.add_argument("--json-out", default=None, help="under torchrun: rank 0 writes its row here")
    ap.add_argument("--note", default="", help="with --nprocs: a label stored in the results")
    a = ap.parse_args()
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if a.nprocs is None:
        row = measure(a)
        if row is not None:
            print(json.dumps(row))
            if a.json_out:
                _write(Path(a.json_out), json.dumps(row))
        return
    rows = [launch(a, int(n)) for n in a.nprocs.split(",")]
    md = table(rows)
    print(md)
    if a.out:
        out = Path(a.out)
        result = {"note": a.note, "command": shlex.join(["python", *sys.argv]),
                  "host_cpus": os.cpu_count(), "rows": rows}
        _write(out.with_name(out.name + ".json"), json.dumps(result, indent=1) + "\n")
        _write(out.with_name(out.name + ".md"), f"{a.note}\n\n`{result['command']}`\n\n{md}\n")


if __name__ == "__main__":
    main()
