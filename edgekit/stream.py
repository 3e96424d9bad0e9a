"""Streamed stages: calibration statistics, pruning surgery, SmoothQuant scaling and evaluation with
one decoder layer in memory at a time.

What: a *layer source* gives ``args``, ``layer(i, device)``, ``embedding(device)`` and
``head(device)``: a ``CheckpointReader`` (``edgekit.lazy``, weights read per layer from
safetensors) or ``ModelSource(model)`` (an in-memory model). ``run_layers`` embeds calibration rows
once, then runs every batch through layer 0, then layer 1, ... (layer-major) keeping only the hidden
states [rows, seq, hidden] and the current layer. On top of it:
- ``collect_stats_streamed`` -> the same ``LayerStats`` as ``prune.stats.collect_stats``;
- ``prune_streamed(src, out, config, calib)`` -> the same pruned checkpoint as
  ``prune.prune_checkpoint`` (plan from the statistics, surgery layer by layer, written shard by
  shard); no distillation (``recover_steps`` must be 0: it needs student and teacher in memory);
- ``smooth_streamed(src, out, calib, config)`` -> the same smoothed checkpoint as ``smooth_`` on the
  loaded model (statistics of layer i, then its scales folded and the layer written);
- ``evaluate_streamed(src, tokens)`` -> the same ``EvalResult`` as ``evaluate(load(src), tokens)``.

Why identical results: each batch goes through the same ops on the same inputs as in the
full-model forward (batch composition, RoPE tables and masks are the same), and statistics
accumulate per layer in batch order, so streamed and in-memory stages agree bit for bit
(tests/test_stream.py). Only the loop order differs (layer-major instead of batch-major).

Memory: hidden states of all calibration rows (rows x seq x hidden x 4 bytes; 46k tokens x 1536 =
283 MB for v3-1.6b) + one layer + the embedding/head; evaluation splits its rows into groups of at
most ``max_hidden_bytes`` and streams the layers once per group.

Devices: every function takes ``device`` ("auto" | "cpu" | "cuda", ``edgekit.device``); layers
and hidden states move there, statistics are gathered on the CPU.

Failure modes: ``recover_steps > 0`` in ``prune_streamed`` and bad input (``EdgekitError`` from the
reader) raise with one line naming the fix.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_dir
from .device import pick
from .errors import EdgekitError
from .heap import release
from .lazy import CheckpointReader, ShardWriter
from .model import rope_tables

# checkpoints written by the streamed stages are cut into shards of this size: ``ShardWriter`` holds
# one shard's tensors until it is written, so this bounds what writing adds to the layer in memory
SHARD_BYTES = 1 << 28


class ModelSource:
    """An in-memory ``Transformer`` seen as a layer source (its own modules, not copies)."""

    def __init__(self, model):
        self.model, self.args, self.name = model, model.args, getattr(model, "name", None)

    def layer(self, i: int, device="cpu"):
        return self.model.model.layers[i].to(device)

    def embedding(self, device="cpu"):
        return self.model.model.embed_tokens.to(device)

    def head(self, device="cpu"):
        return self.model.model.norm.to(device), self.model.lm_head.to(device)


def as_source(src):
    """A layer source from a reader, an in-memory model, or a checkpoint path (None: v3-nano)."""
    if hasattr(src, "layer") and hasattr(src, "args"):
        return src
    if isinstance(src, torch.nn.Module):
        return ModelSource(src)
    return CheckpointReader(src)


class _LazyLayers:
    """``model.model.layers`` for code that reads a few layers' weights (pruning's channel scores)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return self.source.args.num_hidden_layers

    def __getitem__(self, i):
        return self.source.layer(i)


class LazyModel:
    """``model.args`` and ``model.model.layers`` (read on access) of a layer source: what pruning's
    plan and checks read."""

    def __init__(self, source):
        from types import SimpleNamespace

        self.args = source.args
        self.model = SimpleNamespace(layers=_LazyLayers(source))


