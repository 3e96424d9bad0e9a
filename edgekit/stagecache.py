"""Content-addressed cache of pipeline stage artifacts, so a re-run after a failure resumes.

What: ``StageCache(root).get(stage, key_parts, build)`` returns ``root/<stage>/<hash>/``, calling
``build(tmp_dir)`` only when that directory does not exist yet. The hash covers everything the
artifact depends on (input artifact hash, stage config, data hash, edgekit's source code).

Invariants: an entry appears complete or not at all (built in a temp dir, renamed into place);
``build`` may write a ``meta.json`` that the pipeline reads back on a cache hit.
Root: ``$EDGEKIT_CACHE`` or ``~/.cache/edgekit``; ``--no-cache`` uses a throwaway directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .atomic import atomic_dir


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
    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*")):
        if p.is_file() and p.name != "meta.json":
            h.update(str(p.relative_to(d)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]


class StageCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_root()
        self.hits: list[str] = []

    def path(self, stage: str, key_parts) -> Path:
        """Where the entry for ``key_parts`` lives (whether or not it exists yet)."""
        return self.root / stage / digest(stage, key_parts)

    def get(self, stage: str, key_parts, build: Callable[[Path], None]) -> Path:
        out = self.path(stage, key_parts)
        if out.is_dir():
            self.hits.append(stage)
            return out
        with atomic_dir(out) as tmp:
            build(tmp)
        return out
