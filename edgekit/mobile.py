"""The mobile model format: the ``.ort`` model, the reduced-operator config and the operator list.

What: ``prepare_bundle(bundle_dir, target) -> dict`` (called once from the bundle step) lists the
operators of the bundle's graph (subgraphs included) by domain, checks them against the target's
operator profile, and for ``format = "ort"`` targets runs onnxruntime's own converter
(``onnxruntime.tools.convert_onnx_models_to_ort``, the Python API behind
``python -m onnxruntime.tools.convert_onnx_models_to_ort``) to write ``model.ort`` and
``required_operators.config`` (the ``--include_ops_by_config`` input of onnxruntime's
``build.py --minimal_build`` for a custom reduced-size mobile build). The returned dict goes into
``manifest.json``.

Why this operator profile (``ops = "mobile"``): onnxruntime's standard phone packages today
(``onnxruntime-android``, the ``onnxruntime-c``/``onnxruntime-objc`` pods) are full builds, but the
size-reduced package onnxruntime shipped for phones through 1.18 (``onnxruntime-mobile``) and the
default custom minimal build carry only the operator set of
``tools/ci_build/github/android/mobile_package.required_operators.config``: standard ONNX ops plus
these ``com.microsoft`` ops: BiasGelu, DynamicQuantizeMatMul, FusedConv, FusedGemm, FusedMatMul,
Gelu, MatMulIntegerToFloat, NhwcMaxPool, QLinearAdd, QLinearAveragePool, QLinearConv,
QLinearGlobalAveragePool, QLinearLeakyRelu, QLinearMul, QLinearSigmoid, SkipLayerNormalization.
``MoE``/``QMoE`` are not in it (they are CPU contrib kernels of recent full builds only), so the
mobile recipe exports routed experts on the portable path (``If``/``Loop`` over standard ops, int8
weights: edgekit/quantize/portable.py) and keeps the int8 linears on ``MatMulIntegerToFloat``,
which is in it. The profile therefore admits every standard ONNX op (a custom build compiles those
its config names) and only the contrib ops above; a graph using anything else is refused (one line
naming the operators and the fix). Standard ops the old prebuilt package lacks (v3-nano's router
uses GatherElements/ScatterElements) are listed in the manifest.

Invariants: the ``.ort`` model computes what ``model.onnx`` computes (runtime_tests checks the
logits on the device); the config lists exactly the operators the ``.ort`` model needs.

Failure modes: operators outside the profile, or a converter failure, raise ``EdgekitError``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgekitError

ORT_FILE, OPS_CONFIG = "model.ort", "required_operators.config"
MS = "com.microsoft"

# operator names (any opset) of onnxruntime's reduced mobile package, from the onnxruntime config named above
MOBILE_ONNX_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool Cast Ceil Clip Concat ConstantOfShape Conv ConvTranspose Cos CumSum
DepthToSpace DequantizeLinear Div DynamicQuantizeLinear Elu Equal Erf Exp Expand Flatten Floor Gather GatherND
Gemm GlobalAveragePool Greater GreaterOrEqual Identity If InstanceNormalization LRN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop MatMul MatMulInteger Max MaxPool Mean Min Mul Neg NonMaxSuppression NonZero
Not Or PRelu Pad Pow QLinearConv QLinearMatMul QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum Relu Reshape Resize ReverseSequence Round Scan ScatterND Shape Sigmoid Sin Size Slice
Softmax SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh ThresholdedRelu Tile TopK Transpose Unique Unsqueeze Where
""".split())
MOBILE_MS_OPS = frozenset("""
BiasGelu DynamicQuantizeMatMul FusedConv FusedGemm FusedMatMul Gelu MatMulIntegerToFloat NhwcMaxPool QLinearAdd
QLinearAveragePool QLinearConv QLinearGlobalAveragePool QLinearLeakyRelu QLinearMul QLinearSigmoid
SkipLayerNormalization
""".split())


