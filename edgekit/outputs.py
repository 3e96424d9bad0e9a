"""What ``-o`` may replace, checked before any work starts.

What: ``prepare(out, force=False, inputs=())`` is called by every command that writes a directory
(``export``, ``prune``, ``quantize``, ``compress``) before it loads anything. It returns the
normalised path or raises ``EdgekitError`` (exit 2) when the path cannot be used. ``finalize`` in
``edgekit.atomic`` calls ``check_replace(out)`` again right before its rename, so library callers
(``edgekit.export(model, dir)``) get the same protection. Every directory edgekit writes carries a
marker file (``MARKER``); ``is_ours`` also recognises bundles and exports written before it.

Policy (why: an ``-o`` that names a user's project must not delete it):
- a missing path or an empty directory: written;
- a directory edgekit wrote: replaced when the new one is complete;
- any other directory: refused unless ``force=True`` (``--force``); a forced replacement is
  remembered for this command only (``forced``, a context variable, reset when the command ends);
- a file, a symlink, the root, the current directory (or one above it), or a directory that holds
  one of the command's inputs: always refused (a file is never moved or replaced);
- the parent: the nearest existing ancestor must be a directory in which a temp dir can be made
  (a file in the way, a read-only or full filesystem are reported before any work).

Failure modes: all ``EdgekitError`` with one line naming the fix.
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import EdgekitError

MARKER = ".edgekit-output"
MIN_FREE_BYTES = 1 << 20   # below this the disk is full for any artifact edgekit writes
_FORCED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("edgekit_forced_outputs", default=frozenset())


def write_marker(d: Path) -> None:
    (Path(d) / MARKER).write_text(json.dumps({"written_by": "edgekit", "edgekit_version": __version__}) + "\n")


def _json_format(f: Path) -> str | None:
    try:
        if f.is_file() and f.stat().st_size < 1 << 24:
            d = json.loads(f.read_text())
            return d.get("format") if isinstance(d, dict) else None
    except (OSError, ValueError):
        pass
    return None


def is_ours(d: Path) -> bool:
    """A directory edgekit wrote: the marker, or a bundle/export manifest of edgekit's formats."""
    d = Path(d)
    if (d / MARKER).is_file():
        return True
    return (_json_format(d / "manifest.json") or "").startswith("edgekit-bundle/") or \
        (_json_format(d / "export.json") or "").startswith("edgekit-onnx/")


def normalise(out: str | os.PathLike) -> Path:
    """Absolute path with ``.``/``..`` folded (``dir/.`` is ``dir``); symlinks are not followed."""
    return Path(os.path.abspath(os.fspath(out)))


def check_replace(out: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """Raise unless ``out`` may be (re)placed: absent, an empty dir, ours, or forced."""
    p = normalise(out)
    out = shown if shown is not None else out
    if p.is_symlink():
        raise EdgekitError(f"output {out} is a symbolic link; edgekit does not replace links: pass a directory path")
    if not p.exists():
        return
    if not p.is_dir():
        raise EdgekitError(f"output {out} is a file; edgekit never replaces files: pass a directory path")
    if is_ours(p) or str(p) in _FORCED.get():
        return
    try:
        empty = next(p.iterdir(), None) is None
    except OSError as e:
        raise EdgekitError(f"output {out} cannot be read ({e.strerror}); pass another -o") from None
    if not empty:
        raise EdgekitError(f"output {out} exists and was not written by edgekit; pass a new or empty directory, "
                           "or --force to replace it")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _probe(parent: Path, out) -> None:
    """Make and remove a temp dir where the output's staging dir will go."""
    anc = parent
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    if not anc.is_dir():
        raise EdgekitError(f"cannot write {out}: {anc} is a file, not a directory; pass another -o")
    try:
        t = tempfile.mkdtemp(prefix=".edgekit-probe-", dir=anc)
    except OSError as e:
        raise EdgekitError(f"cannot write {out}: {anc} is not writable ({e.strerror}); pass another -o") from None
    os.rmdir(t)
    free = shutil.disk_usage(anc).free
    if free < MIN_FREE_BYTES:
        raise EdgekitError(f"cannot write {out}: only {free} bytes free on {anc}; free space or pass another -o")


def prepare(out: str | os.PathLike, force: bool = False, inputs=()) -> Path:
    """Check an output directory before any work; ``force`` allows replacing a foreign directory."""
    p = normalise(out)
    if p.parent == p:
        raise EdgekitError(f"output {out} is the filesystem root; pass a directory path")
    if _inside(Path.cwd().resolve(), p.resolve()):
        raise EdgekitError(f"output {out} holds the current directory; replacing it would delete it: "
                           "pass a subdirectory as -o")
    for i in inputs:
        if i is None:
            continue
        src = normalise(i)
        if _inside(src, p) or _inside(src.resolve(), p.resolve()):
            raise EdgekitError(f"output {out} holds the input {i}; replacing it would delete the input: "
                               "pass another -o")
    if p.is_dir() and not p.is_symlink() and force and not is_ours(p):
        _FORCED.set(_FORCED.get() | {str(p)})
    check_replace(p, shown=out)
    _probe(p.parent, out)
    return p


def writable_dir(d: str | os.PathLike) -> Path:
    """A directory files will be written into (not replaced): not a file, and creatable/writable."""
    p = normalise(d)
    if p.exists() and not p.is_dir():
        raise EdgekitError(f"{d} is a file; pass a directory path")
    _probe(p if p.is_dir() else p.parent, d)
    return p


@contextmanager
def command_scope():
    """Forced outputs granted inside the block are forgotten when it ends."""
    token = _FORCED.set(_FORCED.get())
    try:
        yield
    finally:
        _FORCED.reset(token)
