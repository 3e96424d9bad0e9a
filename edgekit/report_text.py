"""Terminal rendering (rich tables) of the dicts that library functions return.

Kept apart from the CLI so the CLI stays thin and the same dicts serve ``--json``.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(n: int) -> str:
    return f"{n / 1e6:.3f}M"


def render_info(info: dict) -> None:
    con = Console()
    con.print(f"[bold]{info.get('name') or 'model'}[/] ({info['architecture']}): "
              f"{_fmt(info['params_total'])} params, {_fmt(info['params_active'])} active per token")
    t = Table("kind", "params", "share")
    for k, v in info["breakdown"].items():
        t.add_row(k, _fmt(v), f"{100 * v / info['params_total']:.1f}%")
    con.print(t)
    lt = Table("layer", "heads", "ffn", "experts (top-k)", "ffn width")
    for r in info["layers"]:
        if r["ffn"] == "dense":
            lt.add_row(str(r["layer"]), str(r["heads"]), "dense", "-", str(r["intermediate_size"]))
        else:
            lt.add_row(str(r["layer"]), str(r["heads"]), "moe", f"{r['experts']} ({r['top_k']})",
                       str(r["expert_intermediate"]))
    con.print(lt)
    kv = info["kv_cache"]
    con.print(f"KV cache: {kv['latent']} B/token (MLA latent, fp32) vs {kv['per_head_kv']} B/token "
              f"for per-head K/V ({kv['ratio']:.1f}x smaller)")


def render_targets(recipes, where: dict[str, list[str]] | None = None) -> None:
    t = Table("target", "threads", "ops", "prefill p95", "decode p95", "acc. drop", "size vs fp32")
    for r in recipes:
        g = r.goals
        t.add_row(r.target.name, str(r.target.threads), r.target.ops, f"{g.latency_prefill_p95_ms:g} ms",
                  f"{g.latency_decode_p95_ms:g} ms", f"{100 * g.accuracy_drop:.1f} pts",
                  f"<= {g.size_ratio:g} (goal {g.size_ratio_goal:g})")
    con = Console()
    con.print(t)
    for r in recipes:
        con.print(f"[bold]{r.target.name}[/]: {r.target.description}. Recommended: {r.target.hardware_recommendation}")
    if where is None:
        return
    con.print("\n[bold]Validated where[/] (committed device runs, device_runs/; a latency gate reads pass/fail only "
              "from a host that represents the target):")
    for r in recipes:
        lines = where.get(r.target.name) or ["no device run committed"]
        if r.target.ops == "web":
            lines = lines + ["browser: sample_apps/web in headless Chromium (tests/test_sample_apps.py): greedy "
                             "tokens equal the Python runtime's; latency is measured in the browser, not gated"]
        for i, line in enumerate(lines):
            con.print(f"  {r.target.name if i == 0 else '':<13} {line}")


def _rounds_note(g: dict) -> str:
    """A latency gate measured in rounds: its value is their median p95; say so, with their spread."""
    r = g.get("rounds_p95")
    return f"median of {len(r)} rounds' p95 ({min(r):.4g}-{max(r):.4g})" if r else ""


def render_report(r: dict, where) -> None:
    con = Console()
    color = {"pass": "green", "fail": "red", "unverified": "yellow"}
    t = Table("gate", "value", "limit", "status", "note")
    for k, g in r["gates"].items():
        v = g["value"]
        t.add_row(k, "-" if v is None else f"{v:.4g}", f"{g['limit']:g}",
                  f"[{color[g['status']]}]{g['status']}[/]", g.get("reason", "")[:60] or _rounds_note(g))
    con.print(t)
    c = r["compressed"]
    con.print(f"accuracy {100 * c['accuracy']:.2f}% (fp32 {100 * r['baseline']['accuracy']:.2f}%), "
              f"size {c['size_bytes'] / 1e6:.2f} MB (fp32 {r['baseline']['onnx_bytes'] / 1e6:.2f} MB), "
              f"peak RSS {c['peak_rss_mb']:.0f} MB")
    dom = r.get("domains")
    if dom:
        ood = ", ".join(f"{d} {100 * o['drop_points']:+.2f} pts ({100 * o['fp32_accuracy']:.1f}% -> "
                        f"{100 * o['accuracy']:.1f}%)" for d, o in dom["out_of_domain"].items())
        con.print(f"target domain {dom['target']} (gated); other domains, drop not gated: {ood or 'none'}")
    con.print(f"[bold {color[r['status']]}]{r['status'].upper()}[/] target {r['target']} -> {where}")


def render_matrix(head, rows) -> None:
    t = Table(*head)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def render_cache(rows: list[dict]) -> None:
    con = Console()
    t = Table("stage", "key", "size", "age", "status")
    for r in rows:
        age = "?" if r["age_s"] is None else f"{r['age_s'] / 3600:.1f} h"
        t.add_row(r["stage"], r["key"], f"{r['bytes'] / 1e6:.2f} MB", age, r["status"])
    con.print(t)
    con.print(f"{len(rows)} entries, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB")
