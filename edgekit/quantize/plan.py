"""The int8 plan: what the precision planning step decided, and the only input of the graph pass
besides the fp32 export.

What: ``Plan`` names units by module (the names ``export.json``'s ``units`` uses): ``int8`` (rewrite
these), ``fp32`` (unit -> why it stays fp32), ``static_scales`` (unit -> calibrated activation max;
absent units quantize activations per token), ``moe_path`` (routed experts: "grouped" int8 GEMMs,
QMoE "row"/"block", or "portable": the portable export's If/Loop experts, int8 per column),
``moe_block`` (QMoE weights per block of K; 0: per row), ``wmax`` (weight range: 127, or 63 =
7-bit, reduce_range), ``fold`` (column scales inside the kernel), ``merge`` (one matmul for int8
linears sharing an input), ``kernel`` ("integer": per-token int8 into ``MatMulIntegerToFloat``;
"nbits8"/"nbits4": ``MatMulNBits``, block scales of ``nbits_block``) and ``float_weights`` (how
the units kept in float are stored: "fp32", or "fp16" with a Cast to fp32 in the graph, fp16.py;
units in ``pinned_fp32``, those the recipe's overrides put in fp32, keep fp32 storage: routers,
where fp16 rounding flips expert choices).
``int4`` (a subset of ``int8``: the quantized units whose weights are stored 4-bit, in blocks of
``int4_block`` along K: linears as ``MatMulNBits`` 4-bit, routed experts as 4-bit ``QMoE`` or
grouped ``MatMulNBits`` experts; ``sensitivity_int4``: the KL each candidate measured alone in
4-bit, the order the planner chose them in).
What the planning measured rides along in ``sensitivity``, ``steps`` and ``report``.
``plan.save(dir)`` / ``Plan.load(dir)`` round-trip it through ``plan.json``.

Who writes it: ``edgekit.quantize.mixed.plan_`` (accuracy-aware, on the smoothed model + its
export). Who reads it: ``edgekit.quantize.apply.quantize_export``. No torch, no onnx here.

Invariants: ``int8`` and ``fp32`` are disjoint, ``int4`` is within ``int8``; JSON keeps sets sorted
so equal plans write equal files (the stage cache keys on them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..int8 import QMAX_7BIT

PLAN_FILE = "plan.json"
MOE_PATHS = ("grouped", "row", "block", "portable")     # "portable": set by planning for a portable export
KERNELS = ("integer", "nbits8", "nbits4")   # int8 linears/experts: MatMulIntegerToFloat, or MatMulNBits 8/4-bit
FLOAT_WEIGHTS = ("fp32", "fp16")            # storage of the weights of units kept in float (fp16.py)
CACHE_DTYPES = ("fp32", "fp16")             # the latent cache's element type (cache_fp16.py)


@dataclass
class Plan:
    int8: set[str]
    fp32: dict[str, str] = field(default_factory=dict)           # unit -> why it stays fp32
    static_scales: dict[str, float] = field(default_factory=dict)  # unit -> calibrated max |x|
    moe_path: str = "grouped"                                    # "grouped", "row", "block" or "portable"
    moe_block: int = 0                                           # QMoE: 0 per-row weights, else block along K
    wmax: float = QMAX_7BIT                                      # weight range: 7-bit (reduce_range) or QMAX
    fold: bool = True                                            # column scales as the kernel's b_scale
    merge: bool = True                                           # one matmul for int8 linears sharing an input
    expert_scales: dict[str, list] = field(default_factory=dict)  # MoE unit -> [x amax, [h amax per expert]]
    kernel: str = "integer"                                      # "integer": MatMulIntegerToFloat; "nbits8"/"nbits4"
    nbits_block: int = 32                                        # MatMulNBits block along K
    float_weights: str = "fp32"                                  # units kept in float: stored fp32 or fp16
    cache: str = "fp32"                                          # latent cache I/O: fp32, or fp16 (cache_fp16.py)
    moe_layout: str = "batched"                                  # grouped experts: "batched" or "branch" (If each)
    pinned_fp32: set[str] = field(default_factory=set)           # overridden to fp32: fp32 storage too
    sensitivity: dict[str, float] = field(default_factory=dict)  # unit -> KL when alone int8
    accuracy_fp32: float = 0.0                                   # on the calibration rows (emulation)
    accuracy_int8: float = 0.0
    steps: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)                   # what planning measured (quantize.json)
    int4: set[str] = field(default_factory=set)                  # of the int8 units: weights stored 4-bit
    int4_block: int = 32                                         # 4-bit weights per scale along K
    int4_moe_rows: bool = False                                  # 4-bit QMoE experts: one scale per row
    sensitivity_int4: dict[str, float] = field(default_factory=dict)  # candidate -> KL when alone 4-bit

    def __post_init__(self):
        self.int8 = set(self.int8)
        self.pinned_fp32 = set(self.pinned_fp32)
        self.int4 = set(self.int4)
        if self.int4 - self.int8:
            raise ValueError(f"plan lists {sorted(self.int4 - self.int8)[0]} as int4 but not among the quantized units")
        both = self.int8 & set(self.fp32)
        if both:
            raise ValueError(f"plan lists {sorted(both)[0]} as both int8 and fp32")
        if self.kernel not in KERNELS:
            raise ValueError(f"plan kernel={self.kernel!r}: use one of {KERNELS}")
        if self.float_weights not in FLOAT_WEIGHTS:
            raise ValueError(f"plan float_weights={self.float_weights!r}: use one of {FLOAT_WEIGHTS}")
        if self.moe_layout not in ("batched", "branch"):
            raise ValueError(f"plan moe_layout={self.moe_layout!r}: use 'batched' or 'branch'")
        if self.cache not in CACHE_DTYPES:
            raise ValueError(f"plan cache={self.cache!r}: use one of {CACHE_DTYPES}")
        if self.moe_path not in MOE_PATHS:
            raise ValueError(f"plan moe_path={self.moe_path!r}: use one of {MOE_PATHS}")

    def precision(self, unit: str) -> str:
        """"int4", "int8" or "fp32": how the graph pass writes ``unit``."""
        return "int4" if unit in self.int4 else "int8" if unit in self.int8 else "fp32"

    @property
    def drop(self) -> float:
        return self.accuracy_fp32 - self.accuracy_int8

    def to_dict(self) -> dict:
        return {**asdict(self), "int8": sorted(self.int8), "pinned_fp32": sorted(self.pinned_fp32),
                "int4": sorted(self.int4)}

    def save(self, out_dir: str | Path) -> Path:
        f = Path(out_dir) / PLAN_FILE
        f.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=float) + "\n")
        return f

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        return cls(**json.loads((p / PLAN_FILE if p.is_dir() else p).read_text()))