@torch.no_grad()
def run_layers(source, rows: np.ndarray, batch_size: int, before=None, after=None, device="cpu",
               progress: bool = False, desc: str = "layers") -> list[torch.Tensor]:
    """Run ``rows`` [N, T] through every layer, layer-major. ``before(i, block)`` may return hook
    handles (removed after the layer ran), ``after(i, block)`` sees the layer once all batches went
    through it. Returns the last hidden states per batch ([b, T, D] each, on ``device``)."""
    a = source.args
    T = rows.shape[1]
    cos, sin = rope_tables(a)
    pos = torch.arange(T)
    cos, sin = cos[pos].to(device), sin[pos].to(device)
    mask = (torch.arange(T)[None, :] <= pos[:, None]).to(device)
    emb = source.embedding(device)
    xs = [emb(torch.from_numpy(rows[i: i + batch_size]).to(device)) for i in range(0, len(rows), batch_size)]
    del emb
    it = range(a.num_hidden_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, unit="layer", leave=False)
    for i in it:
        block = source.layer(i, device)
        handles = (before(i, block) if before else None) or []
        try:
            xs = [block(x, cos, sin, mask)[0] for x in xs]
        finally:
            for h in handles:
                h.remove()
        if after:
            after(i, block)
        del block
        release()                 # the layer's freed buffers back to the OS (edgekit.heap)
    return xs


def collect_stats_streamed(source, tokens: np.ndarray, seq_len: int = 256, batch_size: int = 8,
                           max_tokens: int = 0, progress: bool = False, device: str = "cpu"):
    """``prune.stats.collect_stats`` with one layer in memory at a time (identical statistics)."""
    from .prune.stats import _Acc, calib_rows, layer_hooks

    source = as_source(source)
    rows = calib_rows(tokens, seq_len, source.args.max_position_embeddings, max_tokens)
    accs = []

    def before(i, block):
        accs.append(_Acc(block))
        return layer_hooks(block, accs[-1])

    run_layers(source, rows, batch_size, before=before, device=pick(device), progress=progress, desc="calibrate")
    return [a.finish() for a in accs]


def _write_checkpoint(tmp: Path, writer: ShardWriter, args, src_dir: Path | None, extra: dict[str, str]):
    from .checkpoint import config_from_args, reference_model_dir

    writer.close()
    (tmp / "config.json").write_text(json.dumps(config_from_args(args), indent=2) + "\n")
    tok = (src_dir or reference_model_dir()) / "tokenizer.json"
    if tok.exists():
        shutil.copy(tok, tmp / "tokenizer.json")
    for name, text in extra.items():
        (tmp / name).write_text(text)


def prune_streamed(src, out: str | os.PathLike, config, calib_tokens: np.ndarray, progress: bool = False,
                   device: str = "cpu", shard_bytes: int = SHARD_BYTES) -> Path:
    """``prune.prune_checkpoint`` for checkpoints larger than memory (no distillation)."""
    from .info import param_count
    from .prune import check_prunable, plan_from_stats
    from .prune.surgery import LayerPlan, _slice_layer, args_for_layers
    from .shapes import meta_model

    if config.recover_steps:
        raise EdgekitError(f"streamed pruning cannot distill (recover_steps={config.recover_steps}): distillation "
                           "holds student and teacher in memory; set prune recover_steps = 0 or use the in-memory path")
    r = as_source(src)
    check_prunable(LazyModel(r), config, calib_tokens)
    stats = collect_stats_streamed(r, calib_tokens, config.calib_seq_len, max_tokens=config.calib_max_tokens,
                                   progress=progress, device=device)
    plan = plan_from_stats(LazyModel(r), stats, config)
    args, out = r.args, Path(out)
    with atomic_dir(out) as tmp:
        w = ShardWriter(tmp, shard_bytes)
        g = r.global_state()
        w.add("model.embed_tokens.weight", g["model.embed_tokens.weight"])
        layers = []
        for j, i in enumerate(plan.layers):
            sliced = {}
            layers.append(_slice_layer(r.layer_state(i), args, i, j, args.for_layer(i),
                                       plan.per_layer.get(i, LayerPlan()), sliced))
            for k, v in sliced.items():
                w.add(k, v)
            del sliced
            release()
        w.add("model.norm.weight", g["model.norm.weight"])
        if not args.tie_word_embeddings:
            w.add("lm_head.weight", g["lm_head.weight"])
        new_args = args_for_layers(args, layers)
        record = {"source": str(getattr(r, "dir", src)), "config": asdict(config), "streamed": True,
                  "params_before": param_count(meta_model(args)), "params_after": param_count(meta_model(new_args))}
        _write_checkpoint(tmp, w, new_args, getattr(r, "dir", None),
                          {"prune.json": json.dumps(record, indent=2) + "\n"})
    return out


