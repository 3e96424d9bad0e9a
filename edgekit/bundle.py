"""The deployable bundle: what ``edgekit compress`` writes and what ``edgekit.runtime`` loads.

Layout::

    bundle/
      *.onnx (+ external data)  the graphs (names and I/O in export.json and the manifest)
      export.json               graph I/O spec written by edgekit.export
      config.json               the (pruned) model config
      tokenizer.json
      recipe.toml               the recipe as applied
      reference.json            prompts and the greedy tokens this bundle produced at build time
      report.json, report.html  validation results (see edgekit/report.py for the schema)
      manifest.json             version, model, target, features, hardware_recommendation, I/O, hashes

Invariants: a bundle directory appears complete or not at all (``edgekit.atomic``: a fully
written temp dir is renamed into place). ``manifest.json`` hashes every other file except the reports (which
``edgekit validate`` rewrites on each device); ``verify`` re-checks them.

Failure modes: a missing or tampered bundle raises ``EdgekitError`` naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import __version__
from .errors import EdgekitError

REPORT_FILES = ("report.json", "report.html", "manifest.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(d: Path, *, model_name: str, target: str, features: list[str],
                   hardware_recommendation: str, io_spec: dict, extra: dict | None = None) -> dict:
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(d.iterdir()) if p.is_file() and p.name not in REPORT_FILES}
    manifest = {
        "format": "edgekit-bundle/1",
        "edgekit_version": __version__,
        "model_name": model_name,
        "target": target,
        "features": features,
        "hardware_recommendation": hardware_recommendation,
        "io": io_spec,
        "files": files,
        **(extra or {}),
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(bundle: str | os.PathLike) -> dict:
    f = Path(bundle) / "manifest.json"
    if not f.exists():
        raise EdgekitError(f"{bundle} is not an edgekit bundle (no manifest.json); build one with "
                           "`edgekit compress`")
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise EdgekitError(f"{f} is corrupt; rebuild the bundle with `edgekit compress`") from None


def verify(bundle: str | os.PathLike) -> dict:
    """Check every file against the manifest's hashes; returns the manifest."""
    m = read_manifest(bundle)
    for name, meta in m["files"].items():
        p = Path(bundle) / name
        if not p.exists():
            raise EdgekitError(f"bundle file {name} is missing; copy the whole bundle directory")
        if sha256(p) != meta["sha256"]:
            raise EdgekitError(f"bundle file {name} does not match its manifest hash; re-copy or rebuild the bundle")
    return m


def get_version_info(bundle: str | os.PathLike) -> dict:
    """Version, features and recommended hardware of a bundle (from its manifest)."""
    m = read_manifest(bundle)
    return {"version": m["edgekit_version"], "model_name": m["model_name"], "target": m["target"],
            "features": m["features"], "hardware_recommendation": m["hardware_recommendation"]}
