"""edgekit int8 vs fp32 onnxruntime vs ``onnxruntime.quantization.quantize_dynamic`` (defaults).

Run: ``python benchmarks/quant_bench.py [--models v3-nano v3-50m] [--reps 15] [--eval-tokens 32768]``
(one command, one machine, one run; ~10-20 min on 2 cores). Per model it builds, in a work dir:
- ``fp32``: ``edgekit.export`` (contrib MoE op), the graph both baselines start from;
- ``ort-dynamic``: ``quantize_dynamic(fp32/model.onnx)`` with its defaults;
- ``edgekit-int8``: ``edgekit.quantize.quantize_`` (SmoothQuant folded into norms, symmetric int8,
  QMoE, accuracy-aware plan) on a copy of the same model.
Then it measures, interleaving the variants round-robin so machine noise hits all alike (medians):
size of model.onnx, prefill of 128 tokens (``OrtModel.prefill``), decode ms/token at ~128 tokens
of context (``OrtModel.decode``, IO-bound latent cache), and for the trained v3-nano the next-token
accuracy on the eval split (quantize_dynamic's drop beside ours). v3-50m is random-init (the named
shape in edgekit/data/shapes.toml): its accuracy is meaningless, so top-1 agreement with fp32
on random ids is printed instead. Results: ``benchmarks/results/quant_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.shapes import shape_config  # noqa: E402

V3_50M = shape_config("v3-50m")


def make_model(name: str):
    import torch

    from edgekit import checkpoint
    from edgekit.model import ModelArgs, Transformer
    if name == "v3-nano":
        return checkpoint.load("v3-nano").eval()
    torch.manual_seed(0)
    return Transformer(ModelArgs(**V3_50M)).eval()


def build(name: str, work: Path, calib_tokens: int) -> dict[str, Path]:
    import copy

    from onnxruntime.quantization import quantize_dynamic

    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import load_tokens
    from edgekit.export import ExportConfig, export
    from edgekit.quantize import QuantConfig, quantize_

    model = make_model(name)
    d = {"fp32": work / "fp32", "ort-dynamic": work / "ort-dynamic", "edgekit-int8": work / "edgekit-int8"}
    t = time.perf_counter()
    export(model, d["fp32"], ExportConfig(moe="contrib"), tokenizer_from="v3-nano")
    print(f"[{name}] fp32 export {time.perf_counter() - t:.1f}s", flush=True)
    shutil.rmtree(d["ort-dynamic"], ignore_errors=True)
    shutil.copytree(d["fp32"], d["ort-dynamic"])
    t = time.perf_counter()
    quantize_dynamic(str(d["fp32"] / "model.onnx"), str(d["ort-dynamic"] / "model.onnx"))
    print(f"[{name}] quantize_dynamic {time.perf_counter() - t:.1f}s", flush=True)
    calib = load_tokens("calib", load_tokenizer("v3-nano"))
    t = time.perf_counter()
    rep = quantize_(copy.deepcopy(model), d["edgekit-int8"], QuantConfig(calib_max_tokens=calib_tokens),
                    calib_tokens=calib, tokenizer_from="v3-nano")
    print(f"[{name}] edgekit quantize_ {time.perf_counter() - t:.1f}s; fp32 units: {rep['fp32_units']}", flush=True)
    return d, rep


def speed(dirs: dict[str, Path], reps: int, threads: int) -> dict[str, dict]:
    from edgekit.runtime.session import OrtModel

    ms = {k: OrtModel(v, threads=threads) for k, v in dirs.items()}
    V = next(iter(ms.values())).vocab_size
    ids = np.random.default_rng(0).integers(0, V, (1, 128))
    pre = {k: [] for k in ms}
    dec = {k: [] for k in ms}
    for _ in range(reps):
        for k, m in ms.items():
            t = time.perf_counter()
            logits, cache = m.prefill(ids, capacity=128 + 40)
            pre[k].append(time.perf_counter() - t)
            tok = logits.argmax(-1)
            for _w in range(2):
                tok = m.decode(tok, cache).argmax(-1)
            t = time.perf_counter()
            for _d in range(16):
                tok = m.decode(tok, cache).argmax(-1)
            dec[k].append((time.perf_counter() - t) / 16)
    return {k: {"prefill128_ms": 1e3 * float(np.median(pre[k])), "decode_ms": 1e3 * float(np.median(dec[k])),
                "prefill128_ms_p90": 1e3 * float(np.percentile(pre[k], 90)),
                "decode_ms_p90": 1e3 * float(np.percentile(dec[k], 90))} for k in ms}


def accuracy(dirs: dict[str, Path], name: str, eval_tokens: int) -> dict[str, dict]:
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import load_tokens
    from edgekit.evaluate import evaluate
    from edgekit.runtime.session import OrtModel

    out, base = {}, None
    if name == "v3-nano":
        toks = load_tokens("eval", load_tokenizer("v3-nano"), max_tokens=eval_tokens)
    else:
        toks = np.random.default_rng(1).integers(0, V3_50M["vocab_size"], 4097)
    for k, d in dirs.items():
        r, pred = evaluate(OrtModel(d), toks, seq_len=512, progress=False, return_predictions=True)
        base = pred if base is None else base
        out[k] = {"accuracy": r.accuracy, "perplexity": r.perplexity, "tokens": r.tokens,
                  "top1_agreement_fp32": float((pred == base).mean())}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["v3-nano", "v3-50m"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--work", default="/tmp/edgekit_quant_bench")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    logging.disable(logging.WARNING)          # quantize_dynamic's shape-inference chatter
    for name in a.models:
        work = Path(a.work) / name
        dirs, rep = build(name, work, a.calib_tokens if name == "v3-nano" else min(a.calib_tokens, 2048))
        sizes = {k: sum(p.stat().st_size for p in d.glob("model.onnx*")) / 1e6 for k, d in dirs.items()}
        sp = speed(dirs, a.reps, a.threads)
        acc = accuracy(dirs, name, a.eval_tokens)
        f, q, e = sp["fp32"], sp["ort-dynamic"], sp["edgekit-int8"]
        print(f"\n== {name}: {a.reps} interleaved reps, {a.threads} threads, medians ==")
        print(f"{'variant':14s} {'MB':>7s} {'prefill128 ms':>14s} {'decode ms/tok':>14s} "
              f"{'accuracy':>9s} {'top1=fp32':>9s}")
        for k in dirs:
            print(f"{k:14s} {sizes[k]:7.2f} {sp[k]['prefill128_ms']:14.2f} {sp[k]['decode_ms']:14.3f} "
                  f"{acc[k]['accuracy'] * 100:8.2f}% {acc[k]['top1_agreement_fp32'] * 100:8.2f}%")
        ratios = {
            "size_vs_fp32": sizes["edgekit-int8"] / sizes["fp32"],
            "prefill_speedup_vs_quantize_dynamic": q["prefill128_ms"] / e["prefill128_ms"],
            "decode_speedup_vs_quantize_dynamic": q["decode_ms"] / e["decode_ms"],
            "decode_speedup_vs_fp32": f["decode_ms"] / e["decode_ms"],
            "prefill_speedup_vs_fp32": f["prefill128_ms"] / e["prefill128_ms"],
            "accuracy_drop_points_edgekit": (acc["fp32"]["accuracy"] - acc["edgekit-int8"]["accuracy"]) * 100,
            "accuracy_drop_points_quantize_dynamic": (acc["fp32"]["accuracy"] - acc["ort-dynamic"]["accuracy"]) * 100,
        }
        for k, v in ratios.items():
            print(f"  {k:42s} {v:7.3f}")
        res = {"model": name, "reps": a.reps, "threads": a.threads, "sizes_mb": sizes, "speed": sp,
               "accuracy": acc, "ratios": ratios, "quantize_report": rep}
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"quant_{name}.json").write_text(json.dumps(res, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
