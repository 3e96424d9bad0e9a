"""Score a shipped reference model on its held-out eval split(s) against a unigram baseline.

What: loads ``edgekit/data/v3-nano`` with ``edgekit.checkpoint.load`` (fp32, CPU, stock sparse
``MoE.forward``), scores ``edgekit/data/splits/eval.txt`` with ``edgekit.evaluate.evaluate``
(non-overlapping windows of ``SEQ_LEN`` tokens, top-1 accuracy and perplexity), and computes two
baselines from train-split token counts on the same target tokens: the accuracy of always
predicting the most frequent train token, and the perplexity of the add-one-smoothed unigram
distribution. Results are written into the model's ``training.json`` under ``"cpu_eval"`` and
``"baselines"``.

Why: a reference model is only useful if it is clearly better than trivial; these numbers are the
yardstick compression stages are compared to.

Invariants: the targets scored by model and baselines are identical (windows of ``SEQ_LEN`` + 1,
target = tokens 1..SEQ_LEN of each); the baseline never sees eval counts.

Failure modes: a missing ``.corpus/train.txt`` raises ``SystemExit`` naming
``python -m edgekit.nano.corpus``; loader errors are ``EdgekitError``.

v3-mini (a checkpoint whose ``training.json`` names ``"model": "v3-mini"``) is scored on each
domain's eval split (``cpu_eval_by_domain``, ``baselines_by_domain``); its unigram counts come from
the prepared train tokens (``python -m edgekit.nano.train --model v3-mini --prepare-only``).

Run: ``python -m edgekit.nano.report [--model DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from ..checkpoint import load, load_tokenizer, resolve
from ..data import load_tokens, windows
from ..evaluate import evaluate
from .corpus import TRAIN_PATH
from .specs import SPECS
from .train import encode_split, load_train_tokens

SEQ_LEN = 512


def unigram_baselines(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> dict:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64)
    top = int(counts.argmax())
    probs = (counts + 1) / (counts.sum() + vocab)
    return {
        "unigram_top1_token": top,
        "unigram_top1_accuracy": round(float((targets == top).mean()), 5),
        "unigram_perplexity": round(float(math.exp(-np.log(probs[targets]).mean())), 3),
        "unigram_smoothing": "add-one over the vocab, counts from the train split",
        "tokens": int(targets.size),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the shipped v3-nano")
    ap.add_argument("--no-write", action="store_true", help="print only; leave training.json as is")
    a = ap.parse_args(argv)
    f = resolve(a.model) / "training.json"
    if f.exists() and SPECS.get(json.loads(f.read_text()).get("model"), SPECS["v3-nano"]).domains:
        return report_domains(a, f)
    if not TRAIN_PATH.exists():
        raise SystemExit(f"error: {TRAIN_PATH} not found; run `python -m edgekit.nano.corpus`")
    model, tok = load(a.model), load_tokenizer(a.model)
    tokens = load_tokens("eval", tok)
    res = evaluate(model, tokens, seq_len=SEQ_LEN, batch_size=8, progress=False)
    targets = windows(tokens, SEQ_LEN)[:, 1:].reshape(-1)
    train_ids = encode_split(tok, TRAIN_PATH.read_text(encoding="utf-8")).numpy()
    base = unigram_baselines(train_ids, targets, model.args.vocab_size)
    cpu_eval = {**res.to_dict(), "seq_len": SEQ_LEN, "dtype": "fp32 (weights stored fp16)", "split": "eval"}
    print(json.dumps({"cpu_eval": cpu_eval, "baselines": base}, indent=1))
    if not a.no_write:
        f = resolve(a.model) / "training.json"
        rec = json.loads(f.read_text())
        rec["cpu_eval"], rec["baselines"] = cpu_eval, base
        f.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


def report_domains(a: argparse.Namespace, f) -> int:
    """Per-domain scores of a multi-domain reference model (v3-mini) and per-domain unigram baselines."""
    rec = json.loads(f.read_text())
    spec = SPECS[rec["model"]]
    model, tok = load(a.model), load_tokenizer(a.model)
    train_ids, _ = load_train_tokens(spec, resolve(a.model) / "tokenizer.json")
    out, base = {}, {}
    for d in spec.domains:
        tokens = load_tokens(f"{d}/eval", tok)
        res = evaluate(model, tokens, seq_len=SEQ_LEN, batch_size=8, progress=False)
        out[d] = {**res.to_dict(), "seq_len": SEQ_LEN, "dtype": f"fp32 (weights stored {spec.storage_dtype})",
                  "split": f"{d}/eval"}
        base[d] = unigram_baselines(train_ids.numpy(), windows(tokens, SEQ_LEN)[:, 1:].reshape(-1),
                                    model.args.vocab_size)
        base[d]["unigram_smoothing"] = "add-one over the vocab, counts from all domains' train splits"
    print(json.dumps({"cpu_eval_by_domain": out, "baselines_by_domain": base}, indent=1))
    if not a.no_write:
        rec["cpu_eval_by_domain"], rec["baselines_by_domain"] = out, base
        f.write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
