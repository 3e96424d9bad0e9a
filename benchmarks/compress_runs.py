"""Tabulate and plot `edgekit compress` runs from their build reports (report.json).

What: each report gives one point: recipe knobs that differ between runs (routed experts removed,
distillation text and steps, 4-bit expert layout), size ratio, accuracy on the gated eval split, the
drop in points and relative to fp32, the out-of-domain drops, and whether every gate passed. Writes
OUT.md, OUT.json and OUT.png (size ratio vs both drops with the gates, as frontier.py draws them).
Why: the runs that chose a recipe are separate compress calls (often on a lent GPU, two at a time);
this puts their measured numbers side by side without re-running anything.

Usage: python benchmarks/compress_runs.py REPORT.json [REPORT.json ...] --out benchmarks/results/NAME
       [--note TEXT]   (a point is named after its file: runs/rows-9of16-train.json -> rows-9of16-train)
Failure modes: a file that is not an edgekit build report -> one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.frontier import plot  # noqa: E402


def point(name: str, r: dict) -> dict:
    """One run's row from its build report."""
    g, p = r["gates"], r["pruning"]["config"]
    q = r["quantization"]["config"]
    d = r.get("domains") or {}
    return {"name": name, "experts_removed": p["experts"], "recover": d.get("recover"),
            "recover_steps": p["recover_steps"], "recover_batch_size": p["recover_batch_size"],
            "fake_quant": p.get("recover_fake_quant", ""), "int4_moe_rows": bool(q.get("int4_moe_rows")),
            "size_bytes": r["compressed"]["size_bytes"], "size_ratio": g["size_ratio"]["value"],
            "fp32_accuracy": r["baseline"]["accuracy"], "accuracy": r["compressed"]["accuracy"],
            "stderr": r["compressed"].get("accuracy_stderr"), "tokens": r["compressed"]["tokens"],
            "drop_points": 100 * g["accuracy_drop"]["value"],
            "drop_relative_pct": 100 * g["accuracy_drop_relative"]["value"],
            "out_of_domain": {k: 100 * v["drop_points"] for k, v in d.get("out_of_domain", {}).items()},
            "status": r["status"], "cores": r["host"].get("cores"), "onnxruntime": r["host"].get("onnxruntime"),
            "recover_seconds": next((t["seconds"] for t in r.get("timings", []) if t["name"].startswith("prune")),
                                    None)}


def markdown(res: dict) -> str:
    pts = res["points"]
    ood = sorted({k for p in pts for k in p["out_of_domain"]})
    lines = [f"# `edgekit compress` runs: {res['model']}, target domain {res['domain']}", "",
             f"`{res['command']}`", "", *([res["note"], ""] if res.get("note") else []),
             f"Eval: the whole `{res['domain']}/eval` split ({pts[0]['tokens']:,} tokens), fp32 "
             f"{100 * pts[0]['fp32_accuracy']:.2f}%; drops in points of next-token accuracy (stderr of each "
             f"accuracy ~{100 * max(p['stderr'] or 0 for p in pts):.2f}).", "",
             "| run | experts removed | distillation text | steps x batch | 4-bit experts | size MB | size ratio | "
             "accuracy | drop (points) | drop (relative) | " + "".join(f"{d} drop | " for d in ood)
             + "gates | prune + recover s |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(ood) + "---|---|"]
    for p in pts:
        lines.append(f"| {p['name']} | {p['experts_removed']:.4g} | {p['recover']} | "
                     f"{p['recover_steps']} x {p['recover_batch_size']} | "
                     f"{'rows' if p['int4_moe_rows'] else 'blocks'} | "
                     f"{p['size_bytes'] / 1e6:.2f} | {p['size_ratio']:.4f} | {100 * p['accuracy']:.2f}% | "
                     f"{p['drop_points']:+.2f} | {p['drop_relative_pct']:+.2f}% | "
                     + "".join(f"{p['out_of_domain'][d]:+.2f} | " if d in p["out_of_domain"] else "- | " for d in ood)
                     + f"{p['status']} | {p['recover_seconds'] or 0:.0f} |")
    lines += ["", "Gates: size ratio <= 0.25 (goal 0.125, aim 0.1), drop <= 0.8 points and <= 0.8% relative "
              "(both); out-of-domain drops are reported, not gated.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix (.md/.json/.png)")
    ap.add_argument("--note", default="", help="a line under the command (machine, how the runs were made)")
    a = ap.parse_args(argv)
    pts, model, domain = [], None, None
    for f in a.reports:
        try:
            r = json.loads(f.read_text())
            pts.append(point(f.stem, r))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {f} is not an edgekit build report ({type(e).__name__}: {e}); pass report.json files "
                  "that `edgekit compress` wrote", file=sys.stderr)
            return 2
        model = model or Path(r["model"]).name
        domain = domain or (r.get("domains") or {}).get("target", "")
    res = {"model": model, "domain": domain, "note": a.note, "points": pts,
           "command": "python benchmarks/compress_runs.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(res))
    plot(res, a.out.with_suffix(".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
