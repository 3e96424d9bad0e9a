"""``edgekit compress``: a checkpoint and a recipe -> a validated bundle, as one walk down the stages.

    stage      function                      in -> out                                          recipe
    baseline   baseline_for                  checkpoint -> fp32 accuracy (torch), fp32 ONNX size  [validate]
    prune      prune.prune_checkpoint        checkpoint -> pruned checkpoint + prune.json         [prune]
    smooth     smooth.smooth_checkpoint      -> smoothed checkpoint + smooth.json (fp32 unchanged) [smooth]
    export     export.export                 -> fp32 ONNX + export.json (unit names -> nodes)     [export]
    score      _cached_accuracy              export -> pruned accuracy -> the int8 budget         [goals]
    plan       quantize.mixed.plan_          smoothed model + export -> plan.json                 [quantize]
    quantize   quantize.apply.quantize_export  export + plan -> int8 ONNX + quantize.json         [quantize]
    validate   validate.validate             int8 ONNX -> gates on onnxruntime CPU                [goals]
    bundle     write_bundle                  -> model.onnx, manifest, report, recipe.toml

The graph is exported once (``export``); quantization is a pass over that graph keyed by the unit
names ``export.json`` records. ``build`` runs prune..quantize for one recipe; ``--auto``
(``edgekit/autosearch.py``) runs ``build`` once per ``[auto]`` candidate, scores each on the dev
split (a targeted domain's shipped ``dev`` split, else the tail of the calibration text, held out
of every stage) and keeps one; validate and bundle then run once. Which text each stage reads
(plain splits or a target domain's, ``edgekit/domains.py``) is settled before the first stage; with
a target domain the other domains are scored after validation (reported, not gated).

What: ``compress(model, target, ...) -> CompressResult(report, bundle, exit_code)``. Each stage's
artifact is cached by content hash (``StageCache``): a re-run after a failure, or with a changed
later stage, resumes from the last unchanged artifact.

Exit codes: 0 when no gate failed (unverified gates only warn; ``strict`` makes them fail), 1 when
a gate failed (the bundle is still written and the report names the gate), 2 for bad input
(``EdgekitError`` from any stage, raised before anything is written to ``out``; recipe keys are
checked before any stage runs).

Invariants: the bundle directory appears only when complete (``edgekit.atomic``); the accuracy
gate compares the bundle (onnxruntime) with the fp32 torch model on the same eval tokens, and no
stage that fits or selects the model reads those tokens under ``--auto``.

Streamed (``--stream`` / ``[build] stream``, ``edgekit.pipeline_streamed``): the same stages and
artifacts with one decoder layer in memory at a time (checkpoints larger than RAM): each stage's
function is swapped for its layer-by-layer counterpart, the plan is the overrides' (no emulated
search) and the graph pass is the same ``quantize_export``. ``device`` (``[build] device``,
``--device``) is where torch stages run; each stage's row in ``timings`` says where it ran and
this process's peak resident memory during it (``peak_rss_mb``).

Under torchrun (``edgekit.dist``) every rank runs the prune (+recover) stage, calibration and
distillation split over ranks (``prune_on_all_ranks``); rank 0 writes that stage's cache entry once
all ranks succeeded and runs the remaining stages alone (the cached prune is then a hit); the other
ranks return ``None`` and write nothing. All ranks leave the process group after that stage, so
nothing later can wait on a peer that has gone. ``auto`` is single-process only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dist
from .atomic import atomic_dir, scratch_dir
from .bundle import baseline_digest, write_manifest
from .checkpoint import load, load_tokenizer, reference_model_dir, resolve
from .data import load_tokens, require_tokens
from .device import pick, where
from .errors import EdgekitError
from .evaluate import evaluate
from .export import ExportConfig
from .info import param_count
from .mobile import prepare_bundle
from .prune import PruneConfig
from .quantize import QuantConfig
from .recipes import Recipe, load_recipe, recipe_to_toml, with_overrides
from .report import write_report
from .smooth import SmoothConfig
from .stagecache import StageCache, dir_digest, seal
from .stages import Built, Stages, Texts, prune_key, pruned_accuracy, tokens_hash
from .validate import graph_bytes, score, validate

# the compile stages' recipe tables and the config each is built into (registered with the recipe parser)
STAGE_CONFIGS = {"prune": PruneConfig, "smooth": SmoothConfig, "export": ExportConfig, "quantize": QuantConfig}
BUILD_STAGES = 6          # prune, smooth, export, score, plan, quantize


@dataclass
class CompressResult:
    report: dict
    bundle: Path
    exit_code: int


def build(src: Path, recipe: Recipe, texts: Texts, score_tokens: np.ndarray, fp32_accuracy: float,
          cache: StageCache, st: Stages) -> Built:
    """prune -> smooth -> export (once) -> score -> plan -> quantize for one recipe, each stage cached.

    The int8 budget is ``recipe.goals.int8_budget`` of what pruning cost on ``score_tokens``
    (``fp32_accuracy`` is the unpruned fp32 accuracy on the same tokens)."""
    from .export import export
    from .quantize.apply import quantize_export
    from .quantize.mixed import plan_
    from .smooth import smooth_checkpoint

    key = prune_key(src, recipe, texts)
    pruned = st.run("prune + recover", lambda: cache.get(
        "prune", key, lambda tmp: _prune_to(tmp, src, recipe, texts, device=st.device)), device=where(pick(st.device)))
    key.append(dataclasses.asdict(recipe.smooth))
    smoothed = st.run("smooth (SmoothQuant scales into the norms)", lambda: cache.get(
        "smooth", key, lambda tmp: smooth_checkpoint(pruned, tmp, recipe.smooth, texts.calib)))
    key.append(dataclasses.asdict(recipe.export))
    exported = st.run("export + simplify (fp32)", lambda: cache.get(
        "export", key, lambda tmp: export(load(smoothed), tmp, recipe.export, tokenizer_from=smoothed)))
    pruned_acc = pruned_accuracy(st, "score pruned fp32", pruned, fp32_accuracy,
                                 lambda: _cached_accuracy(exported, score_tokens, recipe, cache))
    budget = recipe.goals.int8_budget(fp32_accuracy, fp32_accuracy - pruned_acc, recipe.quantize.max_drop)
    st.log(f"pruning cost {100 * (fp32_accuracy - pruned_acc):.2f} points; int8 budget {100 * budget:.2f} points")
    key.append([dataclasses.asdict(recipe.quantize), budget])
    planned = st.run("plan int8 precision", lambda: cache.get("plan", key, lambda tmp: plan_(
        load(smoothed), exported, recipe.quantize, texts.calib, budget, log=st.log).save(tmp)))
    quantized = st.run("quantize int8 (graph pass)", lambda: cache.get(
        "quantize", key, lambda tmp: quantize_export(exported, tmp, planned)))
    return Built(pruned, smoothed, exported, planned, quantized, pruned_acc, budget)


def _prune_to(out: Path, src: Path, recipe: Recipe, texts: Texts, seal_as: str | None = None,
              device: str = "cpu") -> None:
    """The prune (+recover) stage: ``prune_checkpoint`` on the loaded texts (rank 0 writes under
    torchrun). ``seal_as``: also write the stage cache's content record, for an entry written outside
    ``StageCache.get``."""
    from .prune import prune_checkpoint

    prune_checkpoint(src, out, recipe.prune, calib=texts.calib_name, recover=texts.recover_name,
                     calib_tokens=texts.calib, recover_tokens=texts.recover,
                     after_write=(lambda tmp: seal(tmp, seal_as)) if seal_as else None, device=device)


def prune_on_all_ranks(src: Path, recipe: Recipe, texts: Texts, cache: StageCache, console=None) -> dict:
    """Under torchrun: the prune (+recover) stage on every rank, its cache entry written (and sealed)
    by rank 0, skipped when rank 0 holds an intact one. Returns the stage's timing row."""
    key = prune_key(src, recipe, texts)
    n = dist.world().size
    hit = cache.lookup("prune", key) is not None if dist.world().is_main else None
    row = {"name": f"prune + recover ({n} ranks)", "world_size": n, "cached": bool(dist.broadcast(hit))}
    if console:
        console.print(f"[bold cyan][dist][/] prune + recover on {n} ranks ...")
    t = time.perf_counter()
    if not row["cached"]:
        _prune_to(cache.path("prune", key), src, recipe, texts, seal_as="prune")
    row["seconds"] = round(time.perf_counter() - t, 2)
    if console:
        console.print(f"      done in {row['seconds']:.1f}s")
    return row