def smooth_streamed(src, out: str | os.PathLike, calib_tokens: np.ndarray, config=None, device: str = "cpu",
                    shard_bytes: int = SHARD_BYTES, progress: bool = False) -> dict:
    """``smooth.smooth_checkpoint`` one layer at a time: writes the smoothed checkpoint to ``out``
    with the same ``smooth.json`` (``{"config", "groups"}``) and returns the per-group report."""
    from .smooth import SmoothConfig, calib_rows, finish_norm_stats, fold_group, layer_groups, norm_hooks, selected

    cfg = config or SmoothConfig()
    r = as_source(src)
    rows = calib_rows(calib_tokens, cfg, r.args.max_position_embeddings)
    if not cfg.enabled:       # the stage passes the weights through unchanged: no statistics needed
        rows = rows[:0]
    report, out = {}, Path(out)
    with atomic_dir(out) as tmp:
        w = ShardWriter(tmp, shard_bytes)
        g = r.global_state()
        w.add("model.embed_tokens.weight", g["model.embed_tokens.weight"])
        state: dict = {}

        def before(i, block):
            state.clear()
            state["groups"] = selected(layer_groups(i, block), cfg) if cfg.enabled else []
            return norm_hooks({name: norm for name, norm, _, _ in state["groups"]}, cfg, state.setdefault("s", {}))

        def after(i, block):
            stats = finish_norm_stats(state["s"], cfg)
            for name, norm, lins, fp32_lins in state["groups"]:
                if name in stats:
                    report[name] = fold_group(norm, lins, fp32_lins, *stats[name], cfg)
            for k, v in block.state_dict().items():
                w.add(f"model.layers.{i}.{k}", v.detach().cpu())

        run_layers(r, rows[:, :-1], cfg.batch_size, before, after, device=pick(device), progress=progress,
                   desc="smooth")
        w.add("model.norm.weight", g["model.norm.weight"])
        if not r.args.tie_word_embeddings:
            w.add("lm_head.weight", g["lm_head.weight"])
        record = {"config": asdict(cfg), "groups": report}
        _write_checkpoint(tmp, w, r.args, getattr(r, "dir", None),
                          {"smooth.json": json.dumps(record, indent=2, default=float) + "\n"})
    return report


def evaluate_streamed(src, tokens: np.ndarray, seq_len: int = 512, batch_size: int = 8, device: str = "cpu",
                      max_hidden_bytes: int = 1 << 28, progress: bool = False):
    """``evaluate(load(src), tokens)`` with one layer in memory; rows are processed in groups whose
    hidden states fit ``max_hidden_bytes`` (one pass over the layers per group)."""
    from .evaluate import Tally, eval_rows

    r = as_source(src)
    dev = pick(device)
    rows = eval_rows(tokens, seq_len)
    per_row = rows.shape[1] * r.args.hidden_size * 4
    group = max(batch_size, (max_hidden_bytes // per_row) // batch_size * batch_size)
    tally = Tally()
    norm, head = r.head(dev)
    for g0 in range(0, len(rows), group):
        part = rows[g0: g0 + group]
        xs = run_layers(r, part[:, :-1], batch_size, device=dev, progress=progress, desc="eval")
        for b, x in enumerate(xs):
            with torch.no_grad():
                logits = head(norm(x)).float().cpu().numpy()
            tally.add(logits, part[b * batch_size:(b + 1) * batch_size, 1:])
    return tally.scores().result()
