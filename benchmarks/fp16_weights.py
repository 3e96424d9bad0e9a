"""fp16 storage of the float units (``[quantize] float_weights = "fp16"``): size and logits, same run.

    python benchmarks/fp16_weights.py FP32_EXPORT PLAN_JSON [--eval-tokens 8192] [--threads 1]
        [--out benchmarks/results/fp16_weights.json]

FP32_EXPORT is an ``edgekit export`` directory (the compress pipeline's ``export`` stage), PLAN_JSON
the ``plan.json`` planned on it (its ``plan`` stage). Writes four graphs with
``edgekit.quantize.quantize_export`` into a scratch dir: the plan with float weights fp32 and fp16,
and the plan with no int8 unit (every unit float) stored fp32 and fp16. Prints per graph the
``model.onnx`` bytes, the ``model.ort`` bytes (onnxruntime's converter, as the mobile target ships
it), the next-token accuracy on the first ``--eval-tokens`` of the eval split, and against the same
plan in fp32 storage: max |logit difference| / max |logit|, and top-1 agreement over those tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    import numpy as np

    from edgekit.bundle import read_tokenizer
    from edgekit.data import load_tokens, windows
    from edgekit.host import host_facts
    from edgekit.mobile import convert_to_ort
    from edgekit.quantize import Plan, quantize_export
    from edgekit.runtime.session import OrtModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export")
    ap.add_argument("plan")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    planned = Plan.load(a.plan)
    toks = load_tokens("eval", read_tokenizer(Path(a.export), "export"), a.eval_tokens)
    rows = windows(np.asarray(toks, np.int64), a.seq_len)
    work = Path(tempfile.mkdtemp(prefix="edgekit-fp16-"))
    out = []
    try:
        logits = {}
        for int8 in ("plan", "none"):
            for fw in ("fp32", "fp16"):
                p = Plan(**{**planned.to_dict(), "float_weights": fw, **({} if int8 == "plan" else
                                                                        {"int8": set(), "fp32": {}})})
                d = work / f"{int8}-{fw}"
                rep = quantize_export(a.export, d, p)
                convert_to_ort(d / "model.onnx", d)
                m = OrtModel(d, threads=a.threads)
                lg = np.concatenate([m.logits(r[None, :-1])[0] for r in rows])
                tgt = np.concatenate([r[1:] for r in rows])
                logits[(int8, fw)] = lg
                ref = logits[(int8, "fp32")]
                out.append({"int8_units": len(p.int8), "float_weights": fw,
                            "onnx_bytes": (d / "model.onnx").stat().st_size,
                            "ort_bytes": (d / "model.ort").stat().st_size,
                            "fp16_bytes_saved": (rep["graph"].get("fp16") or {}).get("bytes_fp32", 0)
                            - (rep["graph"].get("fp16") or {}).get("bytes_fp16", 0),
                            "accuracy": float((lg.argmax(-1) == tgt).mean()),
                            "max_rel_logit_diff_vs_fp32_storage": float(np.abs(lg - ref).max() / np.abs(ref).max()),
                            "top1_agreement_vs_fp32_storage": float((lg.argmax(-1) == ref.argmax(-1)).mean())})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'graph':<28} {'onnx MB':>8} {'ort MB':>8} {'accuracy':>9} {'max rel dlogit':>15} {'top-1 agree':>12}")
    for r in out:
        name = f"{r['int8_units']} int8 units, float {r['float_weights']}"
        print(f"{name:<28} {r['onnx_bytes'] / 1e6:8.3f} {r['ort_bytes'] / 1e6:8.3f} {100 * r['accuracy']:8.2f}% "
              f"{r['max_rel_logit_diff_vs_fp32_storage']:15.2e} {r['top1_agreement_vs_fp32_storage']:12.4f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"host": host_facts(), "threads": a.threads,
                                           "eval_tokens": int(rows[:, 1:].size), "rows": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
