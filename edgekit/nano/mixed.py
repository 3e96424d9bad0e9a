"""Build v3-mini's multi-domain corpus (Python, C, English technical prose), pinned file by file.

What: three domains, each split BY FILE into ``eval`` (held out; the accuracy gate's text), ``calib``
(importance / quantization calibration and training-time model selection), ``dev`` (held out; for
choosing among compression candidates, never the eval split), ``train`` and ``recover`` (a sample
of ``train`` for distillation after pruning). ``eval``/``calib``/``dev``/``recover`` ship in
``edgekit/data/domains/<domain>/``; ``train`` goes to ``.corpus/v3-mini/train/<domain>.txt``
(git-ignored, never committed).

- ``python``: the Python 3.11.7 standard library exactly as v3-nano's corpus (``corpus.py``):
  same eval/calib/recover files (so both models are scored on the same text), plus a ``dev`` split
  taken from v3-nano's train files (excluded from v3-mini's training).
- ``c``: C sources (``*.c``/``*.h`` of at most ``max_file_bytes``, test suites excluded) of GNU
  binutils 2.40 from Debian's ``binutils-source`` package (it ships the upstream tarball).
- ``prose``: the reStructuredText sources of Sphinx-built manuals in Debian documentation packages
  (LLVM, Clang, CMake, Sphinx, rsyslog, Debian Policy, Debian Developer's Reference), English
  technical prose with some inline examples.

Packages come from ``apt-get download PACKAGE=VERSION`` and ``dpkg -x`` (``debian.py``), cached in
``--deb-cache`` (default ``.corpus/debs``); no network but the Debian registry.

Split rule for ``c``/``prose`` (deterministic, independent of order on disk): candidate files are
ranked by ``sha256("<domain>:<package>/<path>")``; walking that ranking, files of at most
``heldout_max_file_bytes`` fill eval, then calib, then dev to their byte targets; every other file
goes to train until the domain's ``train_bytes`` budget is reached; the rest is unused (not listed).
``recover`` is every ``RECOVER_EVERY``-th train document in path order up to ``recover_bytes``.
A domain with ``ship_train`` (python) also ships its whole ``train`` text (``train.txt.xz``, 4.5 MB):
v3-mini's own training text of the domain, the recovery text of long GPU distillation
(``[data] recover = "train"``, recipe ``cpu4-moe``), where the 2.5 MB sample is passed over too often.

Pinning: ``edgekit/nano/mixed_manifest.json`` records, per domain, the packages (name, version and
the .deb's sha256 as downloaded), and every used file with its sha256 and split. Once it exists the
build reads files by the manifest (never re-ranks) and verifies every sha256; ``--rewrite-manifest``
re-pins deliberately. Documents are joined with ``<|eos|>`` after each one, as in ``corpus.py``.

Invariants: splits are disjoint by file within a domain; outputs are byte-identical on every run;
files that are not UTF-8 or contain a special-token string are excluded (listed with the reason).

Failure modes: ``CorpusError`` (a file missing or changed, another Python version) or
``DebianError`` (apt-get/dpkg missing, package unavailable), each one line naming the fix.

Run: ``python -m edgekit.nano.mixed [--deb-cache DIR]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import sha256 as sha256_file
from ..data import shipped_file
from . import corpus
from .corpus import SEPARATOR, SPECIAL_TOKENS, CorpusError, Document, sha256_hex
from .debian import DebianError, extract, fetch, read_files

MANIFEST_PATH = corpus.PACKAGE_DIR / "mixed_manifest.json"
DOMAINS_DIR = corpus.PACKAGE_DIR.parent / "data" / "domains"
TRAIN_DIR = corpus.REPO_ROOT / ".corpus" / "v3-mini" / "train"
DEB_CACHE = corpus.REPO_ROOT / ".corpus" / "debs"
SHIPPED = ("eval", "calib", "dev", "recover")
RECOVER_EVERY = 6


@dataclass(frozen=True)
class Source:
    """Files of one Debian package: under ``root`` (a directory of the package, or of ``tarball``,
    a tarball inside the package), matching ``include`` and none of ``exclude`` (fnmatch)."""
    package: str
    version: str
    root: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    tarball: str = ""


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    sources: tuple[Source, ...] = ()   # empty: the running interpreter's standard library (python)
    eval_bytes: int = 300_000
    calib_bytes: int = 120_000
    dev_bytes: int = 200_000
    recover_bytes: int = 2_000_000
    train_bytes: int = 16_000_000
    heldout_max_file_bytes: int = 40_000
    max_file_bytes: int = 64_000
    ship_train: bool = False           # the whole train text ships too (train.txt.xz)
    notes: list = field(default_factory=list, compare=False)


_SPHINX = ("*.rst.txt", "*.txt")
DOMAINS = {
    "python": Domain("python", "Python 3.11.7 standard library *.py (v3-nano's corpus, corpus.py)",
                     dev_bytes=200_000, recover_bytes=corpus.RECOVER_TARGET_BYTES, ship_train=True),
    "c": Domain("c", "C sources (*.c, *.h; test suites excluded) of GNU binutils 2.40",
                (Source("binutils-source", "2.40-2", "binutils-2.40", ("*.c", "*.h"), ("*/testsuite/*",),
                        tarball="usr/src/binutils/binutils-2.40.tar.xz"),),
                train_bytes=16_000_000, max_file_bytes=64_000),
    "prose": Domain("prose", "reStructuredText sources of Sphinx-built manuals (English technical prose)",
                    (Source("llvm-15-doc", "1:15.0.6-4", "usr/share/doc/llvm-15-doc/html/_sources", _SPHINX,
                            ("AMDGPU/*",)),
                     Source("clang-15-doc", "1:15.0.6-4", "usr/share/doc/clang-15/html/_sources", _SPHINX),
                     Source("cmake-doc", "3.25.1-1", "usr/share/doc/cmake-data/html/_sources", _SPHINX),
                     Source("sphinx-doc", "5.3.0-4", "usr/share/doc/sphinx-doc/html/_sources", _SPHINX),
                     Source("rsyslog-doc", "8.2302.0+dfsg-1", "usr/share/doc/rsyslog-doc/html/_sources", _SPHINX),
                     Source("debian-policy", "4.6.2.0", "usr/share/doc/debian-policy/policy.html/_sources",
                            _SPHINX),
                     Source("developers-reference", "12.18", "usr/share/developers-reference/_sources", _SPHINX)),
                    train_bytes=16_000_000, max_file_bytes=1_000_000),
}


# ---------------------------------------------------------------------------------------------
# reading documents
# ---------------------------------------------------------------------------------------------
def decode(path: str, data: bytes, excluded: dict[str, str]) -> Document | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        excluded[path] = "not utf-8"
        return None
    if any(s in text for s in SPECIAL_TOKENS):
        excluded[path] = "contains a special-token string"
        return None
    if not text.strip():
        excluded[path] = "empty"
        return None
    return Document(path, sha256_hex(data), text)


def package_documents(domain: Domain, cache: Path) -> tuple[list[Document], dict[str, str], list[dict]]:
    """All candidate documents of a Debian-sourced domain (path ``<package>/<relative path>``)."""
    docs, excluded, packages = [], {}, []
    for s in domain.sources:
        deb = fetch(s.package, s.version, cache)
        unpacked = extract(deb, cache / "x" / s.package)
        packages.append({"package": s.package, "version": s.version, "deb": deb.name, "deb_sha256": sha256_file(deb),
                         "root": s.root, "tarball": s.tarball, "include": list(s.include), "exclude": list(s.exclude)})
        for rel, data in read_files(unpacked, s.root, s.include, s.exclude, s.tarball, domain.max_file_bytes):
            d = decode(f"{s.package}/{rel}", data, excluded)
            if d:
                docs.append(d)
    return sorted(docs, key=lambda d: d.path), excluded, packages


# ---------------------------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------------------------
def assign_package_splits(domain: Domain, docs: list[Document]) -> tuple[dict[str, str], set[str]]:
    """path -> split for a Debian-sourced domain (rule in the module docstring; unused files absent),
    and the recover sample."""
    ranked = sorted(docs, key=lambda d: sha256_hex(f"{domain.name}:{d.path}".encode()))
    targets = {"eval": domain.eval_bytes, "calib": domain.calib_bytes, "dev": domain.dev_bytes}
    filled = dict.fromkeys(targets, 0)
    split_of, train = {}, 0
    for d in ranked:
        size = len(d.text.encode())
        held = next((s for s in targets if filled[s] < targets[s]), None)
        if held and size <= domain.heldout_max_file_bytes:
            split_of[d.path] = held
            filled[held] += size
        elif train < domain.train_bytes:
            split_of[d.path] = "train"
            train += size
    return split_of, set(recover_paths(sorted(docs, key=lambda d: d.path), split_of, domain.recover_bytes))


def assign_python_splits(domain: Domain, docs: list[Document]) -> tuple[dict[str, str], set[str]]:
    """v3-nano's pinned eval/calib/train assignment and recover sample, with ``dev`` carved out of its
    train files: continuing v3-nano's sha256-of-path ranking, small train files not in the sample."""
    split_of = corpus.verify(json.loads(corpus.MANIFEST_PATH.read_text()), docs)
    recover = set(recover_paths(docs, split_of, domain.recover_bytes))
    filled = 0
    for d in sorted(docs, key=lambda d: sha256_hex(d.path.encode())):
        size = len(d.text.encode())
        if filled >= domain.dev_bytes:
            break
        if split_of.get(d.path) == "train" and d.path not in recover and size <= domain.heldout_max_file_bytes:
            split_of[d.path] = "dev"
            filled += size
    return split_of, recover


