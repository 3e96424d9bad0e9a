"""``edgekit compress`` for checkpoints larger than memory: every stage holds one decoder layer.

What: ``compress_streamed(src, recipe, ...)`` runs the pipeline's stages on a
``CheckpointReader`` instead of a loaded model:
baseline (streamed torch accuracy on the eval tokens + the size of a layer-by-layer fp32 export)
-> prune (``stream.prune_streamed``: statistics, plan, surgery, written shard by shard)
-> score pruned fp32 (streamed torch) -> SmoothQuant + layer-by-layer export + int8 rewrite
(``quantize.layered.quantize_streamed``) -> validate (onnxruntime on the int8 graph, as the
in-memory path) -> bundle (``pipeline.write_bundle``). Stage artifacts are cached like the
in-memory path's (``StageCache``).

Why: the in-memory pipeline holds the model several times over (teacher copy, reference copy for
the precision search, the traced export and its protobuf, the fp32 onnxruntime sessions): 55.6 GB
for a 6.4 GB checkpoint. Here peak memory is a few layers + hidden states of the calibration rows
+ embeddings + onnxruntime's session of the (int8) bundle.

Same results: each streamed stage equals its in-memory counterpart on the same inputs (stats, pruned
checkpoint, smoothed weights, evaluation bit for bit; int8 graph outputs, tests/test_stream*.py).
What the streamed path does not do, and says so: distillation after pruning (``recover_steps``
must be 0), the emulated mixed-precision search (every unit the overrides allow is int8) and
static activation scales; the fp32 baseline's latency is not measured (it would need the whole
fp32 graph in one onnxruntime session).

Devices: torch work (statistics, smoothing statistics, evaluation) runs on ``device`` (auto: CUDA
when present); each stage's row in the report says where it ran.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from .device import pick, where
from .errors import EdgekitError
from .stagecache import dir_digest


def check_streamable(recipe) -> None:
    if recipe.prune.recover_steps:
        raise EdgekitError(f"streamed compression cannot distill (prune recover_steps={recipe.prune.recover_steps}); "
                           "set recover_steps = 0 in the recipe, or pass --no-stream if the model fits in memory")
    if recipe.quantize.mode != "dynamic":
        raise EdgekitError(f"streamed compression uses dynamic activation scales (quantize mode="
                           f"{recipe.quantize.mode!r}); set mode = \"dynamic\" or pass --no-stream")


def compress_streamed(src: Path, recipe, tok, calib, eval_tokens, out: Path, strict: bool, cache, console,
                      device: str = "auto"):
    from .export import ExportConfig
    from .export.layered import export_layered
    from .lazy import CheckpointReader
    from .pipeline import CompressResult, Stages, _tokens_hash, features_of, write_bundle
    from .quantize.layered import quantize_streamed
    from .stream import evaluate_streamed, prune_streamed
    from .validate import graph_bytes, validate

    check_streamable(recipe)
    dev = pick(device)
    ran_on = where(dev)
    st = Stages(console, total=6)
    reader = CheckpointReader(src)
    seq = recipe.validate.seq_len
    src_key = dir_digest(src)

    def do_baseline(tmp: Path):
        res = evaluate_streamed(reader, eval_tokens, seq_len=seq, device=dev)
        export_layered(reader, tmp / "onnx", ExportConfig(moe=recipe.export.moe, simplify=False))
        meta = {**res.to_dict(), "onnx_bytes": graph_bytes(tmp / "onnx"), "params": _params(reader.args),
                "latency": None, "streamed": True,
                "note": "fp32 torch accuracy (streamed); size of the unpruned fp32 ONNX export (layer by layer); "
                        "its latency is not measured in streamed mode"}
        shutil.rmtree(tmp / "onnx")
        (tmp / "meta.json").write_text(json.dumps(meta))

    bkey = [src_key, _tokens_hash(eval_tokens), seq, recipe.export.moe, "streamed"]
    bdir = st.run("baseline (streamed fp32 accuracy + ONNX size)",
                  lambda: cache.get("baseline-streamed", bkey, do_baseline), device=ran_on)
    baseline = json.loads((bdir / "meta.json").read_text())
    key = [src_key, _tokens_hash(calib), dataclasses.asdict(recipe.prune), "streamed"]
    pdir = st.run("prune (streamed)", lambda: cache.get(
        "prune-streamed", key, lambda tmp: prune_streamed(reader, tmp / "ckpt", recipe.prune, calib, device=dev)),
        device=ran_on)
    pruned = pdir / "ckpt"
    if not (pruned / "tokenizer.json").exists() and (src / "tokenizer.json").exists():
        shutil.copy(src / "tokenizer.json", pruned / "tokenizer.json")

    def score_pruned():
        f = pdir / "meta.json"
        meta = json.loads(f.read_text()) if f.exists() else {}
        k = f"accuracy:{_tokens_hash(eval_tokens)}:{seq}"
        if k not in meta:
            meta[k] = evaluate_streamed(pruned, eval_tokens, seq_len=seq, device=dev).accuracy
            f.write_text(json.dumps(meta))
        return meta[k]

    pruned_acc = st.run("score pruned fp32 (streamed)", score_pruned, device=ran_on)
    left = recipe.goals.accuracy_drop * 0.75 - (baseline["accuracy"] - pruned_acc)
    floor = recipe.goals.accuracy_drop / 4
    qcfg = dataclasses.replace(recipe.quantize, export_moe=recipe.export.moe,
                               max_drop=round(min(recipe.quantize.max_drop, max(floor, left)), 5))
    st.log(f"pruning cost {100 * (baseline['accuracy'] - pruned_acc):.2f} points; int8 budget "
           f"{100 * qcfg.max_drop:.2f} points")
    key += [dataclasses.asdict(recipe.export), dataclasses.asdict(qcfg)]
    qdir = st.run("scale + export + int8 (streamed)", lambda: cache.get(
        "quantize-streamed", key, lambda tmp: quantize_streamed(pruned, tmp / "int8", qcfg, calib, tokenizer_from=src,
                                                                 device=dev, log=st.log)), device=ran_on)
    quantized = qdir / "int8"
    recipe = dataclasses.replace(recipe, quantize=qcfg)
    report = st.run("validate", lambda: validate(quantized, recipe, baseline, eval_tokens), device="cpu (onnxruntime)")
    pruned_params = _params(CheckpointReader(pruned).args)
    report["stages"] = [
        {"name": "fp32", "params": baseline["params"], "accuracy": baseline["accuracy"],
         "size_bytes": baseline["onnx_bytes"]},
        {"name": "pruned fp32", "params": pruned_params, "accuracy": pruned_acc, "size_bytes": None},
        {"name": "int8 bundle", "params": pruned_params, "accuracy": report["compressed"]["accuracy"],
         "size_bytes": report["compressed"]["size_bytes"]},
    ]
    report["timings"] = st.rows
    report["stage_cache_hits"] = cache.hits
    report["model"] = str(src)
    report["streamed"] = True
    report["devices"] = {r["name"]: r.get("device") for r in st.rows}
    for k, f in {"pruning": pruned / "prune.json", "quantization": quantized / "quantize.json"}.items():
        if f.exists():
            report[k] = json.loads(f.read_text())
    bundle = st.run("bundle", lambda: write_bundle(out, quantized, src, recipe, report,
                                                   features_of(recipe) + ["streamed-pipeline"], src.name, tok))
    failed = [k for k, g in report["gates"].items() if g["status"] == "fail"]
    unverified = [k for k, g in report["gates"].items() if g["status"] == "unverified"]
    return CompressResult(report, bundle, 1 if failed or (strict and unverified) else 0)


def _params(args) -> int:
    from .shapes import meta_model

    return sum(p.numel() for p in meta_model(args).parameters())


def should_stream(src: Path, fraction: float = 0.25) -> bool:
    """Stream when the fp32 model would take more than ``fraction`` of the memory available now."""
    from .lazy import CheckpointReader

    args = CheckpointReader(src).args
    need = _params(args) * 4
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return False
    return need > fraction * avail
