"""fp16 storage for the weights the plan keeps in float: half the bytes, fp32 math.

What: ``store_fp16_(proto, names) -> dict`` rewrites the model in place: every named fp32
initializer becomes an fp16 initializer ``<name>.f16`` and one ``Cast(to=FLOAT)`` node at the top of
the main graph produces the original name, so every reader (a ``MatMul``, the contrib ``MoE`` node,
the portable experts' ``If``/``Loop`` subgraphs, which read outer-scope names) sees the fp32 tensor it
read before, rounded to fp16. ``to_fp16(w)`` is the pure core (round to nearest fp16; ``None`` when a
value does not fit fp16's range). ``quantize_export`` calls it for the units a plan with
``float_weights = "fp16"`` keeps in float (the absorbed attention products, any unit the planner
reverted; not the units the recipe's overrides pin to fp32, such as the routers), after the int8
rewrite. Measured on v3-nano (benchmarks/fp16_weights.py): fp16 router weights flip the top-1 token
on 1.4% of eval tokens, as much as all of int8 does, so routers stay pinned; the absorbed products
(from bf16 checkpoint weights) round exactly.

Why a Cast in the graph and not fp16 kernels: onnxruntime's CPU ``MatMul``/``MoE`` kernels are fp32
(fp16 GEMMs exist only for some arm64 builds), the contrib ``MoE`` needs every input in one type, and
a ``Cast`` of an initializer is a standard op every runtime has (the mobile reduced-operator set,
onnxruntime-web). onnxruntime folds the Cast of a constant at session load (constant folding), so the
file and the download are half size and the arithmetic is the fp32 kernels' on fp16-rounded weights.

Invariants: graph inputs/outputs are unchanged; names not given, not fp32 or also graph inputs are
left alone; nodes stay topologically sorted (the casts read only initializers and come first).

Failure modes: a weight with a value beyond fp16's range (|w| > 65504) or a non-finite value stays
fp32 and is listed under ``kept_fp32`` in the returned summary (never silently saturated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Fp16Config:
    suffix: str = ".f16"           # name of the fp16 initializer: <name><suffix>


def to_fp16(w: np.ndarray) -> np.ndarray | None:
    """``w`` rounded to fp16 (nearest even), or ``None`` when it holds a value fp16 cannot represent."""
    if not np.isfinite(w).all() or (w.size and float(np.abs(w).max()) > F16_MAX):
        return None
    return w.astype(np.float16)


def store_fp16_(proto: onnx.ModelProto, names: list[str], config: Fp16Config | None = None,
                base_dir: str = "") -> dict:
    """fp16 storage + a Cast to fp32 for the initializers ``names`` (see module doc), in place.
    ``base_dir``: where initializers kept as external data live.
    Returns {"initializers": converted count, "bytes_fp32": their fp32 bytes, "bytes_fp16": their
    fp16 bytes, "kept_fp32": names left fp32 because fp16 cannot hold them}."""
    cfg = config or Fp16Config()
    g = proto.graph
    inputs = {i.name for i in g.input}
    wanted = set(names) - inputs
    casts, keep, kept = [], [], []
    b32 = b16 = 0
    for t in g.initializer:
        if t.name not in wanted or t.data_type != TensorProto.FLOAT:
            keep.append(t)
            continue
        w = numpy_helper.to_array(t, base_dir)
        h = to_fp16(w)
        if h is None:
            keep.append(t)
            kept.append(t.name)
            continue
        keep.append(numpy_helper.from_array(h, t.name + cfg.suffix))
        casts.append(helper.make_node("Cast", [t.name + cfg.suffix], [t.name], to=TensorProto.FLOAT,
                                      name=f"f16:{t.name}:cast"))
        b32, b16 = b32 + w.nbytes, b16 + h.nbytes
    del g.initializer[:]
    g.initializer.extend(keep)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(casts + rest)
    return {"initializers": len(casts), "bytes_fp32": b32, "bytes_fp16": b16, "kept_fp32": sorted(kept)}