def recover_paths(docs: list[Document], split_of: dict[str, str], limit: int) -> list[str]:
    """Every RECOVER_EVERY-th train document in ``docs`` order (path order), up to ``limit`` bytes
    (corpus.py's rule for v3-nano's recover.txt)."""
    out, size = [], 0
    train = [d for d in docs if split_of.get(d.path) == "train"]
    for d in train[::RECOVER_EVERY]:
        n = len((d.text + SEPARATOR).encode())
        if size + n <= limit:
            out.append(d.path)
            size += n
    return out


def join(docs: list[Document]) -> str:
    return "".join(d.text + SEPARATOR for d in docs)


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------
def verify_domain(name: str, pinned: dict, docs: list[Document], python: bool) -> tuple[dict[str, str], set[str]]:
    have = {d.path: d for d in docs}
    if python:
        hint = f"run with Python {pinned.get('python_version')} (this interpreter's stdlib is read)"
    else:
        hint = ("a package's files changed (see the notes above for versions no longer in the archive); "
                "re-pin deliberately with --rewrite-manifest (changes the corpus and invalidates v3-mini)")
    missing = sorted(f["path"] for f in pinned["files"] if f["path"] not in have)
    if missing:
        raise CorpusError(f"domain {name}: {len(missing)} pinned files are missing (first: {missing[0]}); {hint}")
    changed = sorted(f["path"] for f in pinned["files"] if have[f["path"]].sha256 != f["sha256"])
    if changed:
        raise CorpusError(f"domain {name}: {len(changed)} files differ from the manifest's sha256 "
                          f"(first: {changed[0]}); {hint}")
    return {f["path"]: f["split"] for f in pinned["files"]}, {f["path"] for f in pinned["files"] if f.get("recover")}


