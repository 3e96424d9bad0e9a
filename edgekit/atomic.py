"""Directories that appear complete or not at all.

What: ``with atomic_dir(out) as tmp:`` yields a temp dir beside ``out`` (same filesystem); when the
block succeeds, ``tmp`` gets ordinary permissions and replaces ``out`` (an old ``out`` is moved
aside first and removed only after the swap); when it raises, ``tmp`` is removed and ``out`` is
untouched. Every writer of checkpoints, exports, int8 models and bundles goes through this, so a
failure never leaves a half-written artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def finalize(tmp: Path, out: Path) -> Path:
    """Replace ``out`` with the complete ``tmp``."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


@contextmanager
def atomic_dir(out: str | os.PathLike):
    out = Path(out)
    tmp = staging_dir(out)
    try:
        yield tmp
        finalize(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
