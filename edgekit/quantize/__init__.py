"""Symmetric int8 for onnxruntime CPU with SmoothQuant scaling and accuracy-aware mixed precision.

The steps (each its own function; ``edgekit compress`` runs them as cached stages):
1. ``edgekit.smooth.smooth_``: SmoothQuant scales folded into the norms (fp32 math unchanged);
2. ``edgekit.export.export``: the fp32 graph, once; its ``export.json`` maps module names to nodes;
3. ``mixed.plan_(model, export_dir, QuantConfig(), calib_tokens, max_drop) -> Plan``: which units go
   int8 so next-token accuracy stays within ``max_drop`` of fp32 (torch emulation of the int8
   graph: emulate.py; checked on onnxruntime), static scales, QMoE block (plan.py: ``plan.json``);
4. ``apply.quantize_export(export_dir, out_dir, plan)``: the pure graph pass keyed by unit names
   (rewrite.py), writing ``out_dir`` (same graph I/O as the fp32 export; ``export.json`` gains a
   ``quantization`` section; ``quantize.json`` is the report).
``quantize_(model, out_dir, config, calib_tokens)`` runs 1-4 in a row for one model (the
``edgekit quantize`` command and the library).

Choices per op kind (measured on the 2-core AVX-512-VNNI dev VM, ORT 1.32; benchmarks/quant_bench.py):
- Linears: int8 weights per output channel (zero point 0) x int8 activations with a symmetric
  per-token scale (dynamic; or calibrated constants in ``mode="static"``; ``"auto"`` = static where
  the calibrated range is stable, see ``mixed._static_choice``), on the u8s8 ``MatMulIntegerToFloat``
  kernel with the activation offset by 128. Microbenchmark (8 chained matmuls, us per matmul,
  M=128 / M=1): K256xN640 fp32 843/8.8, quantize_dynamic 342/3.4, this 269-294/4.6,
  MatMulNBits-8 acc4 929/3.8, s8s8 3169/856. MatMulNBits is only fast at M=1, and the graph is
  one for prefill and decode, so it is not used.
- Routed experts: grouped int8 GEMMs (``moe="grouped"``, default: tokens sorted by expert, one u8s8
  GEMM pair per expert with tokens, per-token activation scales; moe_grouped.py), or
  ``com.microsoft::QMoE`` 8-bit per block of K (``moe="block"``) or per row (``moe="row"``, weights
  only). QMoE's CPU kernel dequantizes expert weights to fp32 per call: on the 1.6B V3 shape it was
  ~70% of prefill time (benchmarks/moe_kernels.py, benchmarks/results/).
- 4-bit (``int4``: candidates the planner moves to 4-bit by measured sensitivity within the
  accuracy budget, mixed.plan_int4): linears as ``MatMulNBits`` 4-bit, routed experts as 4-bit
  ``QMoE`` (weights only, block ``int4_block``, or one scale per row with ``int4_moe_rows``:
  onnxruntime 1.30's QMoE runs 4-bit blocks 11x slower than rows for one token, rewrite.py) or
  grouped ``MatMulNBits`` experts; ~0.6 bytes per weight instead of 1.
- Embedding: int8 rows + per-row scale (Gather, Cast, Mul). Routers, norms, RoPE tables and the
  absorbed-attention products stay fp32 (routers overridable); with ``float_weights = "fp16"`` the
  weights of units kept in float and not pinned by an override (absorbed products, reverted units) are stored fp16
  with a Cast to fp32 (fp16.py: half their bytes, fp32 kernels), for targets where download and
  storage size matter (mobile-arm64, web).

Invariants: the output dir appears only when complete; the fp32 logits of the smoothed model
match the original (edgekit.smooth); every unit kept in fp32 is listed with its reason.

Failure modes: a non-export directory, an unknown mode/override value or a budget < 0 raise
``EdgekitError``/``ValueError`` naming the fix.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import scratch_dir
from .apply import quantize_export
from .plan import CACHE_DTYPES, FLOAT_WEIGHTS, Plan

__all__ = ["DEFAULT_OVERRIDES", "MODES", "MOE_PATHS", "Plan", "QuantConfig", "quantize_", "quantize_export"]

MODES = ("dynamic", "static", "auto")
MOE_PATHS = ("auto", "grouped", "block", "row")
DEFAULT_OVERRIDES = {"re:.*mlp\\.gate": "fp32", "_default": "int8"}


@dataclass
class QuantConfig:
    """The ``[quantize]`` recipe table: how the plan is made and how the graph pass writes int8."""
    mode: str = "dynamic"             # activation scales: run-time ("dynamic"), calibrated ("static"), per op ("auto")
    max_drop: float = 0.008           # next-token accuracy budget vs fp32, as a fraction (0.008 = 0.8 points)
    overrides: dict = field(default_factory=lambda: dict(DEFAULT_OVERRIDES))  # unit name or "re:..." -> int8|fp32
    moe: str = "grouped"              # routed experts: "grouped" int8 GEMMs, QMoE "block"/"row", or "auto" (by size)
    grouped_min_expert_params: int = 1_000_000   # "auto": grouped when one expert has at least this many weights
    moe_block: int = 0                # 0: the largest of 128/64/32/16 dividing hidden and expert sizes
    merge: bool = True                # one matmul for linears sharing an input (q_a + kv_a, gate + up)
    expert_scales: str = "dynamic"    # grouped experts' activation scales: per token, or calibrated ("static")
    reduce_range: bool = True         # 7-bit weights: exact u8s8 sums on x86 CPUs without VNNI (AVX2); see rewrite.py
    calib: str = "calib"              # calibration split or text file
    calib_max_tokens: int = 8192
    seq_len: int = 256
    verify_ort: bool = True           # score the int8 graph on onnxruntime; revert more units if over budget
    max_ort_rounds: int = 4
    rank_always: bool = False         # rank sensitivity even when the budget already holds (for the report)
    float_weights: str = "fp32"       # units kept in float: "fp32", or "fp16" storage + Cast (half the bytes; fp16.py)
    int4: list = field(default_factory=list)   # unit names / "re:" patterns that may go 4-bit, least sensitive first
    int4_block: int = 32              # 4-bit weights per scale along K (MatMulNBits / QMoE block_size)
    int4_moe_rows: bool = False       # 4-bit QMoE experts: one scale per row instead of blocks of int4_block
    int4_search: bool = True          # False: every int4 candidate goes 4-bit, whatever it costs (frontier points)
    cache: str = "fp32"               # latent cache I/O: "fp32", or "fp16" (half the cache memory; cache_fp16.py)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize mode={self.mode!r}: use one of {MODES}")
        if self.max_drop < 0:
            raise ValueError(f"quantize max_drop={self.max_drop}: use a fraction >= 0 (0.008 = 0.8 points)")
        if self.expert_scales not in ("dynamic", "static"):
            raise ValueError(f"quantize expert_scales={self.expert_scales!r}: use 'dynamic' or 'static'")
        if self.moe not in MOE_PATHS:
            raise ValueError(f"quantize moe={self.moe!r}: use one of {MOE_PATHS}")
        bad = {k: v for k, v in self.overrides.items() if v not in ("int8", "fp32")}
        if bad:
            raise ValueError(f"quantize overrides {bad}: values must be 'int8' or 'fp32'")
        if self.float_weights not in FLOAT_WEIGHTS:
            raise ValueError(f"quantize float_weights={self.float_weights!r}: use one of {FLOAT_WEIGHTS}")
        if not isinstance(self.int4, list) or not all(isinstance(p, str) for p in self.int4):
            raise ValueError(f"quantize int4={self.int4!r}: use a list of unit names or 're:' patterns")
        if self.int4_block < 16 or self.int4_block & (self.int4_block - 1):
            raise ValueError(f"quantize int4_block={self.int4_block}: use a power of two >= 16")
        if self.cache not in CACHE_DTYPES:
            raise ValueError(f"quantize cache={self.cache!r}: use one of {CACHE_DTYPES}")
        if self.moe_block and (self.moe_block < 16 or self.moe_block & (self.moe_block - 1)):
            raise ValueError(f"quantize moe_block={self.moe_block}: use 0 (auto) or a power of two >= 16")


def quantize_(model, out_dir, config: QuantConfig | None = None, calib_tokens: np.ndarray | None = None,
              tokenizer_from=None, smooth=None, export_config=None, log=print) -> dict:
    """Smooth ``model`` in place (``smooth``: a ``SmoothConfig``; default: searched alphas on the
    calibration rows this config plans on), export it once (``export_config``), plan precision and
    write the int8 export to ``out_dir``. Returns the report (also ``out_dir/quantize.json``)."""
    from ..data import require_tokens
    from ..export import ExportConfig, export
    from ..smooth import SmoothConfig, smooth_
    from .mixed import plan_

    cfg = config or QuantConfig()
    if calib_tokens is None:
        from ..checkpoint import load_tokenizer
        from ..data import load_tokens
        calib_tokens = load_tokens(cfg.calib, load_tokenizer(tokenizer_from))
    toks = np.asarray(calib_tokens, dtype=np.int64)
    require_tokens(toks, min(cfg.seq_len, model.args.max_position_embeddings) + 1, "calibration text for quantization")
    scfg = smooth or SmoothConfig(calib_seq_len=cfg.seq_len, calib_max_tokens=cfg.calib_max_tokens)
    smoothing = smooth_(model, toks, scfg)
    out = Path(out_dir)
    work = scratch_dir(".quantize.", out.parent if out.parent.exists() else None)
    try:
        export(model, work / "fp32", export_config or ExportConfig(), tokenizer_from=tokenizer_from)
        plan = plan_(model, work / "fp32", cfg, toks, log=log)
        plan.report["smoothing"] = smoothing
        return quantize_export(work / "fp32", out, plan)
    finally:
        shutil.rmtree(work, ignore_errors=True)
