"""Content-addressed cache of pipeline stage artifacts, so a re-run after a failure resumes.

What: ``StageCache(root).get(stage, key_parts, build)`` returns ``root/<stage>/<key>/``, calling
``build(tmp_dir)`` only when no intact entry exists. The key covers everything the artifact
depends on (input artifact hash, stage config, data hash, edgekit's source code). ``entries()``
and ``clear()`` back ``edgekit cache ls|verify|clear``.

Invariants:
- an entry appears complete or not at all (built in a temp dir, renamed into place);
- every entry carries ``ENTRY_FILE``: sha256 and size of each of its files and one hash over all
  of them, written when the entry is built and checked on every hit (sizes first, then hashes).
  A missing, unreadable or mismatching record makes the hit a miss: the entry is removed and
  rebuilt with a warning, so a corrupted or edited artifact (a model, a ``meta.json``) is never
  used. Entries are never modified after they are built.
- ``clear`` removes only directories shaped like entries (``<stage>/<20 hex>``) under the root.
Root: ``$EDGEKIT_CACHE`` or ``~/.cache/edgekit``; ``--no-cache`` uses a throwaway directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .atomic import atomic_dir
from .bundle import sha256
from .errors import EdgekitError

ENTRY_FILE = ".edgekit-cache.json"
_KEY = re.compile(r"^[0-9a-f]{20}$")


def default_root() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def code_fingerprint() -> str:
    """Hash of edgekit's own source: a code change invalidates cached artifacts, not only a version bump."""
    h = hashlib.sha256(__version__.encode())
    for p in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()


def digest(*parts) -> str:
    h = hashlib.sha256(code_fingerprint().encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def dir_digest(d: Path) -> str:
    """Hash of a directory's files (names and contents)."""
    from .outputs import MARKER

    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*")):
        if p.is_file() and p.name not in ("meta.json", ENTRY_FILE, MARKER):
            h.update(str(p.relative_to(d)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]


def _content(d: Path) -> list[Path]:
    from .outputs import MARKER

    return sorted(p for p in d.rglob("*") if p.name not in (ENTRY_FILE, MARKER) and not p.is_dir())


def seal(d: Path, stage: str) -> dict:
    """Write ``ENTRY_FILE``: per-file sha256 + size and one hash over them all."""
    files = {}
    for p in _content(d):
        if p.is_symlink() or not p.is_file():
            raise EdgekitError(f"stage {stage} wrote {p.name}, which is not a regular file")
        files[str(p.relative_to(d))] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    record = {"stage": stage, "edgekit_version": __version__, "created": time.time(), "files": files,
              "sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}
    (d / ENTRY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def verify_entry(d: Path) -> str | None:
    """None when the entry is intact, else why not (one phrase)."""
    try:
        record = json.loads((d / ENTRY_FILE).read_text())
        files = record["files"]
        if not isinstance(files, dict) or record["sha256"] != hashlib.sha256(
                json.dumps(files, sort_keys=True).encode()).hexdigest():
            return "its content record is corrupt"
    except FileNotFoundError:
        return "it has no content record"
    except (OSError, ValueError, KeyError, TypeError):
        return "its content record is corrupt"
    present = {str(p.relative_to(d)) for p in _content(d)}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        return f"file {(missing or extra)[0]} is {'missing' if missing else 'not in its record'}"
    for name, meta in files.items():
        p = d / name
        if p.is_symlink() or not p.is_file():
            return f"{name} is not a regular file"
        if p.stat().st_size != meta.get("bytes"):
            return f"{name} has {p.stat().st_size} bytes, {meta.get('bytes')} when built"
    for name, meta in files.items():
        if sha256(d / name) != meta.get("sha256"):
            return f"{name} does not match its hash"
    return None


class StageCache:
    def __init__(self, root: Path | None = None, log: Callable[[str], None] | None = None):
        self.root = Path(root) if root else default_root()
        self.hits: list[str] = []
        self.rebuilt: list[str] = []
        self.log = log or (lambda m: print(m, file=sys.stderr))

    def path(self, stage: str, key_parts) -> Path:
        """Where the entry for ``key_parts`` lives (whether or not it exists yet)."""
        return self.root / stage / digest(stage, key_parts)

    def lookup(self, stage: str, key_parts) -> Path | None:
        """The intact entry for ``key_parts``, or None (a damaged one is removed with a warning)."""
        out = self.path(stage, key_parts)
        if out.is_dir() and not out.is_symlink():
            why = verify_entry(out)
            if why is None:
                return out
            self.log(f"warning: stage cache entry {stage}/{out.name} is not intact ({why}); rebuilding it")
            self.rebuilt.append(stage)
            shutil.rmtree(out)
        return None

    def get(self, stage: str, key_parts, build: Callable[[Path], None]) -> Path:
        out = self.lookup(stage, key_parts)
        if out is not None:
            self.hits.append(stage)
            return out
        out = self.path(stage, key_parts)
        with atomic_dir(out) as tmp:
            build(tmp)
            seal(tmp, stage)
        return out

    # -- edgekit cache ls|verify|clear -----------------------------------------------------------
    def _entry_dirs(self, stage: str | None = None) -> list[Path]:
        if not self.root.is_dir():
            return []
        stages = [self.root / stage] if stage else sorted(p for p in self.root.iterdir() if p.is_dir())
        return sorted(e for s in stages if s.is_dir() and not s.is_symlink() for e in s.iterdir()
                      if e.is_dir() and not e.is_symlink() and _KEY.match(e.name))

    def entries(self, check: bool = True) -> list[dict]:
        """One row per entry: stage, key, bytes, age, status ("ok", "unchecked" or why it is not intact)."""
        rows = []
        for e in self._entry_dirs():
            size = sum(p.stat().st_size for p in e.rglob("*") if p.is_file() and not p.is_symlink())
            why = verify_entry(e) if check else None
            try:
                created = json.loads((e / ENTRY_FILE).read_text()).get("created")
            except (OSError, ValueError, AttributeError):
                created, why = None, why or "its content record is missing or corrupt"
            rows.append({"stage": e.parent.name, "key": e.name, "bytes": size, "path": str(e),
                         "age_s": None if not isinstance(created, (int, float)) else round(time.time() - created),
                         "status": why or ("ok" if check else "unchecked")})
        return rows

    def clear(self, stage: str | None = None) -> tuple[int, int]:
        n = freed = 0
        for e in self._entry_dirs(stage):
            freed += sum(p.stat().st_size for p in e.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(e)
            n += 1
        return n, freed

