"""The ``edgekit`` command line. Thin by design: each command parses options, calls one library
function and prints its result; the work lives in the library modules.

Errors: ``EdgekitError`` (bad input) becomes one line on stderr and exit code 2, no traceback.
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
    """Turns library ``EdgekitError`` into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            raise UserError(str(e)) from None


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
def synth(shape, out, seed, dtype, shard_mb, list_shapes):
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
    d = do_synth(shape, out, seed=seed, dtype=dtype, shard_bytes=shard_mb << 20,
                 log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {d}")


@cli.command(name="eval")
@click.argument("model", required=False)
@click.option("--data", default="eval", show_default=True,
              help="Text file to score, or a shipped split name (eval, calib).")
@click.option("--seq-len", default=512, show_default=True, help="Window length in tokens.")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (ONNX/bundle).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(model, data, seq_len, max_tokens, threads, as_json):
    """Next-token accuracy (± standard error) and perplexity of MODEL on held-out text.

    MODEL may be a checkpoint, an exported ONNX directory or a bundle.
    """
    from .data import load_tokens
    from .evaluate import evaluate
    from .sources import open_model

    scorer, tok, kind = open_model(model, threads=threads)
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
def export(model, out, moe, no_simplify, verify):
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
@click.option("--layers", type=int, default=0, help="Whole layers removed (lowest block influence first).")
@click.option("--recover-steps", type=int, default=0, help="Distillation steps from the unpruned model.")
@click.option("--calib", default="calib", show_default=True, help="Text for importance (file or split).")
@click.option("--recipe", "recipe_path", default=None, help="TOML whose [prune] table (incl. per_layer) is used.")
def prune(model, out, experts, heads, ffn, layers, recover_steps, calib, recipe_path):
    """Structurally prune MODEL (experts, heads, channels, layers physically removed).

    Writes an ordinary Hugging Face-format checkpoint that `edgekit load/info/eval/export` read.

    \b
    Example:
        edgekit prune --experts 0.25 --recover-steps 100 -o edgekit-out/pruned
        edgekit info edgekit-out/pruned
    """
    from .prune import PruneConfig, prune_checkpoint
    from .recipes import build, load_recipe

    if recipe_path:
        cfg = load_recipe(recipe_path).prune
    else:
        cfg = build(PruneConfig, dict(experts=experts, heads=heads, ffn=ffn, layers=layers,
                                      recover_steps=recover_steps), "prune")
    d = prune_checkpoint(model, out, cfg, calib=calib)
    rec = json.loads((d / "prune.json").read_text())
    click.echo(f"wrote {d}: {rec['params_before'] / 1e6:.3f}M -> {rec['params_after'] / 1e6:.3f}M params")


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
def quantize(model, out, mode, alpha, no_smooth, max_drop, moe, keep_fp32, force_int8, export_moe, calib):
    """Symmetric int8 (SmoothQuant-scaled, accuracy-aware mixed precision) ONNX export of MODEL.

    \b
    Example:
        edgekit quantize --max-drop 0.005 -o edgekit-out/nano-int8
        edgekit eval edgekit-out/nano-int8
    """
    from .checkpoint import load, resolve
    from .quantize import DEFAULT_OVERRIDES, QuantConfig, quantize_
    from .recipes import build

    overrides = {**DEFAULT_OVERRIDES, **{p: "fp32" for p in keep_fp32}, **{p: "int8" for p in force_int8}}
    cfg = build(QuantConfig, dict(mode=mode, alpha=alpha, smooth=not no_smooth, max_drop=max_drop, moe=moe,
                                  overrides=overrides, export_moe=export_moe, calib=calib), "quantize")
    r = quantize_(load(model), out, cfg, tokenizer_from=resolve(model), log=lambda m: click.echo(m, err=True))
    ort = r["accuracy"]["ort"][-1] if r["accuracy"]["ort"] else {}
    click.echo(f"wrote {out}: {r['size_bytes'] / 1e6:.2f} MB; kept fp32: {len(r['fp32_units'])} units; "
               f"calib accuracy fp32 {ort.get('fp32', float('nan')):.4f} int8 {ort.get('int8', float('nan')):.4f}")
    click.echo("routing agreement per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in r["routing_agreement"].items()))


@cli.command()
def targets():
    """List deployment targets (export_recipes/*.toml) with their budgets."""
    from .recipes import load_recipe, target_names
    from .report_text import render_targets

    render_targets([load_recipe(n, stages=False) for n in target_names()])


@cli.command()
@click.argument("model", required=False)
@click.option("--target", default="cpu4", show_default=True, help="Target name or a recipe .toml path.")
@click.option("--calib", default=None, help="Calibration text file (default: shipped calib split).")
@click.option("--eval", "eval_data", default=None, help="Evaluation text file (default: shipped eval split).")
@click.option("--recover", default=None,
              help="Distillation text after pruning (default: v3-nano's shipped training sample, else --calib).")
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
def compress(model, target, calib, eval_data, recover, out, auto, strict, no_cache, stream, device):
    """Compress MODEL for a target and validate it: the main job.

    load -> prune (+recover) -> scale -> export -> simplify -> quantize -> validate -> bundle.
    Exit code 0: no gate failed (unverified gates warn); 1: a gate failed (bundle still written);
    2: bad input.

    \b
    Example:
        edgekit compress --target cpu4
        edgekit compress ./my-v3-checkpoint --target my_recipe.toml --eval held_out.txt -o bundle/
    """
    from rich.console import Console

    from .pipeline import compress as run
    from .report_text import render_report

    con = Console(stderr=True)
    res = run(model, target, calib=calib, eval_data=eval_data, recover=recover, out=out, strict=strict, auto=auto,
              use_cache=not no_cache, console=con, stream=stream, device=device)
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

    from .report import write_report
    from .report_text import render_report
    from .validate import validate_bundle

    r = validate_bundle(bundle, target, eval_data)
    d = Path(report_dir or Path(bundle) / "device-report")
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


def main():
    cli(prog_name="edgekit")


if __name__ == "__main__":
    main()
