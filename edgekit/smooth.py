"""SmoothQuant-style dynamic-range scaling, folded into the RMSNorm weights (the graph gains no ops).

What: ``smooth_checkpoint(src, out, SmoothConfig(), calib_tokens)`` is the pipeline stage (checkpoint
in, smoothed checkpoint + ``smooth.json`` out); ``smooth_(model, calib_tokens, config)`` measures,
on calibration tokens, the per-channel max |x_j| of every RMSNorm output that feeds linears, and
moves range from the activations into the weights: x_j -> x_j / s_j (the norm weight is divided
by s) and W[:, j] -> W[:, j] * s_j for every consumer, with ``smooth_scales``:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
(Xiao et al., SmoothQuant). Per group the exponent is searched over ``config.alphas`` (plus "off")
by the emulated int8 error of the group's outputs, when ``search`` is on.

Groups (per layer; the consumer list is the whole fan-out of the norm, so fp32 math is unchanged):
- ``input_layernorm`` -> ``q_a_proj`` (or ``q_proj``) + ``kv_a_proj_with_mqa``;
- ``post_attention_layernorm`` -> router ``gate`` + every routed expert's and the shared experts'
  ``gate_proj``/``up_proj`` (MoE), or the dense MLP's ``gate_proj``/``up_proj``. The router weight
  is scaled too, so router logits (and routing) are unchanged in fp32; it is left out of max|W_j|
  because it stays fp32;
- ``q_a_layernorm`` -> ``q_b_proj``;
- ``kv_a_layernorm`` -> ``kv_b_proj`` (off by default: the export runs kv_b_proj as fp32 absorbed
  products ``w_uk``/``w_uv`` derived from its weights, so nothing int8 gains; when on, the latent
  cache holds c_kv / s and the absorbed weights carry s — logits are unchanged).

``layer_groups``, ``norm_hooks`` and ``fold_group`` are the per-layer pieces ``edgekit.stream``
uses to smooth a checkpoint one layer at a time with identical results.

Invariants: fp32 logits after ``smooth_`` equal those before to ~1e-5 (tests/test_smooth.py);
scales are finite and positive (clamped to [min_scale, max_scale]); the model's modules and
shapes are untouched, only weight values change.

Failure modes: ``alpha`` outside [0, 1], an empty alpha list or unknown group names raise
``ValueError`` naming the fix; fewer than 2 calibration tokens raise ``EdgekitError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import EdgekitError
from .int8 import fake_quant

GROUPS = ("input_layernorm", "post_attention_layernorm", "q_a_layernorm", "kv_a_layernorm")


@dataclass
class SmoothConfig:
    """The ``[smooth]`` recipe table."""
    enabled: bool = True                     # False: the stage passes the model through unchanged
    alpha: float = 0.5                       # migration strength when search is off
    alphas: tuple = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # searched per group (with "off") when search is on
    search: bool = True
    groups: tuple = ("input_layernorm", "post_attention_layernorm", "q_a_layernorm")
    calib_seq_len: int = 256
    calib_max_tokens: int = 8192             # the calibration tokens int8 planning reads (QuantConfig)
    search_rows: int = 512                   # token rows kept per group for the alpha search
    batch_size: int = 8
    min_scale: float = 1e-2
    max_scale: float = 1e2

    def __post_init__(self):
        self.alphas = tuple(self.alphas)
        self.groups = tuple(self.groups)
        for a in (self.alpha, *self.alphas):
            if not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"smooth alpha={a}: use a value in [0, 1] (0.5 is SmoothQuant's default)")
        if self.search and not self.alphas:
            raise ValueError("smooth search=True needs a non-empty alphas list (or set search=False)")
        bad = set(self.groups) - set(GROUPS)
        if bad:
            raise ValueError(f"smooth groups {sorted(bad)} unknown; choose among {GROUPS}")
        if not 0 < self.min_scale < 1 < self.max_scale:
            raise ValueError("smooth needs 0 < min_scale < 1 < max_scale")


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                  min_scale: float = 1e-2, max_scale: float = 1e2) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), clamped; channels never seen active get 1."""
    a = act_absmax.float().clamp_min(1e-8)
    w = weight_absmax.float().clamp_min(1e-8)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(act_absmax > 0, s, torch.ones_like(s))
    return s.clamp(min_scale, max_scale)


def layer_groups(i: int, layer) -> list[tuple[str, nn.Module, list[nn.Linear], list[nn.Linear]]]:
    """(group name, norm, quantized consumers, fp32 consumers) for every foldable norm of layer ``i``."""
    at, mlp = layer.self_attn, layer.mlp
    q = [at.q_a_proj] if hasattr(at, "q_a_proj") else [at.q_proj]
    out = [(f"layers.{i}.input_layernorm", layer.input_layernorm, q + [at.kv_a_proj_with_mqa], [])]
    if hasattr(mlp, "experts"):
        lins = [m for e in mlp.experts for m in (e.gate_proj, e.up_proj)]
        if mlp.shared_experts is not None:
            lins += [mlp.shared_experts.gate_proj, mlp.shared_experts.up_proj]
        out.append((f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, lins, [mlp.gate]))
    else:
        out.append((f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm,
                    [mlp.gate_proj, mlp.up_proj], []))
    if hasattr(at, "q_a_layernorm"):
        out.append((f"layers.{i}.q_a_layernorm", at.q_a_layernorm, [at.q_b_proj], []))
    out.append((f"layers.{i}.kv_a_layernorm", at.kv_a_layernorm, [at.kv_b_proj], []))
    return out


def smooth_groups(model) -> list[tuple[str, nn.Module, list[nn.Linear], list[nn.Linear]]]:
    """``layer_groups`` of every layer."""
    return [g for i, layer in enumerate(model.model.layers) for g in layer_groups(i, layer)]


