"""The deployable bundle: what ``edgekit compress`` writes, and the one place it is verified.

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
written temp dir is renamed into place). ``manifest.json`` lists every other file except the
reports (which ``edgekit validate`` rewrites on each device) with its sha256 and size, and the
sha256 of ``report.json``'s build-time ``baseline`` (``baseline_sha256``), which is what a device
validation run compares against.

``verify(bundle)`` is the trust boundary, used by ``edgekit eval``, ``edgekit validate``,
``Engine.from_bundle`` and the sample apps:
- ``manifest.json`` is a regular file of bounded size holding an ``edgekit-bundle/1`` object;
- every listed name is a plain relative name inside the bundle (no ``..``, no absolute path, no
  backslash, nothing that resolves outside through a symlink) naming a regular file (no device,
  FIFO or directory), whose size is checked before it is hashed;
- ``files`` is not empty and lists every file a loader reads (``NEEDED``, the graph named by
  ``export.json`` and its external data);
- with ``report.json`` present, its ``baseline`` matches ``baseline_sha256``.
``read_export_spec`` checks an ``export.json`` the same way before onnxruntime sees a path from it.
Files not listed (the reports, ``device-report/``, edgekit's marker) are ignored, never read.

Failure modes: every problem raises ``EdgekitError`` with one line naming the file and the fix.
No torch import: this runs on devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from . import __version__
from .errors import EdgekitError

FORMAT = "edgekit-bundle/1"
REPORT_FILES = ("report.json", "report.html", "manifest.json")
NEEDED = ("export.json", "tokenizer.json", "recipe.toml")     # besides the graph (+ external data)
MAX_JSON_BYTES = 64 << 20                                       # manifest, export.json, report.json
_SHA = re.compile(r"^[0-9a-f]{64}$")
REBUILD = "re-copy the whole bundle directory or rebuild it with `edgekit compress`"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def baseline_digest(baseline: dict) -> str:
    """sha256 of the baseline as report.json stores it (canonical JSON of its parsed form)."""
    canon = json.loads(json.dumps(baseline, default=float))
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- paths -----------------------------------------------------------------------------------------
def member(root: str | os.PathLike, name, what: str = "bundle") -> Path:
    """``root/name`` for a plain relative name that stays inside ``root``; else ``EdgekitError``."""
    root = Path(root)
    if not isinstance(name, str) or not name or len(name) > 255 or "\\" in name or "\x00" in name:
        raise EdgekitError(f"{what} names an invalid file {name!r}; {REBUILD}")
    parts = name.split("/")
    if PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise EdgekitError(f"{what} names {name!r}, which is not a plain relative path inside {root}; {REBUILD}")
    p = root / name
    try:
        inside = p.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):       # a symlink loop
        inside = False
    if not inside:
        raise EdgekitError(f"{what} file {name} points outside {root}; {REBUILD}")
    return p


def regular_file(p: Path, name: str, what: str = "bundle") -> os.stat_result:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise EdgekitError(f"{what} file {name} is missing; {REBUILD}") from None
    except OSError as e:
        raise EdgekitError(f"{what} file {name} cannot be read ({e.strerror}); {REBUILD}") from None
    if not stat.S_ISREG(st.st_mode):
        raise EdgekitError(f"{what} file {name} is not a regular file; {REBUILD}")
    return st


def read_json(root: str | os.PathLike, name: str, what: str = "bundle", limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a bounded regular file inside ``root``."""
    p = member(root, name, what)
    st = regular_file(p, name, what)
    if st.st_size > limit:
        raise EdgekitError(f"{what} file {name} is {st.st_size} bytes, over the {limit} a valid one can be; {REBUILD}")
    try:
        data = json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise EdgekitError(f"{p} is corrupt (not valid JSON); {REBUILD}") from None
    if not isinstance(data, dict):
        raise EdgekitError(f"{p} is corrupt (not a JSON object); {REBUILD}")
    return data


