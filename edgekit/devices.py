"""Device validation runs: collect committed ``report.json`` files into a device x gate matrix.

What: ``collect(root)`` finds every ``report.json`` under ``root`` (one folder per device run, as
``edgekit validate --report-dir`` writes them), and ``matrix(runs)`` returns rows of
(device, target, gate statuses with values, overall status). ``to_markdown`` renders it.
``validated_where(runs)`` says per target where it was checked: on a real device, emulated
(qemu-user), or only on a host that cannot represent it; ``edgekit targets`` prints it.

Why: a bundle's latency gates can only pass on a machine that represents the target; the matrix
is the evidence, run by run, of where a bundle was checked and what it measured there.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgekitError


def collect(root: str | Path) -> list[dict]:
    root = Path(root)
    if not root.is_dir():
        raise EdgekitError(f"{root} is not a directory; pass the folder holding device runs (device_runs/)")
    runs = []
    for f in sorted(root.rglob("report.json")):
        try:
            r = json.loads(f.read_text())
        except ValueError:
            raise EdgekitError(f"{f} is not valid JSON; re-run `edgekit validate` for that device") from None
        r["_path"] = str(f.parent.relative_to(root))
        runs.append(r)
    if not runs:
        raise EdgekitError(f"no report.json under {root}; run `edgekit validate BUNDLE --report-dir {root}/NAME`")
    return runs


def _device(r: dict) -> str:
    h = r.get("host", {})
    return f"{h.get('cpu_model', '?')} ({h.get('cores', '?')} cores{', ' + '/'.join(h['isa']) if h.get('isa') else ''})"


def matrix(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    gates = sorted({g for r in runs for g in r.get("gates", {})})
    head = ["run", "device", "target"] + gates + ["status"]
    rows = []
    for r in runs:
        cells = []
        for g in gates:
            x = r.get("gates", {}).get(g)
            if x is None:
                cells.append("-")
            else:
                v = x.get("value")
                cells.append(f"{x['status']} ({v:.4g})" if isinstance(v, (int, float)) else x["status"])
        rows.append([r["_path"], _device(r), r.get("target", "?")] + cells + [r.get("status", "?")])
    return head, rows


def to_markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def how(r: dict) -> str:
    """How a run's host relates to its target: emulated, a real device, or a host whose latency is unverified."""
    h, gates = r.get("host", {}), r.get("gates", {})
    dev = f"{h.get('cpu_model', '?')}, {h.get('cores', '?')} cores"
    if h.get("emulated"):
        return f"emulated ({h.get('arch', '?')} under user-mode emulation): correctness only"
    lat = [g["status"] for k, g in gates.items() if k.startswith("latency")]
    if lat and all(s in ("pass", "fail") for s in lat):
        return f"real device ({dev})"
    return f"host that cannot represent the target ({dev}): correctness only"


def validated_where(runs: list[dict]) -> dict[str, list[str]]:
    """{target: ["run: how; gates", ...]} from device runs."""
    out: dict[str, list[str]] = {}
    for r in runs:
        gates = ", ".join(f"{k.replace('latency_', '').replace('_p95_ms', '')} {g['status']}"
                          for k, g in r.get("gates", {}).items())
        out.setdefault(r.get("target", "?"), []).append(f"{r['_path']}: {how(r)}; {gates}")
    return out
