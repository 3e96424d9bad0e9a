"""Portable (plain-ONNX) MoE path: fp32 vs int8, same machine, same threads, same run.

    python benchmarks/portable_int8.py FP32_EXPORT INT8_EXPORT [MORE_EXPORTS...] [--threads 1] [--runs 20]
        [--out benchmarks/results/portable_int8.json]

Each directory is an ``edgekit export`` / ``edgekit quantize`` output (or a bundle). Prints and
writes size, prefill-128 p50/p95, decode ms/token p50/p95 (``edgekit.latency.measure``: a clean
subprocess per model, after warm-up) and next-token accuracy on the first ``--eval-tokens`` of the
eval split, plus each row's ratio to the first row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import load_tokens
    from edgekit.host import host_facts
    from edgekit.latency import measure
    from edgekit.validate import graph_bytes, score

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    tokens = load_tokens("eval", load_tokenizer(a.dirs[0]), a.eval_tokens)
    rows = []
    for d in a.dirs:
        spec = json.loads((Path(d) / "export.json").read_text())
        lat = measure(d, threads=a.threads, spinning=False, prefill_tokens=128, decode_tokens=32, runs=a.runs,
                      warmup=3)
        acc = score(Path(d), tokens, 512, threads=a.threads)["accuracy"]
        rows.append({"dir": str(d), "moe": spec.get("moe"), "dtype": spec.get("dtype"),
                     "experts": sorted(set((spec.get("quantization") or {}).get("moe", {}).values())),
                     "size_mb": graph_bytes(Path(d)) / 1e6, "prefill_p50_ms": lat["prefill_ms"]["p50"],
                     "prefill_p95_ms": lat["prefill_ms"]["p95"], "decode_p50_ms": lat["decode_ms"]["p50"],
                     "decode_p95_ms": lat["decode_ms"]["p95"], "accuracy": acc})
    first = rows[0]
    print(f"{'variant':<40} {'MB':>6} {'prefill p50/p95 ms':>20} {'decode p50/p95 ms':>19} {'acc':>7}  vs first")
    for r in rows:
        name = f"{r['moe']} {r['dtype']} {'/'.join(r['experts'])}".strip()
        print(f"{name:<40} {r['size_mb']:6.2f} {r['prefill_p50_ms']:9.2f} / {r['prefill_p95_ms']:8.2f} "
              f"{r['decode_p50_ms']:8.3f} / {r['decode_p95_ms']:8.3f} {100 * r['accuracy']:6.2f}%  "
              f"prefill x{r['prefill_p50_ms'] / first['prefill_p50_ms']:.2f}, "
              f"decode x{r['decode_p50_ms'] / first['decode_p50_ms']:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"host": host_facts(), "threads": a.threads, "runs": a.runs,
                                           "eval_tokens": int(len(tokens)), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
