"""Train a reference model's byte-level BPE tokenizer on its corpus's train split.

What: a ``tokenizers`` BPE with GPT-2-style byte-level pre-tokenization and decoding, vocab
``VOCAB_SIZE`` = 4096 for v3-nano (``--model v3-nano``, the stdlib corpus) and for v3-mini
(``--model v3-mini``, the Python + C + prose corpus of ``mixed.py``; why not 8192 is in
``edgekit/nano/specs.py``), special tokens ``<|bos|>`` = 0 and ``<|eos|>`` = 1 (ModelArgs'
``bos_token_id`` / ``eos_token_id``). No normalizer and no post-processor: ``encode`` adds nothing,
so ``encode(split_text)`` is exactly the training stream (the corpus's ``<|eos|>`` separators become
id 1).

Why byte-level: every byte sequence is representable, so source code (indentation, tabs, ``\\r``,
non-ASCII identifiers) round-trips exactly: ``decode(encode(t), skip_special_tokens=False) == t``.

Invariants: trained on train-split documents only (eval/calib never seen); ``check_roundtrip``
verifies the round trip and the special ids; training on the same corpus gives the same file.

Failure modes: ``RuntimeError`` if the train split is missing (run ``python -m edgekit.nano.corpus``)
or the round trip / special ids check fails.

Run: ``python -m edgekit.nano.tokenizer --out DIR [--model v3-mini]`` (writes ``DIR/tokenizer.json``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import SEPARATOR, SPECIAL_TOKENS, TRAIN_PATH
from .specs import SPECS

VOCAB_SIZE = 4096


def documents(paths: Path | list[Path]) -> Iterator[str]:
    for path in [paths] if isinstance(paths, Path) else paths:
        if not path.exists():
            raise RuntimeError(f"{path} not found; run `python -m edgekit.nano.corpus` (v3-nano) or "
                               "`python -m edgekit.nano.mixed` (v3-mini) first")
        for doc in path.read_text(encoding="utf-8").split(SEPARATOR):
            if doc:
                yield doc


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train(train_path: Path | list[Path] = TRAIN_PATH, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(documents(train_path), trainer=trainer)
    return tok


def check_roundtrip(tok: Tokenizer, texts: list[str]) -> None:
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} has id {tok.token_to_id(name)}, expected {i}")
    probes = ["def f(x):\n\tif x:\n        return  x  \r\n\n\n", "  \n \t \u00e9\u4e2d\U0001F600\x00", ""]
    for t in probes + texts:
        back = tok.decode(tok.encode(t).ids, skip_special_tokens=False)
        if back != t:
            at = next((i for i, (a, b) in enumerate(zip(t, back)) if a != b), min(len(t), len(back)))
            raise RuntimeError(f"tokenizer round trip differs at char {at}: {t[at:at + 20]!r} -> {back[at:at + 20]!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for tokenizer.json")
    ap.add_argument("--model", default="v3-nano", choices=sorted(SPECS), help="whose corpus to train on")
    ap.add_argument("--vocab", type=int, default=0, help="0: the model's vocab_size")
    a = ap.parse_args(argv)
    spec = SPECS[a.model]
    tok = train(spec.train_texts(), a.vocab or spec.config["vocab_size"])
    held = {name: path.read_text(encoding="utf-8") for name, path in spec.heldout_paths().items()}
    check_roundtrip(tok, list(held.values()))
    a.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(a.out / "tokenizer.json"))
    for name, text in held.items():
        n = len(tok.encode(text).ids)
        print(f"{name}: {n} tokens, {len(text.encode()) / n:.2f} bytes/token")
    print(f"wrote {a.out / 'tokenizer.json'} (vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
