"""Build v3-nano's offline text corpus from this machine's Python standard-library sources.

What: every ``*.py`` under the running interpreter's stdlib (``sysconfig`` "stdlib", which for a venv
is the base interpreter's; ``site-packages`` excluded; test directories included) is read as bytes,
decoded as strict UTF-8, and assigned to one split BY FILE:

- ``eval``  (held out; ``edgekit/data/splits/eval.txt``, shipped),
- ``calib`` (for quantization calibration; ``edgekit/data/splits/calib.txt``, shipped),
- ``train`` (everything else; ``.corpus/train.txt``, git-ignored, never committed).

Split rule (deterministic, independent of file order on disk): files are ranked by
``sha256(relative_path)``; walking that ranking, files of at most ``HELDOUT_MAX_FILE_BYTES`` fill
``eval`` until it holds ``EVAL_TARGET_BYTES``, then ``calib`` until ``CALIB_TARGET_BYTES``; every
other file is ``train``. Big files stay in train so the held-out splits are many small documents.

Document separator: documents are concatenated with ``SEPARATOR`` = ``"<|eos|>"`` after each one.
The v3-nano tokenizer maps that string to the special token id 1 (``eos_token_id``), so
``tokenizer.encode(split_text)`` yields exactly the training stream. Files that contain either
special-token string, or are not valid UTF-8, are excluded (listed under ``excluded``).

Invariants: the three splits are disjoint by file; outputs are byte-identical on every run;
``edgekit/nano/corpus_manifest.json`` pins the Python version, every relative path, its sha256
and its split. When the manifest exists the build verifies every file against it and never
rewrites it (``--rewrite-manifest`` to re-pin deliberately).

Failure modes: ``CorpusError`` with one line naming the fix, e.g. a different Python version
(different stdlib bytes), a missing or modified file, or a missing stdlib directory.

Run: ``python -m edgekit.nano.corpus``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..data import SEPARATOR, load_text, shipped_file

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>")
SPLITS = ("eval", "calib", "train")
EVAL_TARGET_BYTES = 560_000
CALIB_TARGET_BYTES = 115_000
RECOVER_TARGET_BYTES = 2_500_000  # shipped sample of train text for pruning recovery (distillation)
RECOVER_EVERY = 6                 # every 6th train document in path order, so it spans the library
HELDOUT_MAX_FILE_BYTES = 40_000

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
MANIFEST_PATH = PACKAGE_DIR / "corpus_manifest.json"
SPLITS_DIR = PACKAGE_DIR.parent / "data" / "splits"
TRAIN_PATH = REPO_ROOT / ".corpus" / "train.txt"


class CorpusError(RuntimeError):
    """The corpus cannot be (re)built reproducibly; the message says how to fix it."""


@dataclass(frozen=True)
class Document:
    path: str      # relative to the stdlib root, POSIX separators
    sha256: str    # of the file's bytes
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan(root: Path) -> tuple[list[Document], dict[str, str]]:
    """All usable stdlib sources under ``root`` (sorted by path) and the excluded ones with why."""
    if not root.is_dir():
        raise CorpusError(f"stdlib directory {root} not found; pass --stdlib-root")
    docs, excluded = [], {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel or not f.is_file():
            continue
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            excluded[rel] = "not utf-8"
            continue
        if any(s in text for s in SPECIAL_TOKENS):
            excluded[rel] = "contains a special-token string"
            continue
        if not text.strip():
            excluded[rel] = "empty"
            continue
        docs.append(Document(rel, sha256_hex(data), text))
    return docs, excluded


def assign_splits(docs: list[Document]) -> dict[str, str]:
    """path -> split, by the sha256-of-path ranking described in the module docstring."""
    ranked = sorted(docs, key=lambda d: sha256_hex(d.path.encode()))
    split_of, filled = {}, {"eval": 0, "calib": 0}
    targets = {"eval": EVAL_TARGET_BYTES, "calib": CALIB_TARGET_BYTES}
    for d in ranked:
        size = len(d.text.encode())
        split = "train"
        if size <= HELDOUT_MAX_FILE_BYTES:
            for name in ("eval", "calib"):
                if filled[name] < targets[name]:
                    split = name
                    filled[name] += size
                    break
        split_of[d.path] = split
    return split_of


def build_manifest(docs: list[Document], split_of: dict[str, str], excluded: dict[str, str]) -> dict:
    return {
        "python_version": platform.python_version(),
        "source": "Python standard library *.py (site-packages excluded)",
        "separator": SEPARATOR,
        "split_rule": "rank by sha256(relative path); files <= %d bytes fill eval to %d bytes, then "  # noqa: UP031
                      "calib to %d bytes; rest train" % (HELDOUT_MAX_FILE_BYTES, EVAL_TARGET_BYTES,
                                                           CALIB_TARGET_BYTES),
        "files": [{"path": d.path, "sha256": d.sha256, "split": split_of[d.path]} for d in docs],
        "excluded": excluded,
    }


def verify(manifest: dict, docs: list[Document]) -> dict[str, str]:
    """Check ``docs`` against a pinned manifest; return its path -> split map."""
    pinned = {f["path"]: f for f in manifest["files"]}
    have = {d.path: d for d in docs}
    if manifest["python_version"] != platform.python_version():
        hint = (f"the manifest pins Python {manifest['python_version']} and this is "
                f"{platform.python_version()}; run with that interpreter (or --stdlib-root)")
    else:
        hint = ("this Python's standard library was modified; reinstall it, or re-pin deliberately "
                "with --rewrite-manifest (changes the splits and invalidates v3-nano)")
    missing = sorted(set(pinned) - set(have))
    if missing:
        raise CorpusError(f"{len(missing)} pinned corpus files are missing (first: {missing[0]}); {hint}")
    changed = sorted(p for p, f in pinned.items() if have[p].sha256 != f["sha256"])
    if changed:
        raise CorpusError(f"{len(changed)} corpus files differ from the manifest's sha256 "
                          f"(first: {changed[0]}); {hint}")
    return {p: f["split"] for p, f in pinned.items()}


def split_texts(docs: list[Document], split_of: dict[str, str]) -> dict[str, str]:
    """split -> the concatenated text, documents in path order, each followed by SEPARATOR."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for d in docs:
        if d.path in split_of:
            parts[split_of[d.path]].append(d.text + SEPARATOR)
    return {s: "".join(p) for s, p in parts.items()}


