"""Structured pruning of V3 models: routed experts, attention heads, FFN channels and whole layers.

What: ``prune_(model, PruneConfig(experts=0.5, ffn=0.25), calib_tokens)`` measures importance on
calibration tokens (``stats.py``), picks the units to keep (``importance.py``), slices them out of
the tensors and replaces the model's modules and ``model.args`` with the smaller ones
(``surgery.py``), then optionally recovers accuracy by distillation from the unpruned model
(``edgekit.distill``). ``prune_checkpoint(src, out, config)`` does the same from and to
Hugging Face-format checkpoint directories.

Why structured: whole experts, heads, channels and layers leave the tensors, so the exported graph
is smaller and faster on any runtime (no masks, no sparse kernels).

Ratios are fractions REMOVED (0.5 = half the experts go). ``experts`` applies to each MoE layer's
routed experts, ``heads`` to each layer's attention heads, ``ffn`` to the hidden channels of every
FFN (dense MLP, shared experts and each routed expert), ``layers`` is a count of whole layers
removed (lowest Block Influence first). ``per_layer`` maps an original layer index (string or int;
TOML keys are strings) to its own ``{experts, heads, ffn}`` ratios, overriding the global ones.

Invariants: all statistics come from the unpruned model in one calibration pass; at least one unit
of each kind stays; the pruned model loads with the plain model class (``layer_overrides`` carry
per-layer sizes when they differ); the teacher used for recovery is an untouched copy.
Under torchrun (``edgekit.dist``) calibration and distillation are split over ranks with the same
result on every rank; ``prune_checkpoint`` is then written by rank 0 alone (``dist.publish``).

Failure modes: ratios outside [0, 1), removing every layer, unknown per-layer keys or layer
indices raise ``ValueError`` (config) or ``EdgekitError`` (input) with the fix in the message.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..errors import EdgekitError
from .importance import EXPERT_CRITERIA, keep_channels, keep_experts, keep_heads, keep_layers
from .stats import LayerStats, collect_stats
from .surgery import LayerPlan, Plan, apply_plan_

RATIO_KINDS = ("experts", "heads", "ffn")


@dataclass
class PruneConfig:
    experts: float = 0.0             # fraction of routed experts removed in each MoE layer
    heads: float = 0.0               # fraction of attention heads removed in each layer
    ffn: float = 0.0                 # fraction of FFN hidden channels removed (dense, shared, routed)
    layers: int = 0                  # whole layers removed, lowest Block Influence first
    recover_steps: int = 0           # distillation steps from the unpruned model (0: none)
    per_layer: dict | None = None    # {"3": {"experts": 0.5, "heads": 0.25}}: overrides by original index
    expert_criterion: str = "reap"   # reap | frequency | contribution (see importance.py)
    calib_seq_len: int = 256
    calib_max_tokens: int = 0        # 0: all calibration tokens
    recover_lr: float = 2e-4
    recover_batch_size: int = 4
    recover_seq_len: int = 256
    recover_hidden_weight: float = 0.0
    recover_train_embeddings: bool = True
    recover_fake_quant: str = ""     # "int8" / "int4-experts": quantization-aware recovery (edgekit/qat.py)
    recover_fake_quant_block: int = 32   # "int4-experts": 4-bit block along K (= [quantize] int4_block; 0: rows)
    seed: int = 0

    def __post_init__(self):
        for k in RATIO_KINDS:
            _check_ratio(k, getattr(self, k))
        if self.layers < 0 or self.recover_steps < 0:
            raise ValueError("layers and recover_steps count things removed / steps run: use >= 0")
        if self.expert_criterion not in EXPERT_CRITERIA:
            raise ValueError(f"expert_criterion={self.expert_criterion!r}: use one of {EXPERT_CRITERIA}")
        plan = {}
        for i, over in (self.per_layer or {}).items():
            if not str(i).isdigit():
                raise ValueError(f"per_layer key {i!r}: use a layer index such as \"3\"")
            if not isinstance(over, dict) or set(over) - set(RATIO_KINDS):
                raise ValueError(f"per_layer[{i}] = {over!r}: use a table with keys among {RATIO_KINDS}")
            for k, v in over.items():
                _check_ratio(f"per_layer[{i}].{k}", v)
            plan[str(int(i))] = dict(over)
        self.per_layer = plan or None
        if self.recover_fake_quant_block < 0:
            raise ValueError(f"recover_fake_quant_block={self.recover_fake_quant_block}: use the 4-bit block "
                             "along K ([quantize] int4_block) or 0 for one scale per row")
        self.distill_config(progress=False)     # the other recover_* settings checked at load, not mid-run

    @property
    def removes_anything(self) -> bool:
        """False when every ratio (global and per layer) is 0 and no layer goes."""
        return bool(self.layers or any(getattr(self, k) for k in RATIO_KINDS)
                    or any(v for over in (self.per_layer or {}).values() for v in over.values()))

    def ratios(self, layer: int) -> dict[str, float]:
        base = {k: getattr(self, k) for k in RATIO_KINDS}
        return {**base, **(self.per_layer or {}).get(str(layer), {})}

    def distill_config(self, progress: bool = True, device: str = "auto"):
        from ..distill import DistillConfig
        return DistillConfig(steps=self.recover_steps, lr=self.recover_lr, batch_size=self.recover_batch_size,
                             seq_len=self.recover_seq_len, hidden_weight=self.recover_hidden_weight,
                             train_embeddings=self.recover_train_embeddings, fake_quant=self.recover_fake_quant,
                             fake_quant_block=self.recover_fake_quant_block,
                             seed=self.seed, progress=progress, device=device)


def _check_ratio(name: str, r):
    if not isinstance(r, (int, float)) or not 0 <= r < 1:
        raise ValueError(f"{name}={r!r}: a fraction removed in [0, 1), e.g. 0.25")


def _n_keep(n: int, ratio: float) -> int:
    return max(1, min(n, round(n * (1 - ratio))))


def _fill_unrouted(act_sq, count):
    """[E, I]: experts no calibration token reached get the mean activation profile of the others
    (so their channels are still ranked by weight, not kept by index)."""
    routed = count > 0
    if routed.all():
        return act_sq
    fill = act_sq[routed].mean(0) if routed.any() else torch.ones(act_sq.shape[1])
    return torch.where(routed[:, None], act_sq, fill)


def check_prunable(model, config: PruneConfig, calib_tokens: np.ndarray | None = None) -> None:
    """Config vs this model (and enough calibration text), before any statistics are collected."""
    n_layers = len(model.model.layers)
    bad = [i for i in (config.per_layer or {}) if int(i) >= n_layers]
    if bad:
        raise EdgekitError(f"prune per_layer names layer {bad[0]} but the model has {n_layers}; use 0..{n_layers - 1}")
    if config.layers >= n_layers:
        raise EdgekitError(f"cannot remove {config.layers} of {n_layers} layers; use layers <= {n_layers - 1}")
    if calib_tokens is not None:
        from ..data import require_tokens

        require_tokens(calib_tokens, config.calib_seq_len + 1, "calibration text for pruning")


def plan_from_stats(model, stats: list[LayerStats], config: PruneConfig) -> Plan:
    """Which units to keep, from calibration statistics and the current weights (for channel norms)."""
    check_prunable(model, config)
    plan = Plan(keep_layers([s.block_influence for s in stats], config.layers))
    for i in plan.layers:
        r, st = config.ratios(i), stats[i]
        lp = LayerPlan()
        H = len(st.head_norm)
        if r["heads"] and _n_keep(H, r["heads"]) < H:
            lp.heads = keep_heads(st.head_norm, _n_keep(H, r["heads"]))
        if r["ffn"]:  # channel scores read the layer's weights (a streamed source loads it only then)
            mlp = model.model.layers[i].mlp
        if st.ffn_act_sq is not None:
            n = len(st.ffn_act_sq)
            if r["ffn"] and _n_keep(n, r["ffn"]) < n:
                lp.ffn = keep_channels(st.ffn_act_sq, mlp.down_proj.weight.detach(), _n_keep(n, r["ffn"]))
        else:
            E = len(st.expert_count)
            if r["experts"] and _n_keep(E, r["experts"]) < E:
                lp.experts = keep_experts(st.expert_count, st.expert_gate_sum, st.expert_reap_sum,
                                          _n_keep(E, r["experts"]), config.expert_criterion)
            width = st.expert_act_sq.shape[1]
            if r["ffn"] and _n_keep(width, r["ffn"]) < width:
                w = _n_keep(width, r["ffn"])
                kept = lp.experts.tolist() if lp.experts is not None else range(E)
                act = _fill_unrouted(st.expert_act_sq, st.expert_count)
                lp.expert_channels = {e: keep_channels(act[e], mlp.experts[e].down_proj.weight.detach(), w)
                                      for e in kept}
                if st.shared_act_sq is not None:
                    n_sh = len(st.shared_act_sq) // width
                    lp.shared = keep_channels(st.shared_act_sq, mlp.shared_experts.down_proj.weight.detach(), w * n_sh)
        plan.per_layer[i] = lp
    return plan


def prune_(model, config: PruneConfig, calib_tokens: np.ndarray, recover_tokens: np.ndarray | None = None,
           progress: bool = True, device: str = "auto"):
    """Prune ``model`` in place (modules swapped, ``model.args`` replaced) and return it.

    ``calib_tokens``: 1-D token ids to measure importance on (e.g. ``load_tokens("calib", tok)``).
    ``recover_tokens``: text for distillation (default: ``calib_tokens``); used when
    ``config.recover_steps > 0``. Statistics run where the model is; distillation on ``device``."""
    from ..distill import distill_

    check_prunable(model, config, calib_tokens)
    teacher = copy.deepcopy(model).eval() if config.recover_steps else None
    if config.removes_anything:       # nothing to remove: no statistics (recovery alone is then QAT)
        stats = collect_stats(model, calib_tokens, seq_len=config.calib_seq_len,
                              max_tokens=config.calib_max_tokens, progress=progress)
        apply_plan_(model, plan_from_stats(model, stats, config))
    if teacher is not None:
        distill_(model, teacher, calib_tokens if recover_tokens is None else recover_tokens,
                 config.distill_config(progress, device))
    return model.eval()


def removed_nothing(pruned_dir: str | os.PathLike) -> bool:
    """True when the prune stage's record (``prune.json`` of ``pruned_dir``) shows the model unchanged:
    no parameter removed and no distillation step configured. Its fp32 accuracy is then the unpruned
    model's (smoothing, the next stage, preserves the function), so the pipeline does not score it again."""
    rec = json.loads((Path(pruned_dir) / "prune.json").read_text())
    return rec["params_after"] == rec["params_before"] and not rec["config"].get("recover_steps")