def baseline_for(src: Path, recipe: Recipe, eval_tokens: np.ndarray, cache: StageCache, st: Stages) -> dict:
    """fp32 torch accuracy on the eval tokens and the fp32 ONNX size of the unpruned model."""
    from .export import export

    dev = pick(st.device)

    def do(tmp: Path):
        from .host import usable_cores
        from .latency import measure

        m = load(src).to(dev)
        res = evaluate(m, eval_tokens, seq_len=recipe.validate.seq_len, progress=True)
        m = m.cpu()
        export(m, tmp / "onnx", ExportConfig(moe=recipe.export.moe, simplify=recipe.export.simplify))
        t, v = recipe.target, recipe.validate
        lat = measure(tmp / "onnx", threads=min(t.threads, usable_cores()), spinning=t.spinning,
                      prefill_tokens=recipe.goals.prefill_tokens, session_config=t.session_config,
                      decode_tokens=v.decode_tokens, runs=max(5, v.runs // 2), warmup=v.warmup)
        meta = {**res.to_dict(), "onnx_bytes": graph_bytes(tmp / "onnx"), "params": param_count(m), "latency": lat,
                "note": "fp32 torch accuracy; size and latency of the unpruned fp32 ONNX export"}
        shutil.rmtree(tmp / "onnx")
        (tmp / "meta.json").write_text(json.dumps(meta))

    key = [dir_digest(src), tokens_hash(eval_tokens), recipe.validate.seq_len, recipe.export.moe,
           recipe.target.threads, recipe.goals.prefill_tokens]
    d = st.run("baseline (fp32 accuracy + ONNX size)", lambda: cache.get("baseline", key, do), device=where(dev))
    return json.loads((d / "meta.json").read_text())


def fp32_accuracy(src: Path, tokens: np.ndarray, recipe: Recipe, cache: StageCache, st: Stages, what: str) -> float:
    """fp32 torch accuracy of the unpruned model on ``tokens`` (cached)."""
    def do(tmp: Path):
        res = evaluate(load(src), tokens, seq_len=recipe.validate.seq_len, progress=True)
        (tmp / "meta.json").write_text(json.dumps(res.to_dict()))

    key = [dir_digest(src), tokens_hash(tokens), recipe.validate.seq_len]
    d = st.run(f"fp32 accuracy on {what}", lambda: cache.get("fp32-accuracy", key, do))
    return json.loads((d / "meta.json").read_text())["accuracy"]


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
    with atomic_dir(out) as tmp:
        for p in quantized.iterdir():
            if p.is_file() and p.name != "meta.json" and not p.name.startswith("."):
                shutil.copy(p, tmp / p.name)
        if not (tmp / "tokenizer.json").exists():
            shutil.copy(resolve(src) / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "recipe.toml").write_text(recipe_to_toml(recipe))
        (tmp / "reference.json").write_text(json.dumps(reference_outputs(tmp, tok), indent=1))
        spec = json.loads((tmp / "export.json").read_text())
        formats = prepare_bundle(tmp, recipe.target)       # operator list; .ort + operator config for mobile
        write_manifest(tmp, model_name=model_name, target=recipe.target.name, features=features,
                       hardware_recommendation=recipe.target.hardware_recommendation,
                       io_spec={k: spec.get(k) for k in ("graph", "inputs", "outputs", "cache", "moe",
                                                          "max_position_embeddings", "vocab_size")},
                       extra={"threads": recipe.target.threads, "spinning": recipe.target.spinning,
                              "baseline_sha256": baseline_digest(report["baseline"]), **formats})
        write_report(tmp, report)
    return out


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
    s, q = recipe.smooth, recipe.quantize
    if s.enabled:
        f.append(f"smoothquant-scaling:alpha={'searched' if s.search else s.alpha}")
    f.append(f"symmetric-int8:{q.mode}-activations")
    f.append(f"mixed-precision:max_drop={q.max_drop}")
    f += [f"moe:{recipe.export.moe}", "mla-latent-kv-cache", "onnx"]
    if recipe.target.format == "ort":
        f += ["ort-format", "reduced-operator-config"]
    return f


def load_texts(src: Path, tok, recipe: Recipe, plan, auto: bool) -> Texts:
    """Tokenize the texts ``plan`` (``domains.plan_data``) names. With ``auto``, the dev split is the
    target domain's shipped ``dev`` split, or else carved off the end of the calibration text
    (which then no longer holds it; distillation on calibration text loses it too)."""
    calib_tokens = load_tokens(plan.calib, tok)
    eval_tokens = load_tokens(plan.eval, tok, recipe.validate.eval_max_tokens or None)
    calib_name, dev, dev_name = str(plan.calib), None, ""
    if auto and plan.dev:
        dev, dev_name = load_tokens(plan.dev, tok), str(plan.dev)
    elif auto:
        n = recipe.auto.dev_tokens
        if len(calib_tokens) < 2 * n:
            raise EdgekitError(f"--auto holds out the last {n} calibration tokens as its dev split, but the "
                               f"calibration text has {len(calib_tokens)}; pass a longer --calib or lower "
                               "[auto] dev_tokens")
        calib_tokens, dev = calib_tokens[:-n], calib_tokens[-n:]
        dev_name = f"the last {n} tokens of {calib_name}"
        calib_name += f" without its last {n} tokens (the --auto dev split)"
    # distillation text: the plan's (a domain's recover split or --recover), v3-nano's shipped
    # sample of its training text, else the calibration text
    shipped = src.resolve() == reference_model_dir().resolve()
    if plan.recover or shipped:
        recover_name = str(plan.recover or "recover")
        recover_tokens = load_tokens(recover_name, tok)
    else:
        recover_name, recover_tokens = calib_name, calib_tokens
    return Texts(calib_tokens, recover_tokens, eval_tokens, dev, calib_name, recover_name, dev_name)


def compress(model=None, target: str = "cpu4", calib: str | None = None, eval_data: str | None = None,
             recover: str | None = None, out: str | Path | None = None, strict: bool = False, auto: bool = False,
             use_cache: bool = True, console=None, recipe: Recipe | None = None,
             force: bool = False, stream: bool | None = None, device: str | None = None) -> CompressResult | None:
    """``stream``/``device`` override the recipe's ``[build]`` (None: as the recipe says)."""
    from .domains import plan_data
    from .outputs import prepare
    from .prune import check_prunable

    src = resolve(model)
    recipe = recipe or load_recipe(target, STAGE_CONFIGS)
    w = dist.world()
    if w.enabled and auto:
        raise EdgekitError("--auto runs many candidate prunes in one process; drop --auto or run without torchrun")
    if auto and not recipe.auto.candidates:
        raise EdgekitError(f"{recipe.source or recipe.target.name} has no [auto] candidates; add an "
                           "[auto.candidates] table (see export_recipes/cpu4.toml) or drop --auto")
    device = device or recipe.build.device
    pick(device)  # "cuda" without a GPU: a one-line error before any work
    if stream is None:
        from .pipeline_streamed import should_stream

        stream = should_stream(src) if recipe.build.stream == "auto" else recipe.build.stream == "true"
    if stream:
        from .lazy import CheckpointReader
        from .pipeline_streamed import check_streamable

        reader = CheckpointReader(src)  # header checks (one-line errors) before any work, no weights loaded
        check_streamable(recipe, auto, w.enabled)
    out = Path(out or f"edgekit-out/{src.name}-{recipe.target.name}")
    out = dist.main_first(lambda: prepare(out, force, inputs=[src])) or out  # rank 0 alone writes the bundle
    tok = load_tokenizer(src)
    # a target domain (--calib DOMAIN or the recipe's [data] domain) supplies calib/recover/dev/eval text
    plan = plan_data(src, recipe, calib, eval_data, recover)
    if plan.domain:  # the applied recipe (bundle's recipe.toml) names the domain the gate read
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, domain=plan.domain))
    texts = load_texts(src, tok, recipe, plan, auto)
    # validate the checkpoint, the recipe against it and the calibration text (one-line errors) before any work
    if stream:
        from .stream import LazyModel

        args = reader.args
        check_prunable(LazyModel(reader), recipe.prune, texts.calib)
    else:
        model = load(src)
        check_prunable(model, recipe.prune, texts.calib)
        args = model.args
        del model
    limit = args.max_position_embeddings
    if recipe.validate.seq_len > limit:
        raise EdgekitError(f"{recipe.source or recipe.target.name}: [validate] seq_len = {recipe.validate.seq_len} "
                           f"is over the model's {limit} positions; set it to {limit} or less")
    require_tokens(texts.calib, recipe.quantize.seq_len + 1, "calibration text for quantization")
    scratch = None if use_cache or not w.is_main else scratch_dir("edgekit-nocache-")
    try:
        cache, rows = StageCache(scratch), []
        if w.enabled:
            rows = [prune_on_all_ranks(src, recipe, texts, cache, console if w.is_main else None)]
            dist.shutdown()  # every rank leaves the group: rank 0 goes on alone, no collective can wait on a peer
            if not w.is_main:
                return None
        return _compress(src, recipe, tok, texts, out, strict, auto, cache, console, plan, rows, stream, device)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _compress(src, recipe, tok, texts: Texts, out, strict, auto, cache, console, plan,
              dist_rows=(), stream: bool = False, device: str = "cpu") -> CompressResult:
    n_builds = len(recipe.auto.candidates) if auto else 1
    st = Stages(console, total=3 + BUILD_STAGES * n_builds + (2 + n_builds if auto else 0)
                + (1 if plan.out_of_domain else 0), device=device)
    st.rows.extend(dist_rows)
    if stream:
        from . import pipeline_streamed as streamed
    baseline = (streamed.baseline_for if stream else baseline_for)(src, recipe, texts.eval, cache, st)
    if auto:
        from .autosearch import search

        dev_fp32 = fp32_accuracy(src, texts.dev, recipe, cache, st, "the dev split")

        def measure(b: Built) -> dict:
            acc = st.run("score int8 on the dev split", lambda: score(b.quantized, texts.dev, recipe.validate.seq_len))
            return {"accuracy": acc["accuracy"], "fp32_accuracy": dev_fp32, "accuracy_drop": dev_fp32 - acc["accuracy"],
                    "size_ratio": graph_bytes(b.quantized) / baseline["onnx_bytes"]}

        recipe, built, auto_info = search(
            recipe, lambda r: build(src, r, texts, texts.dev, dev_fp32, cache, st), measure, st.log)
        auto_info.update(dev={"source": texts.dev_name, "tokens": int(len(texts.dev)), "fp32_accuracy": dev_fp32})
        pruned_eval = pruned_accuracy(st, "score pruned fp32 on eval", built.pruned, baseline["accuracy"],
                                      lambda: _cached_accuracy(built.exported, texts.eval, recipe, cache))
    else:
        built = (streamed.build if stream else build)(src, recipe, texts, texts.eval, baseline["accuracy"], cache, st)
        auto_info, pruned_eval = None, built.pruned_accuracy
    recipe = with_overrides(recipe, quantize={"max_drop": built.int8_budget})  # as applied (effective budget)
    report = st.run("validate", lambda: validate(built.quantized, recipe, baseline, texts.eval),
                    device="cpu (onnxruntime)")
    records = {k: json.loads(f.read_text()) for k, f in (
        ("pruning", built.pruned / "prune.json"), ("smoothing", built.smoothed / "smooth.json"),
        ("quantization", built.quantized / "quantize.json")) if f.exists()}
    pruned_params = records["pruning"]["params_after"]
    report["stages"] = [
        {"name": "fp32", "params": baseline["params"], "accuracy": baseline["accuracy"],
         "size_bytes": baseline["onnx_bytes"]},
        {"name": "pruned fp32", "params": pruned_params, "size_bytes": graph_bytes(built.exported),
         "accuracy": pruned_eval},
        {"name": "int8 bundle", "params": pruned_params, "accuracy": report["compressed"]["accuracy"],
         "size_bytes": report["compressed"]["size_bytes"]},
    ]
    report["timings"] = st.rows
    report["devices"] = {r["name"]: r["device"] for r in st.rows if "device" in r}
    report["streamed"] = stream
    report["stage_cache_hits"] = cache.hits
    report["model"] = src.name if src.resolve() == reference_model_dir().resolve() else str(src)
    report.update(records)
    if auto_info:
        report["auto"] = auto_info
    if dist_rows:
        report["distributed"] = dist_rows[0]
    if plan.domain:
        from .domains import ood_report

        def score_domains():
            return ood_report(src, built.quantized, tok, plan, recipe, cache, report,
                              fp32_eval=streamed.fp32_evaluator(src, st) if stream else None)

        report["domains"] = (st.run("score other domains (reported, not gated)", score_domains)
                             if plan.out_of_domain else score_domains())
    bundle = st.run("bundle", lambda: write_bundle(out, built.quantized, src, recipe, report,
                                                   features_of(recipe) + (["streamed-pipeline"] if stream else []),
                                                   src.name, tok))
    failed = [k for k, g in report["gates"].items() if g["status"] == "fail"]
    unverified = [k for k, g in report["gates"].items() if g["status"] == "unverified"]
    code = 1 if failed or (strict and unverified) else 0
    return CompressResult(report, bundle, code)


def _cached_accuracy(export_dir: Path, tokens: np.ndarray, recipe: Recipe, cache: StageCache) -> float:
    """Accuracy of an fp32 export on ``tokens``, for the int8 budget and the stage table (its own
    cache entry: entries are never modified once built, so their content hashes hold)."""
    def do(tmp: Path):
        acc = score(export_dir, tokens, recipe.validate.seq_len)["accuracy"]
        (tmp / "meta.json").write_text(json.dumps({"accuracy": acc}))

    d = cache.get("score", [export_dir.name, tokens_hash(tokens), recipe.validate.seq_len], do)
    return json.loads((d / "meta.json").read_text())["accuracy"]