def graph_operators(proto) -> dict[str, list[str]]:
    """{domain ("ai.onnx" for the default one): sorted op types} over the graph and its subgraphs."""
    import onnx

    found: dict[str, set[str]] = {}

    def walk(g):
        for n in g.node:
            found.setdefault(n.domain or "ai.onnx", set()).add(n.op_type)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub)

    walk(proto.graph)
    return {d: sorted(v) for d, v in sorted(found.items())}


def outside_profile(ops: dict[str, list[str]], profile: str) -> list[str]:
    """Operators (``domain:Op``) that the ``profile``'s runtime build does not have. ``mobile``: any
    standard ONNX op (a custom build includes those the config names) and the mobile package's
    ``com.microsoft`` ops; nothing from other domains."""
    if profile != "mobile":
        return []
    return [f"{d}:{o}" for d, names in ops.items() for o in names
            if d != "ai.onnx" and not (d == MS and o in MOBILE_MS_OPS)]


def not_in_mobile_package(ops: dict[str, list[str]]) -> list[str]:
    """Standard ops missing from the prebuilt reduced package's list (a custom build from the config
    includes them; ``Constant`` becomes an initializer at load and needs no kernel)."""
    return [o for o in ops.get("ai.onnx", []) if o not in MOBILE_ONNX_OPS and o != "Constant"]


def convert_to_ort(onnx_path: Path, out_dir: Path) -> dict:
    """onnxruntime's converter: ``model.ort`` + ``required_operators.config`` in ``out_dir``."""
    import shutil
    import tempfile

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="edgekit-ort-") as work:
        w = Path(work)
        shutil.copy(onnx_path, w / "model.onnx")
        try:
            convert_onnx_models_to_ort(w / "model.onnx", output_dir=w / "out",
                                       optimization_styles=[OptimizationStyle.Fixed], target_platform="arm")
        except Exception as e:  # the converter raises plain Exceptions
            raise EdgekitError(f"onnxruntime could not convert {onnx_path.name} to the .ort format "
                               f"({str(e).splitlines()[0][:200]}); check the onnxruntime install") from None
        ort_files = list((w / "out").glob("*.ort"))
        configs = list((w / "out").glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise EdgekitError(f"onnxruntime's converter wrote {[p.name for p in (w / 'out').iterdir()]}; "
                               "expected one .ort model and one operator config")
        shutil.move(str(ort_files[0]), out_dir / ORT_FILE)
        shutil.move(str(configs[0]), out_dir / OPS_CONFIG)
    return {"ort_model": ORT_FILE, "operator_config": OPS_CONFIG,
            "ort_converter": "onnxruntime.tools.convert_onnx_models_to_ort (optimization style Fixed, "
                             "target platform arm)"}


def prepare_bundle(d: Path, target) -> dict:
    """Operator list (+ profile check) and, for ``format = "ort"``, the .ort model and its operator config."""
    import onnx

    spec = json.loads((d / "export.json").read_text())
    proto = onnx.load(str(d / spec["graph"]), load_external_data=False)
    ops = graph_operators(proto)
    bad = outside_profile(ops, target.ops)
    if bad:
        raise EdgekitError(f"target {target.name} (ops={target.ops}) cannot run {', '.join(bad)}; "
                           "set [export] moe = \"portable\" in the recipe")
    out = {"operators": ops, "operator_profile": target.ops}
    if target.ops == "mobile":
        out["not_in_prebuilt_reduced_mobile_package"] = not_in_mobile_package(ops)
    if target.format == "ort":
        out.update(convert_to_ort(d / spec["graph"], d))
        out["ort_operators"] = _config_ops((d / OPS_CONFIG).read_text())
    return out


def _config_ops(text: str) -> dict[str, list[str]]:
    """Parse onnxruntime's required-operators config (``domain;opset;Op1,Op2``) into {domain: ops}."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("!"):
            continue
        domain, _opset, names = line.split(";", 2)
        out.setdefault(domain, set()).update(n.strip() for n in names.split(",") if n.strip())
    return {k: sorted(v) for k, v in sorted(out.items())}
