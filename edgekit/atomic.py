"""Directories that appear complete or not at all, and scratch dirs that do not outlive their process.

What: ``with atomic_dir(out) as tmp:`` yields a temp dir beside ``out`` (same filesystem); when the
block succeeds, ``tmp`` gets ordinary permissions, the ``edgekit.outputs`` marker file, and
replaces ``out`` (an old ``out`` is moved aside first and removed only after the swap); when it
raises, ``tmp`` is removed and ``out`` is untouched. Every writer of checkpoints, exports, int8
models and bundles goes through this, so a failure never leaves a half-written artifact.
``scratch_dir(prefix, parent)`` makes a private temp dir for intermediate work.

Invariants:
- ``finalize`` replaces only what ``edgekit.outputs.check_replace`` allows (nothing, an empty dir,
  a dir edgekit wrote, or a dir the user forced); a file or a foreign directory raises
  ``EdgekitError`` and ``out`` stays as it was.
- a failed block's staging dir is removed with SIGTERM held back (``discard``): a launcher that
  follows one failing rank with SIGTERM to the others (torchrun) cannot cut the removal short; the
  signal reaches its handler when the dir is gone.
- staging and scratch dirs carry the host and the pid of their writer in their name
  (``.NAME.tmp-<host>-<pid>-*``); dirs whose process is gone (``kill -9``, power loss) are removed
  the next time a dir with the same prefix is made, and ``.NAME.old`` left between the two
  renames of a killed swap is moved back to ``NAME``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix><host>-<pid>-*`` dirs of this host whose process has exited."""
    removed = []
    if not parent.is_dir():
        return removed
    mine = f"{prefix}{_host()}-"
    for p in parent.glob(f"{glob_escape(mine)}*"):
        pid = p.name[len(mine):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in s)


def scratch_dir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A private temp dir named after this process; stale ones of dead processes are swept first."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    sweep(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_host()}-{os.getpid()}-", dir=parent))


def _old(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = _old(out)
    if old.is_dir() and not old.is_symlink():          # a swap was killed between its two renames
        if out.exists() or out.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out)
    return scratch_dir(f".{out.name}.tmp-", out.parent)


def finalize(tmp: Path, out: Path) -> Path:
    """Replace ``out`` with the complete ``tmp`` (only where ``outputs.check_replace`` allows it)."""
    from .outputs import check_replace, write_marker

    check_replace(out)
    write_marker(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
    if out.exists():
        old = _old(out)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def discard(tmp: Path) -> None:
    """Remove a staging dir whose write failed. A SIGTERM arriving meanwhile is held and delivered to
    the handler it would have reached once the dir is gone (that handler raises ``SystemExit`` in
    edgekit's commands, which would otherwise stop the removal halfway). Handlers can only be swapped
    on the main thread; elsewhere the removal runs as is."""
    held: list[int] = []
    try:
        prev = signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    except ValueError:                                     # not the main thread
        shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
        if held and callable(prev):
            prev(held[0], None)
        elif held and prev in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def atomic_dir(out: str | os.PathLike):
    out = Path(out)
    tmp = None
    try:
        tmp = staging_dir(out)        # inside the try: a signal right after mkdtemp still cleans up
        yield tmp
        finalize(tmp, out)
    except BaseException:
        if tmp is not None:
            discard(tmp)
        raise
