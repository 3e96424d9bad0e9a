"""Validation on onnxruntime CPU: accuracy, latency, size and memory against a recipe's goals.

What: ``validate(model_dir, recipe, baseline, eval_tokens)`` measures the compressed model and
returns the report dict (schema in ``edgekit/report.py``): accuracy of the bundle against the fp32
torch model's accuracy on the same eval tokens (``baseline["accuracy"]``), prefill/decode latency
p50/p95 after warm-up in a clean subprocess configured from the target (threads, spinning), graph
size against the fp32 ONNX size (``baseline["onnx_bytes"]``) and peak RSS.
``validate_bundle(bundle, target=None)`` re-runs this on whatever machine it is called on — the
device validation run — using the baseline recorded in the bundle's report at build time.

Invariants: a latency gate is ``unverified``, never ``pass``, when the host cannot represent the
target (``host.latency_unverified_reason``). No torch import: this runs on devices.
"""

from __future__ import annotations

import time
from pathlib import Path

from .host import host_facts, latency_unverified_reason
from .latency import measure
from .report import gate, overall


def graph_bytes(d: Path, fmt: str = "onnx") -> int:
    """Bytes of the model a device loads from an export or bundle dir: the ``.ort`` model for
    ``fmt="ort"`` when there is one, else the ONNX graph files (+ external data)."""
    files = [p for p in Path(d).iterdir() if p.is_file()]
    ort_files = [p for p in files if p.suffix == ".ort"]
    if fmt == "ort" and ort_files:
        return sum(p.stat().st_size for p in ort_files)
    return sum(p.stat().st_size for p in files if p.suffix == ".onnx" or p.name.endswith(".onnx.data"))


def score(model_dir: Path, eval_tokens, seq_len: int, threads: int | None = None, batch_size: int = 2) -> dict:
    """Accuracy of the graph in ``model_dir`` on ``eval_tokens``. ``batch_size`` windows per run:
    onnxruntime keeps every activation of a run (and its arena keeps the largest run's), which for
    8 windows of 512 tokens outweighed the int8 weights (scores are per window: the batch changes
    only float rounding); the session is released before returning."""
    from .evaluate import evaluate
    from .heap import release
    from .runtime.session import OrtModel

    m = OrtModel(model_dir, threads=threads)
    out = evaluate(m, eval_tokens, seq_len=seq_len, batch_size=batch_size, progress=False).to_dict()
    del m
    release()
    return out


def validate(model_dir: str | Path, recipe, baseline: dict, eval_tokens, facts: dict | None = None) -> dict:
    d = Path(model_dir)
    t, goals, v = recipe.target, recipe.goals, recipe.validate
    facts = facts or host_facts()
    t0 = time.perf_counter()
    acc = score(d, eval_tokens, v.seq_len, threads=min(t.threads, facts["cores"]))
    why = latency_unverified_reason(t, facts)
    # more threads than cores only measures oversubscription; the gate is unverified then anyway
    lat = measure(d, threads=min(t.threads, facts["cores"]), spinning=t.spinning, prefill_tokens=goals.prefill_tokens,
                  decode_tokens=v.decode_tokens, runs=v.runs, warmup=v.warmup, session_config=t.session_config,
                  rounds=v.rounds)

    def per_round(key: str) -> dict:    # rounds > 1: the gate's value is their median p95; keep each round's
        rounds = lat[key].get("rounds")
        return {"rounds_p95": [r["p95"] for r in rounds]} if rounds else {}

    size = graph_bytes(d, t.format)
    drop = baseline["accuracy"] - acc["accuracy"]
    ratio = size / baseline["onnx_bytes"]
    gates = {
        "accuracy_drop": gate(drop, goals.accuracy_drop, baseline_accuracy=baseline["accuracy"],
                              accuracy=acc["accuracy"], tokens=acc["tokens"]),
        # a model at 0% accuracy cannot drop (accuracy >= 0), so its relative drop is 0
        "accuracy_drop_relative": gate(drop / baseline["accuracy"] if baseline["accuracy"] else 0.0,
                                       goals.accuracy_drop_relative, note="drop / fp32 accuracy"),
        "latency_prefill_p95_ms": gate(lat["prefill_ms"]["p95"], goals.latency_prefill_p95_ms, unverified_reason=why,
                                       p50=lat["prefill_ms"]["p50"], tokens=goals.prefill_tokens,
                                       **per_round("prefill_ms")),
        "latency_decode_p95_ms": gate(lat["decode_ms"]["p95"], goals.latency_decode_p95_ms, unverified_reason=why,
                                      p50=lat["decode_ms"]["p50"], **per_round("decode_ms")),
        "size_ratio": gate(ratio, goals.size_ratio, goal=goals.size_ratio_goal,
                           goal_met=ratio <= goals.size_ratio_goal, bytes=size, fp32_bytes=baseline["onnx_bytes"]),
    }
    if why:
        facts = {**facts, "latency_unverified": why}
    return {
        "target": t.name,
        "status": overall(gates),
        "gates": gates,
        "host": facts,
        "baseline": baseline,
        "compressed": {**acc, "size_bytes": size, "latency": lat, "peak_rss_mb": lat["peak_rss_mb"]},
        "validate_seconds": round(time.perf_counter() - t0, 1),
    }


def validate_bundle(bundle: str | Path, target: str | None = None, eval_data: str | None = None) -> dict:
    """Re-validate a bundle on this machine (writes nothing; the caller decides where the report goes)."""
    from .bundle import build_baseline, read_tokenizer, verify
    from .data import load_tokens
    from .recipes import load_recipe

    b = Path(bundle)
    manifest = verify(b)
    baseline = build_baseline(b, manifest)
    recipe = load_recipe(str(target) if target else str(b / "recipe.toml"))
    default = f"{recipe.data.domain}/eval" if recipe.data.domain else "eval"   # the text the gate was built on
    tokens = load_tokens(eval_data or default, read_tokenizer(b, "bundle"), recipe.validate.eval_max_tokens or None)
    report = validate(b, recipe, baseline, tokens)
    report["bundle"] = {"path": str(b), "model_name": manifest["model_name"], "built_for": manifest["target"],
                        "edgekit_version": manifest["edgekit_version"]}
    return report
