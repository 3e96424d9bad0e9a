"""Pruning study for v3-nano: parameters and next-token accuracy per kind and ratio of structured
pruning, before and after distillation recovery.

Run:  python benchmarks/prune_study.py                 (default plan, ~20-40 min on 2 cores)
      python benchmarks/prune_study.py --quick         (fewer rows, smaller eval subset)
      python benchmarks/prune_study.py --only "experts 75%" --recover-data .corpus/train.txt \
          --recover-steps 400 --recover-lr 5e-4 --out benchmarks/results/prune_study_train400
          (KD on the training text, git-ignored: ``python -m edgekit.nano.corpus`` builds it)

Writes benchmarks/results/prune_study.{md,json} and prints the table. Every row is pruned from the
same unpruned model with importance measured on the calibration split; recovery is KD from the
unpruned model (``edgekit.distill``) on ``--recover-data`` (default: the calibration split, the only
text the shipped pipeline has). Accuracy is top-1 next-token accuracy on the first
``--eval-tokens`` tokens of the eval split (windows of 512; 0 = whole split), never trained on.
"Cost" = accuracy points lost (after recovery) per 10% of the parameters removed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.checkpoint import load, load_tokenizer  # noqa: E402
from edgekit.data import load_tokens  # noqa: E402
from edgekit.distill import distill_  # noqa: E402
from edgekit.evaluate import evaluate  # noqa: E402
from edgekit.info import param_count  # noqa: E402
from edgekit.prune import PruneConfig, prune_  # noqa: E402

# (label, PruneConfig fields): one kind at a time at several ratios, then combinations aimed at >= 40%.
PLAN = [
    ("experts 25%", dict(experts=0.25)),
    ("experts 50%", dict(experts=0.5)),
    ("experts 75%", dict(experts=0.75)),
    ("heads 25%", dict(heads=0.25)),
    ("ffn 25%", dict(ffn=0.25)),
    ("layers 1", dict(layers=1)),
    ("experts 50% + ffn 30%", dict(experts=0.5, ffn=0.3)),
]
QUICK = ["experts 50%", "heads 25%", "ffn 25%", "layers 1"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: shipped v3-nano)")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="eval-split prefix scored (0: all)")
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--recover-data", default="calib", help="split name or text file for KD")
    ap.add_argument("--recover-lr", type=float, default=2e-4)
    ap.add_argument("--recover-batch-size", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated row labels to run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune_study"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    teacher, tok = load(a.model), load_tokenizer(a.model)
    calib = load_tokens("calib", tok)
    recover = calib if a.recover_data == "calib" else load_tokens(a.recover_data, tok)
    ev = load_tokens("eval", tok)
    ev = ev[: a.eval_tokens + 1] if a.eval_tokens else ev
    n0 = param_count(teacher)
    t = time.time()
    base = evaluate(teacher, ev, progress=False)
    eval_s = time.time() - t
    print(f"unpruned: {n0:,} params, accuracy {100 * base.accuracy:.2f} ({base.tokens} eval tokens, {eval_s:.0f} s)",
          flush=True)
    wanted = set(a.only.split(",")) if a.only else set(QUICK) if a.quick else None
    seen, rows = set(), []
    for label, kw in PLAN:
        if label in seen or (wanted is not None and label not in wanted):
            continue
        seen.add(label)
        cfg = PruneConfig(**kw, recover_steps=a.recover_steps, recover_lr=a.recover_lr,
                          recover_batch_size=a.recover_batch_size)
        t = time.time()
        student = prune_(copy.deepcopy(teacher), PruneConfig(**kw), calib, progress=False)
        prune_s = time.time() - t
        acc0 = evaluate(student, ev, progress=False).accuracy
        t = time.time()
        distill_(student, teacher, recover, cfg.distill_config(progress=False))
        kd_s = time.time() - t
        acc1 = evaluate(student, ev, progress=False).accuracy if a.recover_steps else acc0
        n = param_count(student)
        removed = 1 - n / n0
        drop = 100 * (base.accuracy - acc1)
        row = dict(label=label, config=kw, params=n, removed=removed, acc_pruned=acc0, acc_recovered=acc1,
                   drop_points=drop, cost_per_10pct=drop / (10 * removed) if removed else None,
                   prune_s=round(prune_s, 1), recover_s=round(kd_s, 1),
                   recover_steps_per_s=round(a.recover_steps / kd_s, 2) if a.recover_steps else None)
        rows.append(row)
        print(f"{label:28s} params {n:>9,} (-{100 * removed:4.1f}%)  acc {100 * acc0:6.2f} -> {100 * acc1:6.2f}  "
              f"drop {drop:+5.2f} pts  prune {prune_s:.0f}s KD {kd_s:.0f}s", flush=True)
    write(a, base, n0, rows, eval_s)


def write(a, base, n0, rows, eval_s):
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(model=a.model or "v3-nano", params=n0, accuracy=base.accuracy, accuracy_stderr=base.accuracy_stderr,
                eval_tokens=base.tokens, eval_s=round(eval_s, 1), recover_steps=a.recover_steps,
                recover_data=a.recover_data, recover_lr=a.recover_lr, recover_batch_size=a.recover_batch_size,
                recover_seq_len=PruneConfig().recover_seq_len, threads=a.threads, torch=torch.__version__,
                machine=f"{platform.machine()}, {os.cpu_count()} cpus", defaults=asdict(PruneConfig()))
    lines = [f"Unpruned {meta['model']}: {n0:,} parameters, next-token accuracy {100 * base.accuracy:.2f} "
             f"(± {100 * base.accuracy_stderr:.2f}) on {base.tokens:,} eval tokens. Recovery: {a.recover_steps} KD "
             f"steps (batch {a.recover_batch_size} x {meta['recover_seq_len']}, lr {a.recover_lr}) on "
             f"`{a.recover_data}`.", "",
             "| pruning | params | removed | acc pruned | acc recovered | drop (pts) | pts per 10% removed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cost = f"{r['cost_per_10pct']:.2f}" if r["cost_per_10pct"] is not None else "-"
        lines.append(f"| {r['label']} | {r['params']:,} | {100 * r['removed']:.1f}% | {100 * r['acc_pruned']:.2f} | "
                     f"{100 * r['acc_recovered']:.2f} | {r['drop_points']:+.2f} | {cost} |")
    md = "\n".join(lines) + "\n"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(md)
    os.replace(tmp, out.with_suffix(".md"))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    print("\n" + md + f"\nwrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