# -- writing ---------------------------------------------------------------------------------------
def write_manifest(d: Path, *, model_name: str, target: str, features: list[str],
                   hardware_recommendation: str, io_spec: dict, extra: dict | None = None) -> dict:
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(d.iterdir()) if p.is_file() and p.name not in REPORT_FILES
             and not p.name.startswith(".")}
    manifest = {
        "format": FORMAT,
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


# -- reading and verifying -------------------------------------------------------------------------
def read_manifest(bundle: str | os.PathLike) -> dict:
    b = Path(bundle)
    if not b.is_dir():
        raise EdgekitError(f"{bundle} is not a directory; pass a bundle written by `edgekit compress`")
    if not (b / "manifest.json").exists():
        raise EdgekitError(f"{bundle} is not an edgekit bundle (no manifest.json); build one with "
                           "`edgekit compress`")
    m = read_json(b, "manifest.json")
    if m.get("format") != FORMAT:
        raise EdgekitError(f"{b / 'manifest.json'} has format {m.get('format')!r}, not {FORMAT!r}; {REBUILD}")
    for k, t in (("edgekit_version", str), ("model_name", str), ("target", str), ("features", list),
                 ("hardware_recommendation", str), ("files", dict)):
        if not isinstance(m.get(k), t):
            raise EdgekitError(f"{b / 'manifest.json'} is corrupt (field {k!r} is missing or not a "
                               f"{t.__name__}); {REBUILD}")
    return m


def read_target(d: str | os.PathLike) -> dict:
    """The ``[target]`` table of a bundle's (or export's) ``recipe.toml``; {} when it has none. A
    ``session_config`` there must map names to strings (onnxruntime session config entries, used
    wherever the bundle runs or is timed)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    p = Path(d) / "recipe.toml"
    if not p.exists():
        return {}
    try:
        target = tomllib.loads(p.read_text()).get("target", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise EdgekitError(f"{p} is corrupt; {REBUILD}") from None
    if not isinstance(target, dict):
        raise EdgekitError(f"{p}: [target] is not a table; {REBUILD}")
    config = target.get("session_config", {})
    if not (isinstance(config, dict) and all(isinstance(v, str) for v in config.values())):
        raise EdgekitError(f"{p}: [target] session_config must map names to strings; {REBUILD}")
    return target


def read_export_spec(d: str | os.PathLike, what: str = "export") -> dict:
    """``export.json`` of an export dir or bundle, with the fields the runtime reads checked."""
    spec = read_json(d, "export.json", what)
    where = Path(d) / "export.json"
    for k, t in (("graph", str), ("num_layers", int), ("vocab_size", int), ("max_position_embeddings", int),
                 ("inputs", list), ("outputs", list), ("cache", dict)):
        v = spec.get(k)
        if not isinstance(v, t) or isinstance(v, bool) or (t is int and v < 1):
            raise EdgekitError(f"{where} is corrupt (field {k!r} is missing or invalid); re-export the model")
    w = spec["cache"].get("width")
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        raise EdgekitError(f"{where} is corrupt (cache.width is missing or invalid); re-export the model")
    if not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in spec["inputs"] + spec["outputs"]):
        raise EdgekitError(f"{where} is corrupt (inputs/outputs must be objects with a name); re-export the model")
    member(d, spec["graph"], what)
    return spec


def needed_files(bundle: Path, spec: dict) -> list[str]:
    names = [*NEEDED, spec["graph"]]
    if spec.get("external_data"):
        names.append(spec["graph"] + ".data")
    return names


def verify(bundle: str | os.PathLike) -> dict:
    """Check the manifest and every file it lists (see the module docstring); returns the manifest."""
    b = Path(bundle)
    m = read_manifest(b)
    files = m["files"]
    if not files:
        raise EdgekitError(f"{b / 'manifest.json'} lists no files, so nothing can be verified; {REBUILD}")
    checked = []
    for name, meta in files.items():
        p = member(b, name)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not _SHA.match(meta["sha256"]) \
                or not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool) or meta["bytes"] < 0:
            raise EdgekitError(f"{b / 'manifest.json'} entry {name} is corrupt (needs sha256 and bytes); {REBUILD}")
        st = regular_file(p, name)
        if st.st_size != meta["bytes"]:
            raise EdgekitError(f"bundle file {name} does not match its manifest hash (it has {st.st_size} bytes, "
                               f"the manifest says {meta['bytes']}); {REBUILD}")
        checked.append((name, p, meta["sha256"]))
    for name, p, want in checked:
        if sha256(p) != want:
            raise EdgekitError(f"bundle file {name} does not match its manifest hash; {REBUILD}")
    if "export.json" not in files:
        raise EdgekitError(f"{b / 'manifest.json'} does not list export.json, which the bundle needs; {REBUILD}")
    missing = [n for n in needed_files(b, read_export_spec(b, "bundle")) if n not in files]
    if missing:
        raise EdgekitError(f"{b / 'manifest.json'} does not list {missing[0]}, which the bundle needs; {REBUILD}")
    if "baseline_sha256" in m and (b / "report.json").exists():
        build_baseline(b, m)
    return m


def build_baseline(bundle: str | os.PathLike, manifest: dict) -> dict:
    """The build-time fp32 baseline from report.json, checked against the manifest's hash."""
    b = Path(bundle)
    want = manifest.get("baseline_sha256")
    if not isinstance(want, str) or not _SHA.match(want):
        raise EdgekitError(f"{b / 'manifest.json'} has no hash of the build-time baseline (bundles from before "
                           "edgekit verified it); rebuild the bundle with `edgekit compress`")
    if not (b / "report.json").exists():
        raise EdgekitError(f"{b} has no report.json with the build-time baseline; {REBUILD}")
    baseline = read_json(b, "report.json").get("baseline")
    if not isinstance(baseline, dict) or baseline_digest(baseline) != want:
        raise EdgekitError(f"{b / 'report.json'}: the build-time baseline does not match its manifest hash; "
                           f"{REBUILD}")
    for k in ("accuracy", "onnx_bytes"):
        v = baseline.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v == v:
            raise EdgekitError(f"{b / 'report.json'}: baseline {k} is missing or not a number; {REBUILD}")
    return baseline


def get_version_info(bundle: str | os.PathLike) -> dict:
    """Version, features and recommended hardware of a bundle (from its manifest)."""
    m = read_manifest(bundle)
    return {"version": m["edgekit_version"], "model_name": m["model_name"], "target": m["target"],
            "features": m["features"], "hardware_recommendation": m["hardware_recommendation"]}


def read_tokenizer(d: str | os.PathLike, what: str = "model"):
    """``tokenizer.json`` of a checkpoint, export or bundle, loaded with ``tokenizers``."""
    from tokenizers import Tokenizer

    p = member(d, "tokenizer.json", what)
    if not p.exists():
        raise EdgekitError(f"{p} not found; copy the model's tokenizer.json next to its weights")
    regular_file(p, "tokenizer.json", what)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise EdgekitError(f"{p} is not a valid tokenizer ({msg}); copy the model's original tokenizer.json") from None
