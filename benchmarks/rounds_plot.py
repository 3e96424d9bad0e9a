"""Plot of an interleaved run (``run.py --rounds N``): every variant's timings round by round.

    python -m benchmarks.rounds_plot RESULTS.json [OUT.png]     # OUT defaults to RESULTS.png

What: one row of panels per model, one panel per timing (prefill-128 p50, decode ms/token at
context 128 and 1024), one line per variant over the rounds; the panel's title gives the
per-round ratio edgekit-cpu4 ÷ llama-q8_0 (median [min-max]) where run.py paired them.
Why: on a machine whose speed drifts, a table of medians hides that the variants moved together;
the lines show the drift and what stays between them.
Failure modes: a results file without rounds (a run with ``--rounds 1``) has nothing to plot and
returns False; matplotlib missing also returns False (the table is the result, the plot a view).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = (("prefill_p50_ms", "prefill-128 p50 ms"), ("decode_ms_ctx128", "decode ms/token, ctx 128"),
          ("decode_ms_ctx1024", "decode ms/token, ctx 1024"))


def plot(doc: dict, out: Path) -> bool:
    """Write ``out`` (PNG) from a run.py results document; False when there is nothing to plot."""
    rows = [r for r in doc.get("rows", []) if r.get("rounds")]
    if not rows:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    pairs = doc.get("paired_ratios") or {}
    fig, axes = plt.subplots(len(models), len(PANELS), figsize=(4.2 * len(PANELS), 3.2 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, (key, label) in enumerate(PANELS):
            ax = axes[i][j]
            for r in (r for r in rows if r["model"] == model):
                xs = [n + 1 for n, x in enumerate(r["rounds"]) if x and x.get(key) is not None]
                ys = [x[key] for x in r["rounds"] if x and x.get(key) is not None]
                if ys:
                    ax.plot(xs, ys, marker="o", label=r["variant"])
            p = pairs.get(model, {}).get(key)
            title = f"{model}: {label}"
            if p:
                title += f"\nedgekit ÷ llama per round {p['median']:.2f} [{p['min']:.2f}-{p['max']:.2f}]"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    host = doc.get("host", {})
    fig.suptitle(f"{host.get('machine') or host.get('cpu_model', '')}, {doc.get('threads')} threads, "
                 f"{doc.get('settings', {}).get('rounds', '?')} interleaved rounds", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return True


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print("usage: python -m benchmarks.rounds_plot RESULTS.json [OUT.png]", file=sys.stderr)
        return 2
    src = Path(argv[0])
    try:
        doc = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {src} ({e}); pass a run.py results .json", file=sys.stderr)
        return 2
    out = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    if not plot(doc, out):
        print(f"error: {src} has no interleaved rounds to plot (made by run.py --rounds N with N > 1?)",
              file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
