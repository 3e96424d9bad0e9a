"""report.json (schema below) and report.html (tables + plots) for a validated bundle.

report.json::

    {
      "target": "cpu4",
      "status": "pass" | "fail" | "unverified",   # fail if any gate failed; unverified if none failed
                                                  # but some could not be measured on this host
      "gates": {                                  # each {"value", "limit", "status", ...}
        "accuracy_drop":          {...},          # fp32 torch accuracy - bundle accuracy, as a fraction
        "accuracy_drop_relative": {...},          # that drop / fp32 accuracy (both accuracy gates must hold)
        "latency_prefill_p95_ms": {...},          # prefill of goals.prefill_tokens tokens
        "latency_decode_p95_ms":  {...},          # per generated token
        "size_ratio":             {..., "goal", "goal_met"}   # bundle graph bytes / fp32 ONNX bytes
      },
      "host": {...},        # CPU model, cores, ISA flags, onnxruntime version, why latency is unverified
      "baseline": {...},    # fp32: torch accuracy/perplexity, fp32 ONNX size and latency
      "compressed": {...},  # the bundle: accuracy, perplexity, size, latency p50/p95 + samples, peak RSS
      "stages": [...],      # per pipeline stage: params, accuracy, size, seconds
      "domains": {...},     # with a target domain: its name and the drop on every other domain the
                            # model was trained on (reported, not gated)
      "auto": {...},        # with --auto: every candidate tried and the Pareto front
      "distributed": {...}  # under torchrun: world_size, seconds and cache hit of the prune stage on all ranks
    }

Gate status is ``pass``, ``fail`` or ``unverified``; a latency gate is never ``pass`` on a host
that cannot represent the target (fewer cores than its threads, other CPU architecture).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def gate(value, limit, *, unverified_reason: str | None = None, **extra) -> dict:
    if unverified_reason:
        status = "unverified"
    else:
        status = "pass" if value is not None and value <= limit else "fail"
    g = {"value": value, "limit": limit, "status": status, **extra}
    if unverified_reason:
        g["reason"] = unverified_reason
    return g


def overall(gates: dict) -> str:
    st = [g["status"] for g in gates.values()]
    return "fail" if "fail" in st else "unverified" if "unverified" in st else "pass"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(r: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    lat = {k: v for k, v in ((k, r.get(k, {}).get("latency") or {}) for k in ("baseline", "compressed")) if v}
    if lat:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        for ax, key, limit in zip(axes, ("prefill_ms", "decode_ms"),
                                  ("latency_prefill_p95_ms", "latency_decode_p95_ms")):
            for name, L in lat.items():
                if L.get(key, {}).get("samples"):
                    ax.hist(L[key]["samples"], bins=20, alpha=0.6, label=name)
            g = r["gates"].get(limit)
            if g:
                ax.axvline(g["limit"], color="r", ls="--", label="p95 budget")
            ax.set_title(key.replace("_ms", " latency (ms)"))
            ax.legend()
        out.append(("Latency distributions", _png(fig)))
    stages = [s for s in r.get("stages", []) if s.get("accuracy") is not None or s.get("size_bytes")]
    if stages:
        fig, ax1 = plt.subplots(figsize=(8, 3.2))
        names = [s["name"] for s in stages]
        ax1.bar(names, [(s.get("size_bytes") or 0) / 1e6 for s in stages], color="#8ab")
        ax1.set_ylabel("size (MB)")
        ax2 = ax1.twinx()
        ax2.plot(names, [100 * s["accuracy"] if s.get("accuracy") is not None else float("nan")
                         for s in stages], "o-", color="#c40")
        ax2.set_ylabel("next-token accuracy (%)")
        ax1.set_title("Size and accuracy per stage")
        out.append(("Accuracy and size per stage", _png(fig)))
    auto = r.get("auto")
    if auto and auto.get("candidates"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in auto["candidates"]:
            ax.scatter(c["size_ratio"], 100 * c["accuracy_drop"], c="g" if c["passed"] else "r")
            ax.annotate(c["name"], (c["size_ratio"], 100 * c["accuracy_drop"]), fontsize=7)
        front = sorted(auto.get("pareto", []), key=lambda c: c["size_ratio"])
        ax.plot([c["size_ratio"] for c in front], [100 * c["accuracy_drop"] for c in front], "k--")
        ax.axhline(100 * r["gates"]["accuracy_drop"]["limit"], color="r", ls=":")
        ax.set_xlabel("size ratio vs fp32")
        ax.set_ylabel("accuracy drop (points)")
        ax.set_title("--auto search: Pareto front (green = passes every gate)")
        out.append(("Pareto front", _png(fig)))
    return out


def _table(rows: list[list], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def render_html(r: dict) -> str:
    gates = [[k, g["value"] if g["value"] is None else round(g["value"], 5), g["limit"], g["status"],
              g.get("reason", "")] for k, g in r["gates"].items()]
    host = [[k, v] for k, v in r.get("host", {}).items()]
    stages = [[s["name"], s.get("params", ""), "" if s.get("accuracy") is None else f"{100 * s['accuracy']:.2f}%",
               "" if not s.get("size_bytes") else f"{s['size_bytes'] / 1e6:.2f} MB", f"{s.get('seconds', 0):.1f}s"]
              for s in r.get("stages", [])]
    plots = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'>" for t, b in _plots(r))
    color = {"pass": "#2a2", "fail": "#c22", "unverified": "#c80"}[r["status"]]
    title = f"edgekit report: {html.escape(r['target'])}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}</style></head><body>
<h1>edgekit report: target {html.escape(r['target'])} — <span style="color:{color}">{r['status']}</span></h1>
<h2>Gates</h2>{_table(gates, ['gate', 'value', 'limit', 'status', 'note'])}
<h2>Stages</h2>{_table(stages, ['stage', 'params', 'accuracy', 'size', 'time'])}
{plots}<h2>Host</h2>{_table(host, ['fact', 'value'])}
<details><summary>report.json</summary><pre>{html.escape(json.dumps(r, indent=1)[:200000])}</pre></details>
</body></html>"""


def write_report(d: Path, r: dict) -> None:
    (d / "report.json").write_text(json.dumps(r, indent=2, default=float) + "\n")
    (d / "report.html").write_text(render_html(r))