def prune_checkpoint(src: str | os.PathLike | None, out: str | os.PathLike, config: PruneConfig,
                     calib: str | os.PathLike = "calib", recover: str | os.PathLike | None = None,
                     progress: bool = True, calib_tokens: np.ndarray | None = None,
                     recover_tokens: np.ndarray | None = None,
                     after_write: Callable[[Path], None] | None = None, device: str = "cpu") -> Path:
    """Load checkpoint ``src`` (None: v3-nano), prune with ``config`` using text ``calib`` (a split
    name or a text file; ``recover`` likewise for distillation, default ``calib``), and write a
    Hugging Face-format checkpoint to ``out`` (atomically) with a ``prune.json`` record:
    ``{source, config, calib, recover, calib_tokens, recover_tokens, params_before, params_after,
    world_size}``. ``calib_tokens`` / ``recover_tokens``: those texts already tokenized (``edgekit
    compress`` passes them; ``calib``/``recover`` then only name them in the record). Under torchrun
    every rank calls this; rank 0 writes ``out`` once all ranks have succeeded, the others nothing.
    ``after_write(tmp)`` runs on the staged directory before it is renamed into place. ``device``:
    where statistics and distillation run (``edgekit.device``; the checkpoint is written from CPU)."""
    from ..checkpoint import load, load_tokenizer, save
    from ..data import load_tokens
    from ..device import pick
    from ..info import param_count

    dev = pick(device)
    model = load(src).to(dev)
    if calib_tokens is None or (recover is not None and recover_tokens is None):
        tok = load_tokenizer(src)
        calib_tokens = load_tokens(calib, tok) if calib_tokens is None else calib_tokens
        recover_tokens = load_tokens(recover, tok) if recover is not None and recover_tokens is None \
            else recover_tokens
    before = param_count(model)
    prune_(model, config, calib_tokens, recover_tokens, progress=progress, device=dev.type)
    model = model.cpu()
    record = {"source": str(src or "v3-nano"), "config": asdict(config), "calib": str(calib),
              "recover": str(recover or calib), "calib_tokens": int(len(calib_tokens)),
              "recover_tokens": int(len(calib_tokens if recover_tokens is None else recover_tokens)),
              "params_before": before, "params_after": param_count(model), "world_size": dist.world().size}
    extra = {"prune.json": json.dumps(record, indent=2) + "\n"}
    def write(tmp: Path):
        save(model, tmp, tokenizer_from=src or "v3-nano", extra_files=extra)
        if after_write:
            after_write(tmp)

    return dist.publish(out, write)
