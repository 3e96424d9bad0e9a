"""Next-token scoring: the one loop every stage of the pipeline is scored with.

What: ``score_rows(model, rows)`` runs token rows [N, T + 1] through any "logits function" and
returns ``RowScores``: correct top-1 predictions, token count, summed negative log-likelihood and,
on request, the mean KL divergence from a reference (``Reference``), the predictions or the
per-batch log-probabilities. ``model`` is either a torch ``nn.Module`` (called as
``model(ids) -> logits``) or an object with ``logits(ids: np.ndarray[B, T]) -> np.ndarray[B, T, V]``
(an onnxruntime runner, a bundle), so torch, the int8 emulation and onnxruntime are scored by the
same code. ``evaluate(model, tokens)`` cuts 1-D tokens into windows and reports
``EvalResult`` (accuracy with standard error, perplexity, token count).

Why top-1 accuracy: it is the metric the 0.8-point gate is written in; perplexity is reported
beside it. ``accuracy_stderr`` = sqrt(p(1-p)/n) treats tokens as independent (optimistic, but the
comparison that matters, fp32 vs compressed, is paired: see ``agreement``). The KL (mean over
tokens of KL(reference || model)) is what mixed precision ranks units by.

Invariants: numpy only (torch is imported only to call a torch module); logits are scored in
float32. Failure modes: empty data, or windows longer than the model's positions, raise
``EdgekitError``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .data import windows
from .errors import EdgekitError


@dataclass
class EvalResult:
    accuracy: float
    accuracy_stderr: float
    perplexity: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _logits_fn(model):
    if hasattr(model, "logits"):
        return lambda ids: np.asarray(model.logits(ids), dtype=np.float32)
    import torch

    device = next(model.parameters()).device

    def run(ids):
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(ids)).to(device)).float().cpu().numpy()
    return run


def _log_z(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return m[..., 0] + np.log(np.exp(logits - m).sum(-1))


@dataclass
class Reference:
    """A reference model's next-token distributions on some rows, per batch: probabilities and
    sum(p * log p) (so KL against it is one product per trial)."""
    probs: list[np.ndarray]
    neg_entropy: list[float]


@dataclass
class RowScores:
    correct: int
    tokens: int
    nll: float
    kl: float | None = None                     # mean KL(reference || model) per token
    predictions: np.ndarray | None = None       # [n_tokens] argmax, row-major
    reference: Reference | None = None          # this model's distributions, to score others against

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens

    def result(self) -> EvalResult:
        p = self.accuracy
        return EvalResult(p, math.sqrt(p * (1 - p) / self.tokens), math.exp(self.nll / self.tokens), self.tokens)


class Tally:
    """Running scores over batches of logits, in order: the loop body of ``score_rows``, also fed by
    the streamed evaluation (``edgekit.stream``), so both score identically."""

    def __init__(self, ref: Reference | None = None, predictions: bool = False, as_reference: bool = False):
        self.ref, self.keep_preds = ref, predictions
        self.correct, self.nll, self.n, self.kl, self.preds, self.batch = 0, 0.0, 0, 0.0, [], 0
        self.keep = Reference([], []) if as_reference else None

    def add(self, logits: np.ndarray, y: np.ndarray) -> None:
        logz = _log_z(logits)
        picked = np.take_along_axis(logits, y[..., None], -1)[..., 0]
        self.nll += float((logz - picked).sum())
        pred = logits.argmax(-1)
        self.correct += int((pred == y).sum())
        self.n += y.size
        if self.keep_preds:
            self.preds.append(pred.reshape(-1))
        if self.ref is not None or self.keep is not None:
            logp = logits - logz[..., None]
            if self.ref is not None:
                b = self.batch
                self.kl += self.ref.neg_entropy[b] - float((self.ref.probs[b] * logp).sum(dtype=np.float64))
            if self.keep is not None:
                p = np.exp(logp)
                self.keep.probs.append(p)
                self.keep.neg_entropy.append(float((p * logp).sum(dtype=np.float64)))
        self.batch += 1

    def scores(self) -> RowScores:
        return RowScores(self.correct, self.n, self.nll, self.kl / self.n if self.ref is not None else None,
                         np.concatenate(self.preds) if self.keep_preds else None, self.keep)


def score_rows(model, rows: np.ndarray, batch_size: int = 8, ref: Reference | None = None,
               predictions: bool = False, as_reference: bool = False, progress: bool = False) -> RowScores:
    """Score ``model`` on ``rows`` [N, T + 1] (inputs and next-token targets); see the module doc."""
    rows = np.asarray(rows, dtype=np.int64)
    fn = _logits_fn(model)
    tally = Tally(ref, predictions, as_reference)
    it = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="eval", unit="batch", leave=False)
    for i in it:
        batch = rows[i: i + batch_size]
        tally.add(fn(batch[:, :-1]), batch[:, 1:])
    return tally.scores()


def eval_rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    if tokens is None or len(tokens) < 2:
        raise EdgekitError("evaluation data is empty; pass a text file with at least a few hundred tokens")
    return windows(np.asarray(tokens, dtype=np.int64), seq_len)


def max_positions(model) -> int | None:
    """Positions ``model`` can score in one window: ``max_position_embeddings`` of a torch model's
    args or an onnxruntime runner's ``max_positions``; None when it does not say."""
    limit = getattr(model, "max_positions", None) or getattr(getattr(model, "args", None), "max_position_embeddings",
                                                              None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def evaluate(model, tokens: np.ndarray, seq_len: int = 512, batch_size: int = 8,
             progress: bool = True, return_predictions: bool = False):
    """Score ``model`` on ``tokens`` (1-D ids) in non-overlapping windows of ``seq_len``."""
    if tokens is None or len(tokens) < 2:
        raise EdgekitError("evaluation data is empty; pass a text file with at least a few hundred tokens")
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise EdgekitError(f"a window of {seq_len} tokens does not fit the model's {limit} positions; use a "
                           f"sequence length (--seq-len, or the recipe's [validate] seq_len) of at most {limit}")
    r = score_rows(model, eval_rows(tokens, seq_len), batch_size, predictions=return_predictions, progress=progress)
    res = r.result()
    return (res, r.predictions) if return_predictions else res
