"""Streamed int8: SmoothQuant scaling, layer-by-layer export and the int8 rewrite, one decoder layer
in memory at a time.

What: ``Int8Pieces(overrides, moe_block, merge)`` is a ``transform`` for
``export.layered.export_layered``: each traced piece (prologue, a layer, epilogue) is rewritten
with the same graph passes ``quantize_export`` applies to the whole graph (``rewrite_linears``,
``rewrite_embedding``, ``rewrite_moe``), for the units the overrides make int8 (routers stay fp32
by default). ``quantize_streamed(src, out, config, calib_tokens)`` smooths the checkpoint layer by
layer (``stream.smooth_streamed``, identical scales to ``smooth_``), exports it layer by layer with
``Int8Pieces`` and scores the int8 graph on onnxruntime against the streamed fp32 torch model on
calibration rows; ``out`` is an int8 export directory like ``quantize_``'s (``export.json`` with a
``quantization`` section, ``quantize.json`` report).

Why: ``quantize_`` keeps a reference copy of the model, emulates every candidate precision plan on
the whole model and loads the whole fp32 graph to rewrite it; for a checkpoint larger than memory
none of that fits. The rewrite is a per-node graph pass, so per layer it gives the same int8 weights
and activation quantization as on the whole graph.

Differences from ``quantize_`` (recorded in the report): no emulated mixed-precision search (every
unit the overrides allow is int8; a miss of the budget shows in the accuracy gate) and dynamic
activation scales only (``mode="dynamic"``).

Failure modes: ``mode`` static/auto -> ``EdgekitError`` naming the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import EdgekitError


class Int8Pieces:
    """Per-piece int8 rewrite (see module doc), with ``quantize_export``'s choices: 7-bit weights when
    ``reduce_range``, column scales in the kernel, routed experts grouped / QMoE per ``moe_path``."""

    def __init__(self, overrides: dict, moe_path: str = "grouped", moe_block: int = 0, merge: bool = True,
                 reduce_range: bool = True, fold_scales: bool = True):
        self.overrides, self.path, self.block, self.merge = overrides, moe_path, moe_block, merge
        self.wmax, self.fold = (63.0 if reduce_range else 127.0), fold_scales
        self.int8, self.fp32 = [], {}
        self.embedding, self.moe = [], {}

    def __call__(self, key, proto, units: dict[str, str]) -> None:
        from .mixed import resolve_overrides
        from .moe_grouped import GroupedMoEConfig, rewrite_moe_grouped
        from .rewrite import ensure_ms_opset, rewrite_embedding, rewrite_linears, rewrite_moe

        prec = resolve_overrides(list(units), self.overrides)
        int8 = {u for u, p in prec.items() if p == "int8"}
        self.fp32.update({u: "override" for u, p in prec.items() if p == "fp32"})
        umap = {w: u for u, w in units.items()}
        self.int8 += rewrite_linears(proto, umap, int8, None, merge=self.merge, wmax=self.wmax, fold=self.fold)
        emb = "model.embed_tokens"
        if emb in int8 and rewrite_embedding(proto, units[emb]):
            self.embedding.append(emb)
            self.int8.append(emb)
        unit = f"model.layers.{key}.mlp.experts"
        for n in [n for n in proto.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]:
            if unit in int8:
                self.moe[unit] = (rewrite_moe_grouped(proto, n.name, GroupedMoEConfig(wmax=self.wmax, fold=self.fold))
                                  if self.path == "grouped" else rewrite_moe(proto, n.name, self.block))
                self.int8.append(unit)
        ensure_ms_opset(proto)

    def summary(self) -> dict:
        return {"linears_int8": len(self.int8) - len(self.embedding) - len(self.moe),
                "embedding_int8": self.embedding, "moe": self.moe, "weight_max": self.wmax,
                "activation_scales": "dynamic", "static_units": [], "merged_siblings": self.merge, "layered": True}


def quantize_streamed(src, out_dir: str | os.PathLike, config=None, calib_tokens: np.ndarray | None = None,
                      tokenizer_from=None, device: str = "cpu", log=print) -> dict:
    """Smooth + export + int8 of checkpoint ``src`` layer by layer into ``out_dir``; returns the report."""
    from ..export import ExportConfig
    from ..export.layered import export_layered
    from ..lazy import CheckpointReader
    from ..smooth import SmoothConfig
    from ..stream import evaluate_streamed, smooth_streamed
    from . import QuantConfig, _moe_block, _ort_accuracy, choose_moe_path

    cfg = config or QuantConfig()
    if cfg.mode != "dynamic":
        raise EdgekitError(f"streamed quantization uses dynamic activation scales; set quantize mode = \"dynamic\" "
                           f"(got {cfg.mode!r}) or use the in-memory path")
    r = CheckpointReader(src)
    if calib_tokens is None:
        from ..checkpoint import load_tokenizer
        from ..data import load_tokens
        calib_tokens = load_tokens(cfg.calib, load_tokenizer(tokenizer_from or src))
    toks = np.asarray(calib_tokens, dtype=np.int64)[: cfg.calib_max_tokens + 1]
    if len(toks) < 2:
        raise EdgekitError("quantize needs calibration tokens; pass a text file with a few thousand tokens")
    seq = min(cfg.seq_len, r.args.max_position_embeddings, len(toks) - 1)
    report = {"config": asdict(cfg), "streamed": True}
    out = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix=".quantize.", dir=out.parent if out.parent.exists() else None))
    try:
        smoothed = src
        if cfg.smooth:
            scfg = SmoothConfig(search=cfg.alpha is None, alpha=cfg.alpha if cfg.alpha is not None else 0.5,
                                calib_seq_len=seq, calib_max_tokens=cfg.calib_max_tokens)
            smoothed = work / "smoothed"
            report["smoothing"] = smooth_streamed(r, smoothed, toks, scfg, device=device)
            log("quantize: smoothing scales folded layer by layer")
        portable = cfg.export_moe == "portable"
        pieces = Int8Pieces(cfg.overrides, choose_moe_path(cfg, r.args), 0 if portable else _moe_block(cfg, r.args),
                            cfg.merge, cfg.reduce_range)
        export_layered(smoothed, out, ExportConfig(moe=cfg.export_moe, simplify=False), transform=pieces,
                       tokenizer_from=tokenizer_from or getattr(r, "dir", None))
        spec = json.loads((out / "export.json").read_text())
        spec.update(dtype="int8", quantization=pieces.summary())
        (out / "export.json").write_text(json.dumps(spec, indent=2) + "\n")
        from ..data import windows
        rows = windows(toks, seq)
        ort_rows = rows[: max(1, min(len(rows), 16))]
        # the same rows as ort_rows: windows of the first len(ort_rows) * seq + 1 tokens
        a32 = evaluate_streamed(r, toks[: len(ort_rows) * seq + 1], seq_len=seq, device=device).accuracy
        a8, _ = _ort_accuracy(out, ort_rows)
        log(f"quantize: accuracy fp32 (torch, streamed) {a32:.4f} int8 (onnxruntime) {a8:.4f} "
            f"(drop {(a32 - a8) * 100:+.2f} points, budget {cfg.max_drop * 100:.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    absorbed = {f"model.layers.{i}.self_attn.kv_b_proj": "not a quantizable op in the exported graph"
                for i in range(r.args.num_hidden_layers)}
    report.update({
        "int8_units": len(pieces.int8), "fp32_units": {**pieces.fp32, **absorbed}, "sensitivity_top": {},
        "accuracy": {"calib_tokens": int(ort_rows[:, 1:].size), "fp32_torch": a32,
                     "ort": [{"fp32": a32, "int8": a8, "drop": a32 - a8, "fp32_from": "torch (streamed)"}]},
        "mixed_precision": "not searched in streamed mode: every unit the overrides allow is int8",
        "moe_block": pieces.block, "graph": pieces.summary(), "size_bytes": size,
    })
    (out / "quantize.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
