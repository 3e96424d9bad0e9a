"""Text data for evaluation, calibration and recovery: the shipped splits or any user text file.

What: ``load_tokens(source, tokenizer)`` returns a 1-D int64 array of token ids for a named split
(``"eval"``, ``"calib"``, ``"recover"``: a sample of v3-nano's training text for distillation)
shipped in ``edgekit/data/splits``, or a path to a UTF-8 text file;
``windows(tokens, seq_len)`` cuts it into non-overlapping ``[N, seq_len + 1]`` rows (inputs plus
the next-token target).

Invariants: the eval and calibration splits are disjoint from each other and from the text
v3-nano was trained on (by file; see ``edgekit/nano/corpus_manifest.json``).

Failure modes: a missing file, a non-UTF-8 file or text too short for one window raise
``EdgekitError`` naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import EdgekitError

SPLITS = ("eval", "calib", "recover")


def split_path(name: str) -> Path:
    return Path(__file__).parent / "data" / "splits" / f"{name}.txt"


def load_text(source: str | os.PathLike | None = "eval") -> str:
    p = split_path(source) if source in SPLITS else Path(source)
    if not p.is_file():
        raise EdgekitError(f"data file {p} not found; pass a UTF-8 text file or one of {SPLITS}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgekitError(f"{p} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    if not text.strip():
        raise EdgekitError(f"{p} is empty; pass a text file with at least a few hundred tokens")
    return text


def load_tokens(source: str | os.PathLike | None, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of a split or text file, optionally truncated to ``max_tokens``."""
    ids = np.asarray(tokenizer.encode(load_text(source or "eval")).ids, dtype=np.int64)
    return ids[:max_tokens] if max_tokens else ids


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, seq_len + 1] non-overlapping rows; the tail shorter than a window is kept as one shorter
    row only when no full window exists (so tiny user files still score)."""
    if len(tokens) < 2:
        raise EdgekitError(f"only {len(tokens)} tokens of data; pass more text (at least 2 tokens)")
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        return tokens[None, :]
    return np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