def manifest_sha256(path: Path = MANIFEST_PATH) -> str:
    return sha256_hex(path.read_bytes())


def build(cache: Path = DEB_CACHE, rewrite_manifest: bool = False, domains: dict[str, Domain] = DOMAINS,
          manifest_path: Path = MANIFEST_PATH, out_dir: Path = DOMAINS_DIR, train_dir: Path = TRAIN_DIR) -> dict:
    """Read, split (or verify against the pinned manifest) and write every domain; returns a summary."""
    pinned = json.loads(manifest_path.read_text()) if manifest_path.exists() and not rewrite_manifest else None
    manifest = {"separator": SEPARATOR, "split_rule": "see edgekit/nano/mixed.py", "domains": {}}
    texts: dict[str, dict[str, str]] = {}
    for name, dom in domains.items():
        python = not dom.sources
        if python:
            docs, excluded = corpus.scan(corpus.stdlib_root())
            packages = []
        else:
            docs, excluded, packages = package_documents(dom, cache)
        if pinned is not None:
            if name not in pinned["domains"]:
                raise CorpusError(f"domain {name} is not in {manifest_path.name}; re-pin with --rewrite-manifest")
            split_of, rec = verify_domain(name, pinned["domains"][name], docs, python)
        else:
            split_of, rec = assign_python_splits(dom, docs) if python else assign_package_splits(dom, docs)
        used = [d for d in docs if d.path in split_of]
        by_split = {s: [d for d in used if split_of[d.path] == s] for s in ("eval", "calib", "dev", "train")}
        by_split["recover"] = [d for d in by_split["train"] if d.path in rec]
        texts[name] = {s: join(v) for s, v in by_split.items()}
        manifest["domains"][name] = {
            "description": dom.description,
            **({"python_version": platform.python_version()} if python else {"packages": packages}),
            "rule": {k: getattr(dom, k) for k in ("eval_bytes", "calib_bytes", "dev_bytes", "recover_bytes",
                                                  "train_bytes", "heldout_max_file_bytes", "max_file_bytes")},
            "files": [{"path": d.path, "sha256": d.sha256, "split": split_of[d.path],
                       **({"recover": True} if d.path in rec else {})} for d in used],
            "excluded": dict(sorted(excluded.items())),
        }
    for name, t in texts.items():
        for s in SHIPPED + (("train",) if domains[name].ship_train else ()):
            corpus.write_text(shipped_file(out_dir / name, s), t[s])
        corpus.write_text(train_dir / f"{name}.txt", t["train"])
    if pinned is None:
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return {name: {s: (t[s].count(SEPARATOR), len(t[s].encode())) for s in (*SHIPPED, "train")}
            for name, t in texts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deb-cache", type=Path, default=DEB_CACHE, help="where .deb files are downloaded/unpacked")
    ap.add_argument("--rewrite-manifest", action="store_true", help="re-pin the manifest (changes the corpus)")
    a = ap.parse_args(argv)
    try:
        summary = build(a.deb_cache, a.rewrite_manifest)
    except (CorpusError, DebianError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, splits in summary.items():
        print(f"{name:6s} " + "  ".join(f"{s} {n} docs {b / 1e6:.2f} MB" for s, (n, b) in splits.items()))
    print(f"shipped splits in {DOMAINS_DIR}; train text in {TRAIN_DIR}; "
          f"manifest {MANIFEST_PATH.name} sha256 {manifest_sha256()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
