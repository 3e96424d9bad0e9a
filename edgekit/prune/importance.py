"""Importance criteria: pure functions from calibration statistics to the indices to keep.

What: each ``keep_*`` function takes statistics (``stats.LayerStats`` fields, plain tensors) and a
count, and returns the sorted indices of the units to keep. Nothing here touches a model.

Criteria (all measured on calibration data, not weight magnitude alone):

- experts, ``reap`` (REAP, Lasby et al. 2025): mean over the tokens routed to an expert of
  ``gate_weight * ||expert_out||``, how strongly the expert moves the residual stream when used.
  ``frequency`` (EASY-EP-style): how many tokens the router sends it. ``contribution``: the sum of
  ``gate_weight * ||expert_out||`` over all calibration tokens = frequency x REAP, the expert's
  expected share of the MoE output per token.
- heads: mean norm of a head's contribution through ``o_proj`` (``stats.head_norm``).
- FFN channels (Wanda on the SwiGLU hidden): ``sqrt(E[act_j^2]) * ||down_proj[:, j]||``, the RMS
  norm of channel j's contribution to the FFN output.
- layers (ShortGPT Block Influence): ``1 - cos(x_in, x_out)``; the least influential go first.

Invariants: outputs are sorted ascending, unique, of exactly the requested length; ties break
towards the lower index (deterministic).
"""

from __future__ import annotations

import torch

EXPERT_CRITERIA = ("reap", "frequency", "contribution")


def top_indices(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the ``n_keep`` highest scores; ties go to the lower index."""
    if not 0 < n_keep <= len(scores):
        raise ValueError(f"n_keep={n_keep} must be in 1..{len(scores)}")
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:n_keep]), dtype=torch.long)


def expert_scores(count: torch.Tensor, gate_sum: torch.Tensor, reap_sum: torch.Tensor,
                  criterion: str = "reap") -> torch.Tensor:
    """[E] importance of each routed expert from its routing statistics."""
    if criterion == "reap":
        return reap_sum / count.clamp(min=1)
    if criterion == "frequency":  # ties (equal counts) broken by gate weight mass
        return count + gate_sum / (gate_sum.sum() + 1)
    if criterion == "contribution":
        return reap_sum
    raise ValueError(f"expert criterion {criterion!r}: use one of {EXPERT_CRITERIA}")


def keep_experts(count, gate_sum, reap_sum, n_keep: int, criterion: str = "reap") -> torch.Tensor:
    return top_indices(expert_scores(count, gate_sum, reap_sum, criterion), n_keep)


def channel_scores(act_sq: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """act_sq [I] = E[act_j^2]; down_weight [D, I] -> [I] RMS norm of each channel's contribution."""
    return act_sq.float().cpu().clamp(min=0).sqrt() * down_weight.float().norm(dim=0).cpu()


def keep_channels(act_sq: torch.Tensor, down_weight: torch.Tensor, n_keep: int) -> torch.Tensor:
    return top_indices(channel_scores(act_sq, down_weight), n_keep)


def keep_heads(head_norm: torch.Tensor, n_keep: int) -> torch.Tensor:
    return top_indices(head_norm, n_keep)


def keep_layers(block_influence: list[float], n_remove: int) -> list[int]:
    """Indices of the layers to keep after removing the ``n_remove`` least influential ones."""
    n = len(block_influence)
    if not 0 <= n_remove < n:
        raise ValueError(f"cannot remove {n_remove} of {n} layers; keep at least one")
    return top_indices(torch.tensor(block_influence), n - n_remove).tolist()
