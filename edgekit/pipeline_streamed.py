"""``edgekit compress --stream``: the pipeline's stages for checkpoints larger than memory, one
decoder layer in memory at a time.

What: the same stage walk, artifacts and cache entries as ``edgekit.pipeline`` (its diagram), with
each stage's function swapped for its layer-by-layer counterpart:

    stage      streamed function                          in-memory counterpart
    baseline   baseline_for: stream.evaluate_streamed +   pipeline.baseline_for
               export.layered.export_layered (its size)
    prune      stream.prune_streamed                      prune.prune_checkpoint (no distillation)
    smooth     stream.smooth_streamed                     smooth.smooth_checkpoint
    export     export.layered.export_layered              export.export (same units, model hash)
    score      stream.evaluate_streamed (fp32 torch on    pipeline._cached_accuracy (fp32 ONNX)
               the smoothed checkpoint: fp32 unchanged)
    plan       quantize.mixed.overrides_plan              quantize.mixed.plan_ (emulated search)
    quantize   quantize.apply.quantize_export             the same pass (weights read per unit)

then validate and bundle as in-memory (``pipeline._compress``). ``build`` returns the same
``Built`` record, so ``_compress`` runs either walk.

Why: the in-memory pipeline holds the model several times over (teacher copy, reference copy for
the precision search, the traced export and its protobuf, the fp32 onnxruntime sessions): 55.6 GB
for a 6.4 GB checkpoint. Here peak memory is a few layers + hidden states of the calibration rows
+ embeddings, and then onnxruntime's session of the int8 graph (validation).

Same results: each streamed stage equals its in-memory counterpart on the same inputs (statistics,
pruned and smoothed checkpoints, evaluation, the export's units), and the plan equals ``plan_``'s
whenever all-int8 is within the budget, so the bundles agree (tests/test_stream_compress.py).
What the streamed path does not do, and ``check_streamable`` says so before any work: distillation
after pruning (``recover_steps`` must be 0), static activation scales, ``--auto``, torchrun; and
the precision search (a miss of the budget shows in the accuracy gate). The fp32 baseline's
latency is not measured (it needs the whole fp32 graph in one onnxruntime session).

Devices: torch work (statistics, smoothing statistics, evaluation) runs on the ``Stages``'s device
(auto: CUDA when present); each stage's row says where it ran.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from .device import pick, where
from .errors import EdgekitError
from .stagecache import dir_digest


def check_streamable(recipe, auto: bool = False, distributed: bool = False) -> None:
    """One-line errors for what the streamed pipeline cannot do, before any work."""
    if recipe.prune.recover_steps:
        raise EdgekitError(f"streamed compression cannot distill (prune recover_steps={recipe.prune.recover_steps}); "
                           "set recover_steps = 0 in the recipe, or pass --no-stream if the model fits in memory")
    if recipe.quantize.mode != "dynamic":
        raise EdgekitError(f"streamed compression uses dynamic activation scales (quantize mode="
                           f"{recipe.quantize.mode!r}); set mode = \"dynamic\" or pass --no-stream")
    if getattr(recipe.quantize, "expert_scales", "dynamic") == "static":
        raise EdgekitError("streamed compression plans without calibrating expert activations ([quantize] "
                           "expert_scales = \"static\"); set expert_scales = \"dynamic\" or pass --no-stream")
    if auto:
        raise EdgekitError("--auto searches candidates in memory; pass --no-stream (or drop --auto)")
    if distributed:
        raise EdgekitError("streamed compression runs in one process; run without torchrun (or pass --no-stream)")


def should_stream(src: Path, fraction: float = 0.25) -> bool:
    """Stream when the fp32 model would take more than ``fraction`` of the memory available now."""
    from .lazy import CheckpointReader

    need = _params(CheckpointReader(src).args) * 4
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return False
    return need > fraction * avail


def _params(args) -> int:
    from .info import param_count
    from .shapes import meta_model

    return param_count(meta_model(args))


def external(export_config):
    """``export_config`` with every weight in external data (``model.onnx.data``): the layered
    export then streams each layer's weights to disk as it goes, the graph it holds has no weights,
    and the int8 pass reads them one unit at a time. (Inline, a graph under the protobuf limit would
    be held whole, and serialized, in memory: ~2x the fp32 model.)"""
    return dataclasses.replace(export_config, external_data_threshold=0)


def fp32_evaluator(src: Path, st):
    """``tokens -> EvalResult`` of the unpruned fp32 model, streamed (``domains.ood_report``)."""
    from .stream import evaluate_streamed

    return lambda tokens, seq_len=512: evaluate_streamed(src, tokens, seq_len=seq_len, device=pick(st.device))


def baseline_for(src: Path, recipe, eval_tokens: np.ndarray, cache, st) -> dict:
    """``pipeline.baseline_for`` streamed: fp32 torch accuracy and the fp32 ONNX size (no latency)."""
    from .export import ExportConfig
    from .export.layered import export_layered
    from .lazy import CheckpointReader
    from .stages import tokens_hash
    from .stream import evaluate_streamed
    from .validate import graph_bytes

    dev = pick(st.device)

    def do(tmp: Path):
        reader = CheckpointReader(src)
        res = evaluate_streamed(reader, eval_tokens, seq_len=recipe.validate.seq_len, device=dev)
        export_layered(reader, tmp / "onnx", external(ExportConfig(moe=recipe.export.moe, simplify=False)))
        meta = {**res.to_dict(), "onnx_bytes": graph_bytes(tmp / "onnx"), "params": _params(reader.args),
                "latency": None, "streamed": True,
                "note": "fp32 torch accuracy (streamed); size of the unpruned fp32 ONNX export (layer by layer); "
                        "its latency is not measured in streamed mode"}
        shutil.rmtree(tmp / "onnx")
        (tmp / "meta.json").write_text(json.dumps(meta))

    key = [dir_digest(src), tokens_hash(eval_tokens), recipe.validate.seq_len, recipe.export.moe, "streamed"]
    d = st.run("baseline (streamed fp32 accuracy + ONNX size)", lambda: cache.get("baseline", key, do),
               device=where(dev))
    return json.loads((d / "meta.json").read_text())


def build(src: Path, recipe, texts, score_tokens: np.ndarray, fp32_accuracy: float, cache, st):
    """``pipeline.build`` streamed (see the module doc); returns ``pipeline.Built``."""
    from .export.layered import export_layered
    from .hfconfig import args_from_config, read_config
    from .quantize.apply import quantize_export
    from .quantize.mixed import overrides_plan
    from .stages import Built, prune_key, pruned_accuracy
    from .stream import prune_streamed, smooth_streamed

    dev = pick(st.device)
    ran = where(dev)
    key = prune_key(src, recipe, texts) + ["streamed"]
    pruned = st.run("prune (streamed)", lambda: cache.get(
        "prune", key, lambda tmp: prune_streamed(src, tmp, recipe.prune, texts.calib, device=dev)), device=ran)
    key.append(dataclasses.asdict(recipe.smooth))
    smoothed = st.run("smooth (streamed)", lambda: cache.get(
        "smooth", key, lambda tmp: smooth_streamed(pruned, tmp, texts.calib, recipe.smooth, device=dev)), device=ran)
    key.append(dataclasses.asdict(external(recipe.export)))
    exported = st.run("export (layer by layer, fp32)", lambda: cache.get(
        "export", key, lambda tmp: export_layered(smoothed, tmp, external(recipe.export), tokenizer_from=smoothed)))
    pruned_acc = pruned_accuracy(st, "score pruned fp32 (streamed torch)", pruned, fp32_accuracy,
                                 lambda: _cached_accuracy(smoothed, score_tokens, recipe, cache, dev), device=ran)
    budget = recipe.goals.int8_budget(fp32_accuracy, fp32_accuracy - pruned_acc, recipe.quantize.max_drop)
    st.log(f"pruning cost {100 * (fp32_accuracy - pruned_acc):.2f} points; int8 budget {100 * budget:.2f} points")
    key.append([dataclasses.asdict(recipe.quantize), budget, "overrides"])
    args = args_from_config(read_config(exported)[1])
    planned = st.run("plan int8 precision (overrides, no search)", lambda: cache.get(
        "plan", key, lambda tmp: overrides_plan(exported, recipe.quantize, args, budget).save(tmp)))
    quantized = st.run("quantize int8 (graph pass)", lambda: cache.get(
        "quantize", key, lambda tmp: quantize_export(exported, tmp, planned)))
    return Built(pruned, smoothed, exported, planned, quantized, pruned_acc, budget)


def _cached_accuracy(ckpt: Path, tokens: np.ndarray, recipe, cache, device) -> float:
    """fp32 torch accuracy of checkpoint ``ckpt`` on ``tokens``, streamed (its own cache entry)."""
    from .stages import tokens_hash
    from .stream import evaluate_streamed

    def do(tmp: Path):
        acc = evaluate_streamed(ckpt, tokens, seq_len=recipe.validate.seq_len, device=device).accuracy
        (tmp / "meta.json").write_text(json.dumps({"accuracy": acc}))

    d = cache.get("score", [ckpt.name, tokens_hash(tokens), recipe.validate.seq_len, "streamed"], do)
    return json.loads((d / "meta.json").read_text())["accuracy"]
