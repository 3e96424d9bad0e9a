"""Accuracy of the int8 graph one checkout of edgekit writes for the shipped v3-nano, to compare two
checkouts' graph construction (export + int8 pass) on the same weights, plan and tokens.

    PYTHONPATH=<checkout A> python benchmarks/graph_ab.py build --work /tmp/ab/A --moe row
    PYTHONPATH=<checkout B> python benchmarks/graph_ab.py build --work /tmp/ab/B --moe row
    python benchmarks/graph_ab.py compare /tmp/ab/A/int8-row /tmp/ab/B/int8-row

What: ``build`` exports the shipped v3-nano (fp32, contrib MoE op) with the edgekit found on
PYTHONPATH, rewrites it to int8 with one fixed plan (every linear, the embedding and the routed
experts int8 by ``--moe``, routers fp32, fp16 latent cache; no smoothing, pruning or planning, so
only the graph code differs between two builds), and scores next-token accuracy on the eval split
(first ``--eval-tokens``) on onnxruntime, writing ``result.json`` and the predictions next to the
graph. ``compare`` prints both accuracies and the share of tokens whose top-1 prediction agrees.

Why: a graph restructuring that is not bit-identical (e.g. fewer routing nodes) must keep int8
accuracy within noise; the paired comparison on the same tokens shows that far more tightly than
two full ``edgekit compress`` runs (whose stages all rebuild when the code changes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def build(work: Path, moe: str, eval_tokens: int, threads: int) -> dict:
    from edgekit.checkpoint import load, load_tokenizer
    from edgekit.data import load_tokens
    from edgekit.evaluate import evaluate
    from edgekit.export import ExportConfig, export
    from edgekit.quantize import Plan, quantize_export
    from edgekit.quantize.apply import quantizable_units
    from edgekit.runtime import OrtModel

    model = load().eval()
    tokens = load_tokens("eval", load_tokenizer(), max_tokens=eval_tokens)
    fp32 = export(model, work / "fp32", ExportConfig(moe="contrib"))
    spec = json.loads((fp32 / "export.json").read_text())
    int8 = quantizable_units(spec) - {u for u in spec["units"] if u.endswith("mlp.gate")}
    out = work / f"int8-{moe}"
    quantize_export(fp32, out, Plan(int8=int8, moe_path=moe, cache="fp16"))
    r, pred = evaluate(OrtModel(out, threads=threads), tokens, seq_len=256, batch_size=8, progress=False,
                       return_predictions=True)
    np.save(out / "predictions.npy", np.asarray(pred))
    res = {"moe": moe, **r.to_dict()}
    (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return res


def compare(a: Path, b: Path) -> dict:
    ra, rb = ({k: v for k, v in json.loads((d / "result.json").read_text()).items() if k != "edgekit"}
              for d in (a, b))
    pa, pb = (np.load(d / "predictions.npy") for d in (a, b))
    res = {"a": ra, "b": rb, "agreement": float((pa == pb).mean()), "tokens": int(pa.size),
           "accuracy_diff_points": round(100 * (rb["accuracy"] - ra["accuracy"]), 3)}
    print(f"accuracy A {100 * ra['accuracy']:.3f}% B {100 * rb['accuracy']:.3f}% "
          f"(B - A {res['accuracy_diff_points']:+.3f} points, stderr {100 * ra['accuracy_stderr']:.2f}); "
          f"top-1 agreement {100 * res['agreement']:.2f}% of {res['tokens']} tokens")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--moe", default="row", choices=["row", "block", "grouped"])
    b.add_argument("--eval-tokens", type=int, default=65536)
    b.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.work, a.moe, a.eval_tokens, a.threads)
    else:
        res = compare(a.a, a.b)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
