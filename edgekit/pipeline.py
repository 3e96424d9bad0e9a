"""``edgekit compress``: checkpoint -> prune (+recover) -> scale -> export -> simplify -> quantize ->
validate -> bundle, driven by a recipe.

What: ``compress(model, target, ...) -> CompressResult(report, bundle, exit_code)``. Each stage's
artifact is cached by content hash (``StageCache``): a re-run after a failure, or with a changed
later stage, resumes from the last unchanged artifact. ``--auto`` (``auto=True``) tries a grid of
pruning ratios x precisions, keeps the smallest candidate that passes every gate and records all
candidates and the Pareto front in the report (``edgekit/autosearch.py``).

Exit codes: 0 when no gate failed (unverified gates only warn; ``strict`` makes them fail), 1 when
a gate failed (the bundle is still written and the report names the gate), 2 for bad input
(``EdgekitError`` from any stage, raised before anything is written to ``out``).

Invariants: the bundle directory appears only when complete (``bundle.finalize``); the accuracy
gate compares the bundle (onnxruntime) with the fp32 torch model on the same eval tokens.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import finalize, staging_dir
from .bundle import write_manifest
from .checkpoint import load, load_tokenizer, reference_model_dir, resolve, save
from .data import load_tokens
from .device import pick, where
from .errors import EdgekitError
from .evaluate import evaluate
from .recipes import Recipe, drop_budget, load_recipe, recipe_to_toml
from .report import write_report
from .stagecache import StageCache, dir_digest
from .validate import graph_bytes, validate


@dataclass
class CompressResult:
    report: dict
    bundle: Path
    exit_code: int


class Stages:
    """Runs and times the stages, printing one line per stage (inner loops show their own bars)."""

    def __init__(self, console, total: int):
        self.console, self.total, self.i, self.rows = console, total, 0, []
        self.device = "cpu"                # torch device of the stages that run torch (``edgekit.device``)

    def log(self, msg: str) -> None:
        if self.console:
            self.console.print(f"      {msg}")

    def run(self, name: str, fn, **row):
        self.i += 1
        if self.console:
            self.console.print(f"[bold cyan][{self.i}/{self.total}][/] {name} ...")
        from .latency import peak_rss_mb, reset_peak_rss

        measured = reset_peak_rss()
        t = time.perf_counter()
        out = fn()
        row = {"name": name, **row, "seconds": round(time.perf_counter() - t, 2)}
        if measured:  # this process's peak during the stage (subprocesses, e.g. latency workers, not included)
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.rows.append(row)
        if self.console:
            self.console.print(f"      done in {row['seconds']:.1f}s")
        return out


def _tokens_hash(tokens: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(tokens, np.int64).tobytes()).hexdigest()[:20]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model_dirs(src: Path, recipe: Recipe, calib: np.ndarray, eval_tokens: np.ndarray, baseline: dict,
                     cache: StageCache, st: Stages, recover: np.ndarray | None = None) -> dict:
    """Prune (+recover) -> fp32 export of the pruned model -> smooth + export + int8 (cached).

    The accuracy budget is shared: int8 may spend what pruning left of ``goals.accuracy_drop``
    (measured on the eval tokens), minus a quarter of the budget as margin for the difference
    between the calibration text quantize_ measures on and the eval text the gate uses, but never
    less than a quarter of the goal."""
    from .export import export
    from .prune import prune_
    from .quantize import quantize_

    recover = calib if recover is None else recover
    key = [dir_digest(src), _tokens_hash(calib), _tokens_hash(recover), dataclasses.asdict(recipe.prune)]

    dev = pick(st.device)

    def do_prune(tmp: Path):
        m = load(src).to(dev)
        before = _params(m)
        prune_(m, recipe.prune, calib, recover_tokens=recover, device=dev.type)
        m = m.cpu()
        record = {"config": dataclasses.asdict(recipe.prune), "params_before": before, "params_after": _params(m)}
        save(m, tmp, tokenizer_from=src, extra_files={"prune.json": json.dumps(record, indent=2)})

    pruned = st.run("prune + recover", lambda: cache.get("prune", key, do_prune), device=where(dev))
    key.append(dataclasses.asdict(recipe.export))
    exported = st.run("export + simplify (fp32)", lambda: cache.get(
        "export", key, lambda tmp: export(load(pruned), tmp, recipe.export, tokenizer_from=pruned)))
    pruned_acc = st.run("score pruned fp32", lambda: _cached_accuracy(exported, eval_tokens, recipe))
    budget = drop_budget(recipe.goals, baseline["accuracy"])  # both accuracy gates (points, relative)
    left = budget * 0.75 - (baseline["accuracy"] - pruned_acc)
    # at least a quarter of the goal: int8 is what makes the bundle small, and reverting layers to
    # fp32 cannot rescue a pruning that already spent the budget (the accuracy gate reports that)
    floor = budget / 4
    qcfg = dataclasses.replace(recipe.quantize, export_moe=recipe.export.moe,
                               max_drop=round(min(recipe.quantize.max_drop, max(floor, left)), 5))
    st.log(f"pruning cost {100 * (baseline['accuracy'] - pruned_acc):.2f} points; int8 budget "
           f"{100 * qcfg.max_drop:.2f} points")
    key.append(dataclasses.asdict(qcfg))

    def do_quantize(tmp: Path):
        quantize_(load(pruned), tmp, qcfg, calib, tokenizer_from=pruned, log=st.log)

    quantized = st.run("scale + quantize int8", lambda: cache.get("quantize", key, do_quantize))
    return {"pruned": pruned, "exported": exported, "quantized": quantized, "pruned_accuracy": pruned_acc,
            "quant_config": qcfg}


def baseline_for(src: Path, recipe: Recipe, eval_tokens: np.ndarray, cache: StageCache, st: Stages) -> dict:
    """fp32 torch accuracy on the eval tokens and the fp32 ONNX size of the unpruned model."""
    from .export import ExportConfig, export

    dev = pick(st.device)

    def do(tmp: Path):
        from .latency import measure

        m = load(src).to(dev)
        res = evaluate(m, eval_tokens, seq_len=recipe.validate.seq_len, progress=True)
        m = m.cpu()
        export(m, tmp / "onnx", ExportConfig(moe=recipe.export.moe, simplify=recipe.export.simplify))
        from .host import usable_cores

        t, v = recipe.target, recipe.validate
        lat = measure(tmp / "onnx", threads=min(t.threads, usable_cores()), spinning=t.spinning,
                      prefill_tokens=recipe.goals.prefill_tokens,
                      decode_tokens=v.decode_tokens, runs=max(5, v.runs // 2), warmup=v.warmup)
        meta = {**res.to_dict(), "onnx_bytes": graph_bytes(tmp / "onnx"), "params": _params(m), "latency": lat,
                "note": "fp32 torch accuracy; size and latency of the unpruned fp32 ONNX export"}
        shutil.rmtree(tmp / "onnx")
        (tmp / "meta.json").write_text(json.dumps(meta))

    key = [dir_digest(src), _tokens_hash(eval_tokens), recipe.validate.seq_len, recipe.export.moe,
           recipe.target.threads, recipe.goals.prefill_tokens]
    d = st.run("baseline (fp32 accuracy + ONNX size)", lambda: cache.get("baseline", key, do), device=where(dev))
    return json.loads((d / "meta.json").read_text())


def reference_outputs(model_dir: Path, tok, n: int = 16) -> dict:
    """Greedy continuations the bundle produces here, for runtime_tests on devices."""
    from .runtime.session import OrtModel

    m = OrtModel(model_dir)
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Config:\n    def __init__(self"]
    out = []
    for p in prompts:
        ids = np.asarray([tok.encode(p).ids], np.int64)
        gen = m.generate_greedy(ids, n)
        logits = m.logits(ids)[0, -1]
        out.append({"prompt": p, "prompt_ids": ids[0].tolist(), "greedy_ids": gen[0, ids.shape[1]:].tolist(),
                    "last_logits_top5": np.argsort(-logits)[:5].tolist()})
    return {"max_new_tokens": n, "cases": out}


def write_bundle(out: Path, quantized: Path, src: Path, recipe: Recipe, report: dict, features: list[str],
                 model_name: str, tok) -> Path:
    tmp = staging_dir(out)
    try:
        for p in quantized.iterdir():
            if p.is_file() and p.name != "meta.json":
                shutil.copy(p, tmp / p.name)
        if not (tmp / "tokenizer.json").exists():
            shutil.copy(resolve(src) / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "recipe.toml").write_text(recipe_to_toml(recipe))
        (tmp / "reference.json").write_text(json.dumps(reference_outputs(tmp, tok), indent=1))
        spec = json.loads((tmp / "export.json").read_text())
        write_manifest(tmp, model_name=model_name, target=recipe.target.name, features=features,
                       hardware_recommendation=recipe.target.hardware_recommendation,
                       io_spec={k: spec.get(k) for k in ("graph", "inputs", "outputs", "cache", "moe",
                                                          "max_position_embeddings", "vocab_size")},
                       extra={"threads": recipe.target.threads, "spinning": recipe.target.spinning})
        write_report(tmp, report)
        return finalize(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def features_of(recipe: Recipe) -> list[str]:
    f = []
    p = recipe.prune
    for k in ("experts", "heads", "ffn"):
        if getattr(p, k):
            f.append(f"structured-pruning:{k}={getattr(p, k)}")
    if p.layers:
        f.append(f"structured-pruning:layers={p.layers}")
    if p.recover_steps:
        f.append(f"distillation-recovery:{p.recover_steps}-steps")
    q = recipe.quantize
    if q.smooth:
        f.append(f"smoothquant-scaling:alpha={'searched' if q.alpha is None else q.alpha}")
    f.append(f"symmetric-int8:{q.mode}-activations")
    f.append(f"mixed-precision:max_drop={q.max_drop}")
    f += [f"moe:{recipe.export.moe}", "mla-latent-kv-cache", "onnx"]
    return f


def compress(model=None, target: str = "cpu4", calib: str | None = None, eval_data: str | None = None,
             recover: str | None = None, out: str | Path | None = None, strict: bool = False, auto: bool = False,
             use_cache: bool = True, console=None, recipe: Recipe | None = None, stream: bool | None = None,
             device: str | None = None) -> CompressResult:
    """``stream``/``device`` override the recipe's ``[build]`` (None: as the recipe says)."""
    from .domains import plan_data
    from .pipeline_streamed import check_streamable, should_stream

    src = resolve(model)
    recipe = recipe or load_recipe(target)
    device = device or recipe.build.device
    if stream is None:
        stream = should_stream(src) if recipe.build.stream == "auto" else recipe.build.stream == "true"
    if stream:
        from .lazy import CheckpointReader

        CheckpointReader(src)  # header checks (one-line errors) before any work, without loading weights
        check_streamable(recipe)
        if auto:
            raise EdgekitError("--auto searches candidates in memory; pass --no-stream (or drop --auto)")
    else:
        load(src)  # validate the checkpoint (one-line errors) before any work
    tok = load_tokenizer(src)
    # a target domain (--calib DOMAIN or the recipe's [data] domain) supplies calib/recover/eval text
    plan = plan_data(src, recipe, calib, eval_data, recover)
    if plan.domain:  # the applied recipe (bundle's recipe.toml) names the domain the gate read
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, domain=plan.domain))
    calib_tokens = load_tokens(plan.calib, tok)
    eval_tokens = load_tokens(plan.eval, tok, recipe.validate.eval_max_tokens or None)
    # distillation text: the shipped sample of v3-nano's training text for v3-nano, else calibration text
    shipped = src.resolve() == reference_model_dir().resolve()
    recover_tokens = load_tokens(plan.recover or ("recover" if shipped else plan.calib), tok)
    out = Path(out or f"edgekit-out/{src.name}-{recipe.target.name}")
    scratch = None if use_cache else Path(tempfile.mkdtemp(prefix="edgekit-nocache-"))
    try:
        if stream:
            from .pipeline_streamed import compress_streamed

            return compress_streamed(src, recipe, tok, calib_tokens, eval_tokens, out, strict, StageCache(scratch),
                                     console, device)
        return _compress(src, recipe, tok, calib_tokens, eval_tokens, recover_tokens, out, strict, auto,
                         StageCache(scratch), console, plan, device)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _compress(src, recipe, tok, calib_tokens, eval_tokens, recover_tokens, out, strict, auto, cache,
              console, plan=None, device: str = "auto") -> CompressResult:
    st = Stages(console, total=8 if plan is not None and plan.out_of_domain else 7)
    st.device = device
    baseline = baseline_for(src, recipe, eval_tokens, cache, st)
    stages_rows = [{"name": "fp32", "params": baseline["params"], "accuracy": baseline["accuracy"],
                    "size_bytes": baseline["onnx_bytes"]}]
    if auto:
        from .autosearch import search

        recipe, dirs, auto_info = search(src, recipe, calib_tokens, eval_tokens, baseline, cache, st, recover_tokens)
    else:
        dirs = build_model_dirs(src, recipe, calib_tokens, eval_tokens, baseline, cache, st, recover_tokens)
        auto_info = None
    recipe = dataclasses.replace(recipe, quantize=dirs["quant_config"])  # as applied (effective int8 budget)
    report = st.run("validate", lambda: validate(dirs["quantized"], recipe, baseline, eval_tokens))
    pruned_params = _params(load(dirs["pruned"]))
    stages_rows += [
        {"name": "pruned fp32", "params": pruned_params, "size_bytes": graph_bytes(dirs["exported"]),
         "accuracy": dirs["pruned_accuracy"]},
        {"name": "int8 bundle", "params": pruned_params, "accuracy": report["compressed"]["accuracy"],
         "size_bytes": report["compressed"]["size_bytes"]},
    ]
    report["stages"] = stages_rows
    report["timings"] = st.rows
    report["devices"] = {r["name"]: r.get("device", "cpu") for r in st.rows}
    report["stage_cache_hits"] = cache.hits
    report["model"] = str(src)
    records = {"pruning": dirs["pruned"] / "prune.json", "quantization": dirs["quantized"] / "quantize.json"}
    for key, f in records.items():
        if f.exists():
            report[key] = json.loads(f.read_text())
    if auto_info:
        report["auto"] = auto_info
    if plan is not None and plan.domain:
        from .domains import ood_report

        def score_domains():
            return ood_report(src, dirs["quantized"], tok, plan, recipe, cache, report)

        report["domains"] = (st.run("score other domains (reported, not gated)", score_domains)
                             if plan.out_of_domain else score_domains())
    bundle = st.run("bundle", lambda: write_bundle(out, dirs["quantized"], src, recipe, report,
                                                   features_of(recipe), src.name, tok))
    failed = [k for k, g in report["gates"].items() if g["status"] == "fail"]
    unverified = [k for k, g in report["gates"].items() if g["status"] == "unverified"]
    code = 1 if failed or (strict and unverified) else 0
    return CompressResult(report, bundle, code)


def _cached_accuracy(export_dir: Path, eval_tokens: np.ndarray, recipe: Recipe) -> float:
    """Accuracy of the fp32 pruned export (cached next to it), for the per-stage table."""
    f = export_dir / "meta.json"
    meta = json.loads(f.read_text()) if f.exists() else {}
    key = f"accuracy:{_tokens_hash(eval_tokens)}:{recipe.validate.seq_len}"
    if key not in meta:
        from .validate import score

        meta[key] = score(export_dir, eval_tokens, recipe.validate.seq_len)["accuracy"]
        f.write_text(json.dumps(meta))
    return meta[key]