def _fake_q(x: torch.Tensor, dim) -> torch.Tensor:
    """Symmetric int8 fake quantization (``edgekit.int8``), max-abs scales over ``dim`` (None: whole tensor)."""
    return fake_quant(x, dim)


def group_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None) -> float:
    """Relative output error of int8 (per-tensor activations, per-channel weights) for one group."""
    xs = x if s is None else x / s
    xq = _fake_q(xs, None)
    err = ref = 0.0
    for w in weights:
        ws = w if s is None else w * s
        y = x @ w.T
        err += float(((xq @ _fake_q(ws, 1).T) - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


def calib_rows(tokens: np.ndarray, config: SmoothConfig, max_positions: int) -> np.ndarray:
    """[N, S + 1] calibration windows (inputs are ``rows[:, :-1]``)."""
    from .data import windows

    if tokens is None or len(tokens) < 2:
        raise EdgekitError("smoothing needs calibration tokens; pass a text file with a few thousand tokens")
    toks = np.asarray(tokens, dtype=np.int64)[: config.calib_max_tokens + 1]
    return windows(toks, min(config.calib_seq_len, max_positions, len(toks) - 1))


def norm_hooks(norms: dict[str, nn.Module], config: SmoothConfig, stats: dict) -> list:
    """Hooks filling ``stats[name] = (channel max|x| [D], [row samples])`` per norm output. Each
    group samples rows from its own generator (seeded by its name), so the sample does not depend
    on the order the hooks fire: a streamed pass (layer by layer) draws the same rows as a full one."""
    import zlib

    hooks = []
    for name, norm in norms.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))

        def hook(_m, _inp, out, name=name, g=g):
            x = out.detach().reshape(-1, out.shape[-1]).float()
            amax, sample, _ = stats.get(name, (None, [], g))
            cur = x.abs().amax(0)
            keep = x[torch.randperm(len(x), generator=g)[: config.search_rows].to(x.device)].cpu()  # bounded
            stats[name] = (cur if amax is None else torch.maximum(amax, cur), sample + [keep], g)
        hooks.append(norm.register_forward_hook(hook))
    return hooks


def finish_norm_stats(stats: dict, config: SmoothConfig) -> dict:
    out = {}
    for name, (amax, xs, g) in stats.items():
        x = torch.cat(xs)
        idx = torch.randperm(len(x), generator=g)[: config.search_rows]
        out[name] = (amax.cpu(), x[idx])
    return out


@torch.no_grad()
def collect_norm_outputs(model, tokens: np.ndarray, config: SmoothConfig, names: set[str]):
    """Per group: channel max |x| [D] over all calibration tokens and a row sample [R, D]."""
    rows = calib_rows(tokens, config, model.args.max_position_embeddings)
    stats: dict[str, tuple] = {}
    hooks = norm_hooks({n: m for n, m, _, _ in smooth_groups(model) if n in names}, config, stats)
    try:
        for i in range(0, len(rows), config.batch_size):
            model(torch.from_numpy(rows[i: i + config.batch_size, :-1]))
    finally:
        for h in hooks:
            h.remove()
    return finish_norm_stats(stats, config)


@torch.no_grad()
def fold_group(norm, lins: list, fp32_lins: list, amax: torch.Tensor, x: torch.Tensor, cfg: SmoothConfig) -> dict:
    """Search alpha for one group on its statistics and fold the best scales into its weights."""
    ws = [lin.weight.detach().float().cpu() for lin in lins]  # [N, D] each
    wmax = torch.stack([w.abs().amax(0) for w in ws]).amax(0)                     # [D]
    base = group_error(x, ws, None)
    best_a, best_s, best_e = None, None, base
    for a in (cfg.alphas if cfg.search else (cfg.alpha,)):
        s = smooth_scales(amax, wmax, a, cfg.min_scale, cfg.max_scale)
        e = group_error(x, ws, s)
        if e < best_e or not cfg.search:
            best_a, best_s, best_e = a, s, e
    if best_s is not None:
        norm.weight.div_(best_s.to(norm.weight.dtype).to(norm.weight.device))
        for lin in lins + fp32_lins:
            lin.weight.mul_(best_s.to(lin.weight.dtype).to(lin.weight.device))
    return {"alpha": best_a, "error_before": base, "error_after": best_e}


def selected(groups: list, cfg: SmoothConfig) -> list:
    return [g for g in groups if g[0].split(".")[-1] in cfg.groups]


@torch.no_grad()
def smooth_(model, calib_tokens: np.ndarray, config: SmoothConfig | None = None) -> dict:
    """Fold smoothing scales into the norms in place. Returns {group: {"alpha", "error_before",
    "error_after"}} (alpha None: left unsmoothed because no alpha lowered the emulated error)."""
    cfg = config or SmoothConfig()
    if not cfg.enabled:
        return {}
    groups = selected(smooth_groups(model), cfg)
    stats = collect_norm_outputs(model, calib_tokens, cfg, {g[0] for g in groups})
    return {name: fold_group(norm, lins, fp32_lins, *stats[name], cfg)
            for name, norm, lins, fp32_lins in groups if name in stats}


def smooth_checkpoint(src, out, config: SmoothConfig, calib_tokens: np.ndarray):
    """Load checkpoint ``src``, fold the scales (``smooth_``) and write the smoothed checkpoint to
    ``out`` (atomically) with ``smooth.json``: ``{"config", "groups": smooth_'s report}``."""
    import json
    from dataclasses import asdict

    from .checkpoint import load, save

    model = load(src)
    report = smooth_(model, calib_tokens, config)
    record = {"config": asdict(config), "groups": report}
    return save(model, out, tokenizer_from=src, extra_files={"smooth.json": json.dumps(record, indent=2) + "\n"})
