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

    \b
    Example:
        edgekit info edgekit-out/pruned --json
    """
    from .checkpoint import load
    from .info import model_info
    from .report_text import render_info

    _emit(model_info(load(model)), as_json, render_info)


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


def main():
    cli(prog_name="edgekit")


if __name__ == "__main__":
    main()
