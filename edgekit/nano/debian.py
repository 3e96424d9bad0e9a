"""Fetch pinned Debian packages and read text files out of them, offline from everything but apt.

What: ``fetch(package, version, cache)`` returns the ``.deb`` for ``package=version`` in ``cache``,
running ``apt-get download`` (the Debian registry, through this machine's apt sources) only when it is
not cached yet; ``extract(deb, dest)`` unpacks it with ``dpkg -x``; ``read_files(root, ...)`` yields
``(relative_path, bytes)`` for the files under a directory of the unpacked package, or under a
directory inside a tarball the package ships (``*-source`` packages ship one ``.tar.xz``), filtered
by ``fnmatch`` include/exclude patterns on the relative path.

Why apt-get + dpkg: both are on every Debian/Ubuntu host and need no network but the registry;
the corpus pins every file it uses by sha256 (``mixed.py``), so the package only has to supply
identical bytes, not an identical ``.deb``.

Invariants: files are yielded in sorted path order; tarball members are read without being
written to disk (no path traversal possible); symlinks and non-regular members are skipped.

Failure modes: ``DebianError`` naming the fix when apt-get or dpkg is missing, the package cannot
be downloaded, or the expected directory/tarball is absent. When the pinned version has left the
archive (Debian keeps only the newest point release), ``fetch`` falls back to the current version
with a note: the per-file sha256 check decides whether its files are still the pinned ones.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path


class DebianError(RuntimeError):
    """A package cannot be fetched or read; the message says how to fix it."""


def _cached(package: str, version: str, cache: Path) -> Path | None:
    plain = version.split(":", 1)[-1]           # apt-get names epoch versions 1%3a2.3 on disk
    for f in sorted(cache.glob(f"{package}_*.deb")):
        v = f.name[len(package) + 1:].rsplit("_", 1)[0].replace("%3a", ":")
        if v == version or v.split(":", 1)[-1] == plain:
            return f
    return None


def _apt_download(spec: str, cache: Path) -> subprocess.CompletedProcess:
    if shutil.which("apt-get") is None:
        raise DebianError("apt-get not found; build the corpus on a Debian/Ubuntu host (or copy the .deb "
                          "files into the --deb-cache directory)")
    return subprocess.run(["apt-get", "download", spec], cwd=cache, capture_output=True, text=True)


def fetch(package: str, version: str, cache: Path) -> Path:
    """The .deb of ``package=version`` in ``cache`` (downloaded once); see the module docstring for
    the fallback when that version is no longer in the archive."""
    cache.mkdir(parents=True, exist_ok=True)
    hit = _cached(package, version, cache)
    if hit:
        return hit
    r = _apt_download(f"{package}={version}", cache)
    if r.returncode == 0 and _cached(package, version, cache):
        return _cached(package, version, cache)
    r2 = _apt_download(package, cache)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if r2.returncode != 0 or not found:
        err = (r2.stderr or r.stderr).strip().splitlines()
        raise DebianError(f"cannot download Debian package {package} ({err[-1] if err else 'no output'}); "
                          "run `apt-get update` first, or put the .deb into the --deb-cache directory")
    print(f"note: {package}={version} is no longer in the archive; using {found[-1].name} "
          "(its files are still checked against the pinned sha256)", file=sys.stderr)
    return found[-1]


def extract(deb: Path, dest: Path) -> Path:
    """``dpkg -x deb dest`` (skipped when ``dest`` already holds this .deb's files)."""
    stamp = dest / ".extracted-from"
    if stamp.exists() and stamp.read_text() == deb.name:
        return dest
    if shutil.which("dpkg") is None:
        raise DebianError("dpkg not found; build the corpus on a Debian/Ubuntu host")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    r = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        raise DebianError(f"dpkg -x {deb.name} failed ({r.stderr.strip()}); delete it from the cache and re-run")
    stamp.write_text(deb.name)
    return dest


def _wanted(rel: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in include) and not any(fnmatch.fnmatchcase(rel, p) for p in exclude)


def read_files(unpacked: Path, root: str, include: tuple[str, ...], exclude: tuple[str, ...] = (),
               tarball: str = "", max_bytes: int = 0) -> Iterator[tuple[str, bytes]]:
    """(path relative to ``root``, bytes) for the wanted regular files of at most ``max_bytes``
    (0: any size), sorted by path. ``root`` is a directory of the unpacked package, or, with
    ``tarball`` (a path inside the package), a directory inside that tarball."""
    fits = (lambda n: n <= max_bytes) if max_bytes else (lambda n: True)
    if tarball:
        tb = unpacked / tarball
        if not tb.is_file():
            raise DebianError(f"{tarball} not found in the unpacked package; the package layout changed, re-pin")
        prefix = root.rstrip("/") + "/"
        out = []
        with tarfile.open(tb, mode="r|*") as tf:   # one sequential pass: compressed tarballs cannot seek cheaply
            for m in tf:
                rel = m.name[len(prefix):]
                if m.isreg() and m.name.startswith(prefix) and fits(m.size) and _wanted(rel, include, exclude):
                    out.append((rel, tf.extractfile(m).read()))
        yield from sorted(out)
        return
    base = unpacked / root
    if not base.is_dir():
        raise DebianError(f"{root} not found in the unpacked package; the package layout changed, re-pin")
    for f in sorted(base.rglob("*")):
        rel = f.relative_to(base).as_posix()
        if f.is_file() and not f.is_symlink() and fits(f.stat().st_size) and _wanted(rel, include, exclude):
            yield rel, f.read_bytes()
