"""Next-token evaluation: top-1 accuracy (with standard error), perplexity and token count.

What: ``evaluate(model, data)`` scores any "logits function" on token windows. ``model`` is either a
torch ``nn.Module`` (called as ``model(ids) -> logits``) or an object with
``logits(ids: np.ndarray[B, T]) -> np.ndarray[B, T, V]`` (an onnxruntime runner, a bundle), so every
stage of the pipeline is scored on the same data the same way.

Why top-1 accuracy: it is the metric the 0.8-point gate is written in; perplexity is reported
beside it. ``accuracy_stderr`` = sqrt(p(1-p)/n) treats tokens as independent (optimistic, but the
comparison that matters, fp32 vs compressed, is paired: see ``agreement``).

Failure modes: empty data raises ``EdgekitError``.
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
            return model(torch.from_numpy(ids).to(device)).float().cpu().numpy()
    return run


class Tally:
    """Running next-token accuracy / NLL over batches of logits (shared by ``evaluate`` and the
    streamed evaluation in ``edgekit.stream``, so both score identically)."""

    def __init__(self, keep_predictions: bool = False):
        self.correct, self.nll, self.n, self.preds, self.keep = 0, 0.0, 0, [], keep_predictions

    def add(self, logits: np.ndarray, y: np.ndarray) -> None:
        m = logits.max(-1, keepdims=True)
        logz = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
        picked = np.take_along_axis(logits, y[..., None], -1)[..., 0]
        self.nll += float((logz - picked).sum())
        pred = logits.argmax(-1)
        self.correct += int((pred == y).sum())
        self.n += y.size
        if self.keep:
            self.preds.append(pred.reshape(-1))

    def result(self) -> EvalResult:
        p = self.correct / self.n
        return EvalResult(p, math.sqrt(p * (1 - p) / self.n), math.exp(self.nll / self.n), self.n)


def eval_rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    if tokens is None or len(tokens) < 2:
        raise EdgekitError("evaluation data is empty; pass a text file with at least a few hundred tokens")
    return windows(np.asarray(tokens, dtype=np.int64), seq_len)


def evaluate(model, tokens: np.ndarray, seq_len: int = 512, batch_size: int = 8,
             progress: bool = True, return_predictions: bool = False):
    """Score ``model`` on ``tokens`` (1-D ids) in non-overlapping windows of ``seq_len``."""
    rows = eval_rows(tokens, seq_len)
    fn = _logits_fn(model)
    tally = Tally(return_predictions)
    it = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="eval", unit="batch", leave=False)
    for i in it:
        batch = rows[i: i + batch_size]
        tally.add(fn(batch[:, :-1]), batch[:, 1:])
    res = tally.result()
    return (res, np.concatenate(tally.preds)) if return_predictions else res
