"""Parity of an exported directory against the torch model it came from (fp32).

What: ``verify(model, export_dir, prompt_lens, steps, seed) -> dict`` runs random prompts of each
length through ``OrtModel.logits`` and ``OrtModel.generate_greedy`` and through torch
(``Transformer.forward`` and a greedy loop over ``forward_cached``), and reports per length the max
abs logits difference and whether the greedy tokens are identical. ``passed`` applies the issue's
bar: max abs diff <= ``LOGITS_TOL`` and identical tokens at every length.

Lengths that do not fit ``max_position_embeddings`` are clipped so the run ends exactly at the
last position (that is how the maximum-position case is exercised).
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.session import greedy

LOGITS_TOL = 1e-4


class TorchSteps:
    """``prefill``/``decode`` over ``Transformer.forward_cached`` (numpy in and out), so the torch
    reference decodes through the same greedy loop as onnxruntime (``edgekit.runtime.session.greedy``)."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, ids, capacity: int | None = None):
        logits, kv, pe = self.model.forward_cached(torch.from_numpy(np.asarray(ids, np.int64)))
        return logits[:, -1].numpy(), [kv, pe]

    @torch.no_grad()
    def decode(self, tokens, cache):
        tok = torch.from_numpy(np.asarray(tokens, np.int64).reshape(-1, 1))
        logits, cache[0], cache[1] = self.model.forward_cached(tok, *cache)
        return logits[:, -1].numpy()


def torch_greedy(model, ids, n: int) -> np.ndarray:
    """Greedy reference with n - 1 cached steps (so T + n - 1 positions are used, like OrtModel)."""
    return greedy(TorchSteps(model), np.asarray(ids), n)


def verify(model, export_dir, prompt_lens=(1, 7, 128), steps: int = 32, seed: int = 0,
           ort_model=None) -> dict:
    from ..runtime.session import OrtModel

    om = ort_model or OrtModel(export_dir, spinning=False)   # idle spinning threads slow the torch side
    a = model.args
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for T in prompt_lens:
        T = min(T, a.max_position_embeddings)
        n = max(1, min(steps, a.max_position_embeddings - T + 1))
        ids = torch.randint(0, a.vocab_size, (1, T), generator=gen)
        with torch.no_grad():
            ref = model(ids).numpy()
        diff = np.abs(om.logits(ids.numpy()) - ref)
        tokens_ref, tokens = torch_greedy(model, ids, n), om.generate_greedy(ids.numpy(), n)
        first_diff = np.flatnonzero((tokens_ref != tokens)[0])
        rows.append({"prompt_len": T, "new_tokens": n, "positions_used": T + n - 1,
                     "logits_max_abs": float(diff.max()), "logits_mean_abs": float(diff.mean()),
                     "tokens_equal": bool(first_diff.size == 0),
                     "first_token_mismatch": int(first_diff[0]) if first_diff.size else None})
    passed = all(r["logits_max_abs"] <= LOGITS_TOL and r["tokens_equal"] for r in rows)
    return {"passed": passed, "tolerance": LOGITS_TOL, "runs": rows}
