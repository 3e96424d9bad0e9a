"""Text data for evaluation, calibration and recovery: the shipped splits or any user text file.

What: ``load_tokens(source, tokenizer)`` returns a 1-D int64 array of token ids for a named split
(``"eval"``, ``"calib"``, ``"recover"``: a sample of v3-nano's training text for distillation)
shipped in ``edgekit/data/splits``, a domain split ``"<domain>/<split>"`` shipped in
``edgekit/data/domains`` (domains ``python``, ``c``, ``prose``; splits ``eval``, ``calib``, ``dev``,
``recover``, shipped gzipped, ``{split}.txt.gz``; and ``train``, v3-mini's whole training text of
the domain, where the domain ships it (python), ``train.txt.xz``, for long GPU distillation; see
``edgekit/nano/mixed.py``), or a path to a UTF-8 text file (``.gz``: gzipped, ``.xz``: xz);
``windows(tokens, seq_len)`` cuts it into non-overlapping ``[N, seq_len + 1]`` rows (inputs plus
the next-token target). ``DomainData.of(domain)`` names the four splits of one domain for
domain-targeted compression (calibration, distillation, candidate selection on ``dev``, the gate on
``eval``).

Device side: numpy and tokenizers only (``edgekit validate`` reads its eval text through here).

Invariants: the eval, calibration and dev splits are disjoint from each other and from the text
the reference models were trained on (by file; see ``edgekit/nano/corpus_manifest.json`` and
``mixed_manifest.json``); the ``python`` domain's eval/calib/recover equal ``splits/``.

Large texts are tokenized document by document (split after each ``<|eos|>``, where the tokenizer
splits anyway): the same ids as one call, in a fraction of the memory (v3-mini's python train text,
30.6 MB: one call held ~5 GB).

Failure modes: a missing file, a non-UTF-8 file, text too short for one window (``windows``) or
for one full calibration window (``require_tokens``) raise ``EdgekitError`` naming the fix.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgekitError

SPLITS = ("eval", "calib", "recover")
DOMAIN_SPLITS = ("eval", "calib", "dev", "recover", "train")
DOMAINS_DIR = Path(__file__).parent / "data" / "domains"
GZIPPED = ("eval", "calib", "dev", "recover")   # shipped gzipped; read transparently
XZ = ("train",)                                 # shipped xz (python/train: 4.45 MB, gzip -9 6.11 MB)
SEPARATOR = "<|eos|>"                           # the corpora's document separator (a special token;
                                                # edgekit/nano builds the corpora with it)
RECOVERY_SPLITS = ("recover", "train")          # what distillation can read of a domain
CHUNK_CHARS = 1 << 20                           # texts longer than this are tokenized per document


def shipped_file(folder: Path, split: str) -> Path:
    """The file of a shipped split in ``folder``: ``{split}.txt.gz`` (``.txt.xz`` for ``XZ``,
    ``{split}.txt`` for any other name)."""
    return folder / (f"{split}.txt.gz" if split in GZIPPED else f"{split}.txt.xz" if split in XZ else f"{split}.txt")


def split_path(name: str) -> Path:
    return shipped_file(Path(__file__).parent / "data" / "splits", name)


def domain_names() -> list[str]:
    if not DOMAINS_DIR.is_dir():
        return []
    return sorted(p.name for p in DOMAINS_DIR.iterdir() if shipped_file(p, "eval").is_file())


def is_domain(name) -> bool:
    return isinstance(name, str) and name in domain_names()


def _named_path(source) -> Path | None:
    """The shipped file a split or ``domain/split`` name denotes, else None (a user path)."""
    if source in SPLITS:
        return split_path(source)
    if isinstance(source, str) and source.count("/") == 1:
        d, s = source.split("/")
        if is_domain(d) and s in DOMAIN_SPLITS:
            return shipped_file(DOMAINS_DIR / d, s)
    return None


@dataclass(frozen=True)
class DomainData:
    """The shipped splits of one domain, as ``load_tokens`` sources."""
    domain: str
    calib: str
    recover: str
    dev: str
    eval: str

    @classmethod
    def of(cls, domain: str, recover: str = "recover") -> DomainData:
        """``recover``: the split distillation reads (``recover``, the shipped sample, or ``train``)."""
        if not is_domain(domain):
            raise EdgekitError(f"unknown domain {domain!r}; choose one of {', '.join(domain_names())} "
                               "or pass a text file")
        if not shipped_file(DOMAINS_DIR / domain, recover).is_file():
            raise EdgekitError(f"domain {domain!r} ships no {recover!r} split; use one of "
                               f"{', '.join(recovery_splits(domain))} or pass --recover FILE")
        return cls(domain, *(f"{domain}/{s}" for s in ("calib", recover, "dev", "eval")))


def recovery_splits(domain: str) -> list[str]:
    """The splits of a shipped domain that distillation can read (``recover``; ``train`` where shipped)."""
    return [s for s in RECOVERY_SPLITS if shipped_file(DOMAINS_DIR / domain, s).is_file()]


def model_domains(model_dir: str | os.PathLike) -> list[str]:
    """The shipped domains a model was trained on (``training.json`` "domains"; [] when unknown)."""
    f = Path(model_dir) / "training.json"
    try:
        listed = json.loads(f.read_text()).get("domains", []) if f.is_file() else []
    except ValueError:
        return []
    return [d for d in listed if is_domain(d)]


def load_text(source: str | os.PathLike | None = "eval") -> str:
    p = _named_path(source) or Path(source)
    if not p.is_file():
        raise EdgekitError(f"data file {p} not found; pass a UTF-8 text file, one of {SPLITS} or DOMAIN/SPLIT "
                           f"(domains {', '.join(domain_names())}; splits {', '.join(DOMAIN_SPLITS)})")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else \
            lzma.decompress(p.read_bytes()) if p.suffix == ".xz" else p.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError):
        kind = "gzip" if p.suffix == ".gz" else "xz"
        raise EdgekitError(f"{p} is not a complete {kind} file; pass it uncompressed or re-compress it") from None
    try:
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")   # as text mode reads it
    except UnicodeDecodeError:
        raise EdgekitError(f"{p} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    if not text.strip():
        raise EdgekitError(f"{p} is empty; pass a text file with at least a few hundred tokens")
    return text


def load_tokens(source: str | os.PathLike | None, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of a split or text file, optionally truncated to ``max_tokens``."""
    if max_tokens is not None and max_tokens < 0:
        raise EdgekitError(f"max_tokens={max_tokens}: pass a positive number of tokens")
    text = load_text(source or "eval")
    if len(text) <= CHUNK_CHARS or SEPARATOR not in text:
        ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
        return ids[:max_tokens] if max_tokens else ids
    docs, parts, n = text.split(SEPARATOR), [], 0
    docs = [d + SEPARATOR for d in docs[:-1]] + ([docs[-1]] if docs[-1] else [])
    for i in range(0, len(docs), 256):
        for enc in tokenizer.encode_batch(docs[i:i + 256]):
            parts.append(np.asarray(enc.ids, dtype=np.int64))
            n += len(parts[-1])
        if max_tokens and n >= max_tokens:
            break
    ids = np.concatenate(parts)
    return ids[:max_tokens] if max_tokens else ids


def require_tokens(tokens: np.ndarray, n: int, what: str) -> np.ndarray:
    """At least ``n`` tokens (e.g. one full calibration window), or a one-line error naming the fix."""
    if len(tokens) < n:
        raise EdgekitError(f"the {what} has {len(tokens)} tokens; it needs at least {n} (one full window): "
                           "pass a longer text file")
    return tokens


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, seq_len + 1] non-overlapping rows; the tail shorter than a window is kept as one shorter
    row only when no full window exists (so tiny user files still score)."""
    if len(tokens) < 2:
        raise EdgekitError(f"only {len(tokens)} tokens of data; pass more text (at least 2 tokens)")
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        return tokens[None, :]
    return np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
