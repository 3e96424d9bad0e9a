"""No project file refers to paths, notes or tools outside the project (issue "One export ...",
deliverable 5): the checkout must work, and read, on its own.

Scans every tracked file (``git ls-files``; a plain walk when the tree is not a git checkout) except
the shipped text corpora under ``edgekit/data/`` (third-party source code as training and eval
text) and this file. Paths inside an emulated device's root file system (``device_runs/arm64-qemu``'s
``/work/edgekit``) are the device's own and are not what this looks for.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"/work/(main|wt)\b|/work/\.|\.\./shared\b|(^|[^\w.])note[s]/")
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", "build", "dist", ".cache", "edgekit-out"}


def project_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [ROOT / n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    me = Path(__file__).resolve()                        # this file spells the patterns out
    return [p for p in files if p.is_file() and p.resolve() != me
            and not p.relative_to(ROOT).as_posix().startswith("edgekit/data/")]


def test_the_pattern_finds_outside_references():
    work, up = "/work/", ".."                          # split so this file itself names no outside path
    for s in (f"see {work}main/README.md", f"cp {up}/shared/x .", "from not" + "es/plan.md", f"PYTHONPATH={work}wt/a"):
        assert OUTSIDE.search(s), s
    for s in ("/work/edgekit in the VM", "release_notes/x", "footnotes/a"):
        assert not OUTSIDE.search(s), s


def test_no_project_file_refers_outside_the_project():
    hits = []
    for p in project_files():
        data = p.read_bytes()
        if b"\0" in data[:8192]:
            continue                                     # binary
        for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert len(project_files()) > 50, "the scan found too few files to be meaningful"
    assert not hits, "references outside the project:\n" + "\n".join(hits[:20])
