"""The ``edgekit`` command line. Thin by design: each command parses options, calls one library
function and prints its result; the work lives in the library modules.

Errors: ``EdgekitError`` (bad input), click usage errors (a bad option value) and OS errors (an
unwritable path, a full disk) become one line on stderr and exit code 2, no traceback. Commands that
write a directory check ``-o`` first (``edgekit.outputs``; ``--force`` to replace a foreign dir).

``prune`` and ``compress`` also run under ``torchrun --nproc-per-node N`` (``edgekit.dist``):
every rank takes part in calibration and distillation, rank 0 alone writes and prints.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import EdgekitError

MODEL_HELP = "Checkpoint dir, `edgekit export` dir or bundle (default: the shipped v3-nano)."


class UserError(click.ClickException):
    exit_code = 2


class Group(click.Group):
    """Turns library ``EdgekitError``, usage errors and OS errors (unwritable path, full disk) into
    a one-line message and exit code 2."""

    def invoke(self, ctx):
        from .outputs import command_scope

        try:
            with command_scope():
                return super().invoke(ctx)
        except EdgekitError as e:
            raise UserError(str(e)) from None
        except click.UsageError as e:
            cmd = f"{e.ctx.command_path} -h" if e.ctx else "edgekit -h"
            raise UserError(f"{e.format_message()} (see `{cmd}`)") from None
        except OSError as e:
            where = f" on {e.filename}" if e.filename else ""
            raise UserError(f"file system error{where}: {e.strerror or e}; check the paths, their permissions "
                            "and free disk space") from None


def _output(out, force, *inputs):
    """Check ``-o`` before any work (edgekit.outputs): refuses files and foreign dirs without --force."""
    from .checkpoint import resolve
    from .outputs import prepare

    return prepare(out, force, inputs=[resolve(i) for i in inputs])


FORCE_HELP = "Replace -o even when it is a directory edgekit did not write (never a file)."


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli():
    """edgekit: compress DeepSeek-V3-family models for 4-core CPUs, phones and browsers.

    \b
    Quick start:
        edgekit compress --target cpu4        # v3-nano -> validated cpu4 bundle
        edgekit info                          # what the shipped model is
        edgekit eval                          # its accuracy on the held-out split
    """


def _emit(obj: dict, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        render(obj)


@cli.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model, as_json):
    """Architecture, parameters (total, active per token, by kind) and KV-cache bytes per token.

    MODEL may also be a named shape (`edgekit synth --list`), described from its config alone.

    \b
    Example:
        edgekit info edgekit-out/pruned --json
        edgekit info v3-1.6b
    """
    from .info import describe
    from .report_text import render_info

    _emit(describe(model), as_json, render_info)


@cli.command()
@click.argument("shape", required=False)
@click.option("-o", "--out", default=None, help="Output checkpoint directory (replaced when complete).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same weights.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp8"]), default="fp32", show_default=True,
              help="Storage of the weights: fp32, bf16 (routers fp32), fp8 (e4m3 linears with 128x128 block "
                   "scales, as DeepSeek publishes V3).")
@click.option("--shard-size", "shard_mb", type=int, default=1024, show_default=True,
              help="Largest shard in MB; more weights are split with model.safetensors.index.json.")
@click.option("--list", "list_shapes", is_flag=True, help="List the named shapes and exit.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def synth(shape, out, seed, dtype, shard_mb, list_shapes, force):
    """Write a random-init (std 0.02) checkpoint of a named V3 SHAPE with v3-nano's tokenizer.

    Tensors are generated and written shard by shard, so a checkpoint larger than free memory can
    be written. Shapes: edgekit/data/shapes.toml.

    \b
    Example:
        edgekit synth v3-1.6b -o ckpt/v3-1.6b
        edgekit info ckpt/v3-1.6b
    """
    from .shapes import shape_names
    from .synth import synth as do_synth

    if list_shapes or not shape:
        from .info import shape_info

        for n in shape_names():
            i = shape_info(n)
            click.echo(f"{n:10s} {i['params_total'] / 1e6:9.1f}M params, {i['params_total'] * 4 / 1e9:5.2f} GB fp32")
        return
    if not out:
        raise UserError("synth needs -o DIR (where to write the checkpoint)")
    _output(out, force)
    d = do_synth(shape, out, seed=seed, dtype=dtype, shard_bytes=shard_mb << 20,
                 log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {d}")


@cli.command(name="eval")
@click.argument("model", required=False)
@click.option("--data", default="eval", show_default=True,
              help="Text file to score, or a shipped split name (eval, calib).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Window length in tokens [default: 512, or the model's positions if fewer].")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score only the first N tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads (ONNX/bundle).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(model, data, seq_len, max_tokens, threads, as_json):
    """Next-token accuracy (± standard error) and perplexity of MODEL on held-out text.

    MODEL may be a checkpoint, an exported ONNX directory or a bundle.
    """
    from .data import load_tokens
    from .evaluate import evaluate, max_positions
    from .sources import open_model

    scorer, tok, kind = open_model(model, threads=threads)
    limit = max_positions(scorer) or 512
    if seq_len is None:
        seq_len = min(512, limit)
    elif seq_len > limit:
        raise EdgekitError(f"--seq-len {seq_len} is over the model's {limit} positions; pass --seq-len {limit} or less")
    res = evaluate(scorer, load_tokens(data, tok, max_tokens), seq_len=seq_len,
                   progress=not as_json and sys.stderr.isatty())
    out = {"model": str(model or "v3-nano"), "kind": kind, "data": str(data), **res.to_dict()}
    _emit(out, as_json, lambda o: click.echo(
        f"{o['model']} ({kind}) on {data}: accuracy {o['accuracy']:.4f} ± {o['accuracy_stderr']:.4f}, "
        f"perplexity {o['perplexity']:.3f}, {o['tokens']} tokens"))


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--out", required=True, help="Output directory (replaced when complete).")
@click.option("--moe", type=click.Choice(["contrib", "portable"]), default="contrib", show_default=True,
              help="contrib: onnxruntime com.microsoft MoE kernels (CPU); portable: plain ONNX (web, mobile).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check onnxruntime against torch (logits and greedy tokens) after export.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def export(model, out, moe, no_simplify, verify, force):
    """Export MODEL to ONNX: one graph for prefill and decode with MLA's latent KV cache.

    \b
    Example:
        edgekit export -o edgekit-out/nano-onnx
        edgekit eval edgekit-out/nano-onnx
    """
    from .checkpoint import load, resolve
    from .export import ExportConfig
    from .export import export as do_export
    from .export import verify as do_verify

    _output(out, force, model)
    m = load(model)
    d = do_export(m, out, ExportConfig(moe=moe, simplify=not no_simplify), tokenizer_from=resolve(model))
    click.echo(f"wrote {d}")
    if verify:
        r = do_verify(m, d)
        click.echo(f"parity vs torch: {json.dumps(r)}")


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--out", required=True, help="Output checkpoint directory.")
@click.option("--experts", type=float, default=0.0, help="Fraction of routed experts removed per MoE layer.")
@click.option("--heads", type=float, default=0.0, help="Fraction of attention heads removed per layer.")
@click.option("--ffn", type=float, default=0.0, help="Fraction of FFN channels removed (dense, shared, routed).")
@click.option("--layers", type=click.IntRange(min=0), default=0,
              help="Whole layers removed (lowest block influence first).")
@click.option("--recover-steps", type=click.IntRange(min=0), default=0,
              help="Distillation steps from the unpruned model.")
@click.option("--calib", default="calib", show_default=True, help="Text for importance (file or split).")
@click.option("--recipe", "recipe_path", default=None, help="TOML whose [prune] table (incl. per_layer) is used.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def prune(model, out, experts, heads, ffn, layers, recover_steps, calib, recipe_path, force):
    """Structurally prune MODEL (experts, heads, channels, layers physically removed).

    Writes an ordinary Hugging Face-format checkpoint that `edgekit load/info/eval/export` read.

    \b
    Example:
        edgekit prune --experts 0.25 --recover-steps 100 -o edgekit-out/pruned
        edgekit info edgekit-out/pruned
    """
    from . import dist
    from .prune import PruneConfig, prune_checkpoint
    from .recipes import build, load_recipe

    if recipe_path:
        cfg = load_recipe(recipe_path, {"prune": PruneConfig}).prune
    else:
        cfg = build(PruneConfig, dict(experts=experts, heads=heads, ffn=ffn, layers=layers,
                                      recover_steps=recover_steps), "prune")
    with dist.session() as w:
        dist.main_first(lambda: _output(out, force, model))  # under torchrun only rank 0 writes, so only it checks
        d = prune_checkpoint(model, out, cfg, calib=calib, progress=w.is_main)
    if w.is_main:
        rec = json.loads((d / "prune.json").read_text())
        click.echo(f"wrote {d}: {rec['params_before'] / 1e6:.3f}M -> {rec['params_after'] / 1e6:.3f}M params"
                   + (f" ({w.size} ranks)" if w.enabled else ""))


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--out", required=True, help="Output directory (an int8 ONNX export).")
@click.option("--mode", type=click.Choice(["dynamic", "static", "auto"]), default="dynamic", show_default=True,
              help="Activation scales: per call at run time, calibrated constants, or chosen per op.")
@click.option("--alpha", type=float, default=None, help="SmoothQuant strength (default: searched per norm).")
@click.option("--no-smooth", is_flag=True, help="Skip SmoothQuant scaling.")
@click.option("--max-drop", type=float, default=0.008, show_default=True,
              help="Accuracy budget vs fp32 as a fraction (0.008 = 0.8 points); over it, units revert to fp32.")
@click.option("--moe", type=click.Choice(["grouped", "block", "row"]), default="grouped", show_default=True,
              help="QMoE expert weights: per block (int8 activations, fastest) or per row (weights only).")
@click.option("--keep-fp32", multiple=True, help="Unit name or re:pattern to keep in fp32 (repeatable).")
@click.option("--int8", "force_int8", multiple=True, help="Unit name or re:pattern to force to int8 (repeatable).")
@click.option("--export-moe", type=click.Choice(["contrib", "portable"]), default="contrib", show_default=True)
@click.option("--calib", default="calib", show_default=True, help="Calibration text (file or split).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def quantize(model, out, mode, alpha, no_smooth, max_drop, moe, keep_fp32, force_int8, export_moe, calib, force):
    """Symmetric int8 (SmoothQuant-scaled, accuracy-aware mixed precision) ONNX export of MODEL.

    \b
    Example:
        edgekit quantize --max-drop 0.005 -o edgekit-out/nano-int8
        edgekit eval edgekit-out/nano-int8
    """
    from .checkpoint import load, resolve
    from .export import ExportConfig
    from .quantize import DEFAULT_OVERRIDES, QuantConfig, quantize_
    from .recipes import build
    from .smooth import SmoothConfig

    _output(out, force, model)
    overrides = {**DEFAULT_OVERRIDES, **{p: "fp32" for p in keep_fp32}, **{p: "int8" for p in force_int8}}
    cfg = build(QuantConfig, dict(mode=mode, max_drop=max_drop, moe=moe, overrides=overrides, calib=calib),
                "quantize")
    scfg = build(SmoothConfig, dict(enabled=not no_smooth, search=alpha is None, alpha=0.5 if alpha is None else alpha,
                                    calib_seq_len=cfg.seq_len, calib_max_tokens=cfg.calib_max_tokens), "smooth")
    r = quantize_(load(model), out, cfg, tokenizer_from=resolve(model), smooth=scfg,
                  export_config=ExportConfig(moe=export_moe), log=lambda m: click.echo(m, err=True))
    ort = r["accuracy"]["ort"][-1] if r["accuracy"]["ort"] else {}
    click.echo(f"wrote {out}: {r['size_bytes'] / 1e6:.2f} MB; kept fp32: {len(r['fp32_units'])} units; "
               f"calib accuracy fp32 {ort.get('fp32', float('nan')):.4f} int8 {ort.get('int8', float('nan')):.4f}")
    click.echo("routing agreement per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in r["routing_agreement"].items()))


@cli.command()
def targets():
    """List deployment targets (export_recipes/*.toml) with their budgets and where each was validated."""
    from pathlib import Path

    from .devices import collect, validated_where
    from .recipes import load_recipe, target_names
    from .report_text import render_targets

    runs_dir = Path(__file__).resolve().parent.parent / "device_runs"   # a checkout; an installed wheel has none
    where = validated_where(collect(runs_dir)) if runs_dir.is_dir() else None
    render_targets([load_recipe(n) for n in target_names()], where)


@cli.command()
@click.argument("model", required=False)
@click.option("--target", default="cpu4", show_default=True, help="Target name or a recipe .toml path.")
@click.option("--calib", default=None, help="Calibration text file (default: shipped calib split).")
@click.option("--eval", "eval_data", default=None, help="Evaluation text file (default: shipped eval split).")
@click.option("--recover", default=None,
              help="Distillation text after pruning (default: the target domain's recover split, or its train "
                   "text with [data] recover = \"train\"; without a domain v3-nano's shipped sample, else --calib).")
@click.option("-o", "--out", default=None, help="Bundle directory (default: edgekit-out/<model>-<target>).")
@click.option("--auto", is_flag=True, help="Search pruning ratios x precision for the smallest passing model.")
@click.option("--strict", is_flag=True, help="Treat unverified gates (e.g. too few cores here) as failures.")
@click.option("--no-cache", is_flag=True, help="Do not reuse cached stage artifacts.")
@click.option("--stream/--no-stream", default=None,
              help="Run every stage one decoder layer at a time (checkpoints larger than memory). "
                   "Default: the recipe's [build] stream (auto: fp32 model > 1/4 of free memory).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where torch work runs (calibration, importance, distillation, torch eval). Default: the recipe's "
                   "[build] device (auto: CUDA when present).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def compress(model, target, calib, eval_data, recover, out, auto, strict, no_cache, stream, device, force):
    """Compress MODEL for a target and validate it: the main job.

    prune (+recover) -> smooth -> export (once) -> plan int8 -> quantize the graph -> validate -> bundle.
    Exit code 0: no gate failed (unverified gates warn); 1: a gate failed (bundle still written);
    2: bad input.

    \b
    Example:
        edgekit compress --target cpu4
        edgekit compress ./my-v3-checkpoint --target my_recipe.toml --eval held_out.txt -o bundle/
    """
    from rich.console import Console

    from . import dist
    from .pipeline import compress as run
    from .report_text import render_report

    with dist.session() as w:
        res = run(model, target, calib=calib, eval_data=eval_data, recover=recover, out=out, strict=strict,
                  auto=auto, use_cache=not no_cache, console=Console(stderr=True) if w.is_main else None,
                  force=force, stream=stream, device=device)
    if res is None:  # a rank other than 0: it took part in prune + recover only
        return
    render_report(res.report, res.bundle)
    sys.exit(res.exit_code)


@cli.command()
@click.argument("bundle")
@click.option("--target", default=None, help="Validate against another target or recipe (default: the bundle's).")
@click.option("--eval", "eval_data", default=None, help="Evaluation text (default: shipped eval split).")
@click.option("--report-dir", default=None, help="Where to write report.json/html (default: BUNDLE/device-report).")
@click.option("--strict", is_flag=True, help="Treat unverified gates as failures.")
def validate(bundle, target, eval_data, report_dir, strict):
    """Re-validate BUNDLE on this machine (a device validation run); writes a fresh report beside it."""
    from pathlib import Path

    from .outputs import writable_dir
    from .report import write_report
    from .report_text import render_report
    from .validate import validate_bundle

    d = writable_dir(report_dir or Path(bundle) / "device-report")
    r = validate_bundle(bundle, target, eval_data)
    d.mkdir(parents=True, exist_ok=True)
    write_report(d, r)
    render_report(r, d)
    st = [g["status"] for g in r["gates"].values()]
    sys.exit(1 if "fail" in st or (strict and "unverified" in st) else 0)


@cli.group(cls=Group)
def devices():
    """Device validation runs."""


@devices.command(name="report")
@click.argument("root", default="device_runs")
@click.option("--markdown", is_flag=True, help="Print a markdown table.")
def devices_report(root, markdown):
    """Render a device x gate matrix from the report.json files under ROOT."""
    from .devices import collect, matrix, to_markdown
    from .report_text import render_matrix

    head, rows = matrix(collect(root))
    click.echo(to_markdown(head, rows)) if markdown else render_matrix(head, rows)


@cli.group(cls=Group)
def cache():
    """The stage cache ($EDGEKIT_CACHE or ~/.cache/edgekit): every entry carries a content hash."""


@cache.command(name="ls")
def cache_ls():
    """List cache entries: stage, key, size, age and whether the content hash holds."""
    from .report_text import render_cache
    from .stagecache import StageCache

    render_cache(StageCache().entries(check=False))


@cache.command(name="verify")
def cache_verify():
    """Re-hash every entry; exit 1 when one is corrupt (it is rebuilt on its next use)."""
    from .report_text import render_cache
    from .stagecache import StageCache

    rows = StageCache().entries(check=True)
    render_cache(rows)
    sys.exit(1 if any(r["status"] != "ok" for r in rows) else 0)


@cache.command(name="clear")
@click.option("--stage", default=None, help="Only this stage (prune, export, quantize, baseline, score).")
def cache_clear(stage):
    """Remove cache entries (only directories edgekit wrote there)."""
    from .stagecache import StageCache

    n, freed = StageCache().clear(stage)
    click.echo(f"removed {n} entries ({freed / 1e6:.1f} MB)")


def main():
    import signal

    # SIGTERM unwinds like Ctrl-C, so staging and scratch dirs are removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cli(prog_name="edgekit")


if __name__ == "__main__":
    main()