def recover_sample(docs: list[Document], split_of: dict[str, str]) -> str:
    """A shipped sample of the TRAIN split (never eval/calib) for distillation after pruning: every
    RECOVER_EVERY-th train document in path order, up to RECOVER_TARGET_BYTES."""
    out, size = [], 0
    train = [d for d in docs if split_of.get(d.path) == "train"]
    for d in train[::RECOVER_EVERY]:
        piece = d.text + SEPARATOR
        n = len(piece.encode("utf-8"))
        if size + n > RECOVER_TARGET_BYTES:
            continue
        out.append(piece)
        size += n
    return "".join(out)


def write_text(path: Path, text: str) -> None:
    """UTF-8 text; a ``.gz`` path is gzipped reproducibly (no name or time in the header), a ``.xz``
    path xz-compressed (preset 9e; the format records no name or time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    if path.suffix == ".xz":
        data = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0) if path.suffix == ".gz" else data)


def manifest_sha256(path: Path = MANIFEST_PATH) -> str:
    return sha256_hex(path.read_bytes())


def build(root: Path, rewrite_manifest: bool = False) -> dict[str, Path]:
    """Scan, split (or verify against the pinned manifest), write the three split files."""
    docs, excluded = scan(root)
    if MANIFEST_PATH.exists() and not rewrite_manifest:
        split_of = verify(json.loads(MANIFEST_PATH.read_text()), docs)
    else:
        split_of = assign_splits(docs)
        MANIFEST_PATH.write_text(json.dumps(build_manifest(docs, split_of, excluded), indent=1) + "\n")
    texts = split_texts(docs, split_of)
    texts["recover"] = recover_sample(docs, split_of)
    paths = {"eval": shipped_file(SPLITS_DIR, "eval"), "calib": shipped_file(SPLITS_DIR, "calib"), "train": TRAIN_PATH,
             "recover": shipped_file(SPLITS_DIR, "recover")}
    for split, path in paths.items():
        write_text(path, texts[split])
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdlib-root", type=Path, default=None, help="default: this interpreter's stdlib")
    ap.add_argument("--rewrite-manifest", action="store_true", help="re-pin the manifest (changes the splits)")
    a = ap.parse_args(argv)
    try:
        paths = build(a.stdlib_root or stdlib_root(), a.rewrite_manifest)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, path in paths.items():
        n_docs = load_text(str(path)).count(SEPARATOR)
        print(f"{split:5s} {n_docs:5d} docs {path.stat().st_size / 1e3:9.1f} KB  {path}")
    print(f"manifest {MANIFEST_PATH} sha256 {manifest_sha256()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
