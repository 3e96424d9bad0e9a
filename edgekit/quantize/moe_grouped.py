"""Routed experts as grouped int8 GEMMs: one ``com.microsoft::MoE`` node -> tokens sorted by expert,
one u8s8 ``MatMulIntegerToFloat`` pair per expert, run only for experts that received tokens.

What: ``rewrite_moe_grouped(proto, node_name)`` replaces the fp32 MoE node (inputs ``x`` [N, D],
``router_probs`` [N, E], ``fc1`` [E, 2I, D] with interleaved gate/up rows, ``fc2`` [E, D, I];
attributes ``k``, ``normalize_routing_weights``) in place by::

    vals, idx = TopK(router_probs, k)            # the op's own selection, so routing is identical
    w         = Softmax(vals) | Softmax(probs)[idx]
    order     = argsort(idx.flatten())           # token slots grouped by expert
    counts    = bincount(idx.flatten(), E)
    xq, sx    = int8(x) per token                # quantized once per layer, gathered in expert order
    a_e = xq_e @ [G_e | U_e] * [sg_e | su_e]     # per expert: one GEMM (0 rows for an unused expert)
    h   = silu(concat(a_e)[:, :I] * sx) * (concat(a_e)[:, I:] * sx)       # once over all N*k rows
    hq, sh = int8(h) per token
    y_e = hq_e @ D_e * sd_e                      # per expert: one GEMM
    y_sorted = concat(y_e) * sh * w              # one row factor per layer
    y = sum over the k slots of y_sorted[argsort(order)]

That is the default "batched" layout: per expert only its two GEMMs, the elementwise work once per
layer (measured on the 1.6B shape, 16-core host: the per-expert small elementwise nodes cost about
as much kernel time as the expert GEMMs themselves). The MatMulNBits path batches the same way
(its kernel quantizes its rows itself, so between the GEMMs only SwiGLU runs). The "branch" layout
(``layout="branch"``, and always with static scales or ``fold=False``) runs each expert's whole
chain inside one ``If`` that skips experts without tokens; per row both compute the same
operations on the same values, so their results are equal bit for bit (tests/test_moe_grouped.py).

Why (measured, see benchmarks/results/ and benchmarks/moe_kernels.py): onnxruntime's CPU ``QMoE``
kernel with 8-bit weights dequantizes each used expert's weights to fp32 and runs an fp32 GEMM,
at both prefill and decode; on the 1.6B-parameter V3 shape it was ~70% of prefill time. Grouping
the tokens per expert turns each expert into one integer GEMM on MLAS's u8s8 kernels (AVX-512
VNNI / AMX where present) over weights prepacked at session start, and a decoding token touches
only its k experts' int8 weights (no fp32 copy).

Numerics: weights symmetric int8 per output column (zero point 0); activations symmetric int8 per
token (one scale per row: ``max|x| / 127``), fed to the u8s8 kernel as uint8 with zero point 128.
Per-token scales make a row's result independent of the other rows of the call (prefill ==
decode, batched == alone). With ``static_x``/``static_h`` (calibrated max |x| per layer and max |h|
per expert, ``[quantize] expert_scales = "static"``) the scales are constants instead: one
``QuantizeLinear`` each and the scale passed to the kernel (rows stay independent; values beyond
the calibrated range clip). ``routed_scaling_factor`` is already folded into fc2 by the export.

Invariants: the node's output name and the routing are unchanged; every new initializer is named
``{node}.e{e}.*``; the emitted graph uses only opset-17 ops plus ``MatMulIntegerToFloat``.

Failure modes: a MoE node without ``swiglu_fusion=1`` (the only layout the export writes) raises
``ValueError``; the caller keeps the fp32 node in that case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..int8 import EPS, QMAX, per_token_columns, quantize_sym
from .nbits import NBitsConfig, matmul_nbits
from .rewrite import used_names

MS = "com.microsoft"
LAYOUTS = ("batched", "branch")


@dataclass
class GroupedMoEConfig:
    wmax: float = QMAX           # weight range; QMAX_7BIT = 7-bit (reduce_range, exact on x86 CPUs without VNNI)
    fold: bool = True            # column scales as the kernel's per-column b_scale instead of a Mul (faster prefill)
    nbits: NBitsConfig | None = None   # set: each expert GEMM is one MatMulNBits (block scales, int8 compute)
    # calibrated max |input| (static activation scales; None: per token at run time). static_x: the
    # layer's expert input; static_h: per expert, the down projection's input. Need ``fold``.
    static_x: float | None = None
    static_h: tuple[float, ...] | None = None
    # dynamic integer path with fold, and MatMulNBits: "batched" = the elementwise work between the two
    # GEMM stages (integer path: x scale, SwiGLU, h quantization; MatMulNBits: SwiGLU) once over all
    # experts' rows; "branch" = all of it in one If per expert (what static scales and fold=False always use)
    layout: str = "batched"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"grouped layout={self.layout!r}: use one of {LAYOUTS}")


class _Emit:
    """Appends nodes and initializers under a short prefix (``moe.3`` -> ``m3``): names are
    stored once per reference, and a graph has ~25 of them per expert, so they stay short."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits, self.n = prefix, [], [], 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{self.n}"

    def const(self, arr, hint: str) -> str:
        name = f"{self.prefix}.{hint}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def token_quant(em: _Emit, x: str, c: dict) -> tuple[str, str]:
    """Symmetric int8 per row of ``x`` [n, K] -> (uint8 [n, K] offset by 128, the row's max |x| [n, 1]
    floored at qmax * eps): ``x / max|x|`` quantized with scale 1/qmax; the dequantization's 1/qmax
    is in the experts' column scales (as ``rewrite._act_quant``: one node fewer than max|x| / qmax)."""
    amax = em.op("ReduceMax", [em.op("Abs", [x])], "amax", axes=[-1], keepdims=1)
    s = em.op("Max", [amax, c["eps"]], "sx")
    xq = em.op("QuantizeLinear", [em.op("Div", [x, s]), c["inv_qmax"], c["zp"]], "xq")
    return xq, s


def _expert_branch(em: _Emit, e: int, xq: str, sx: str, W1: str, s1: str, W2: str, s2: str,
                   c: dict, fold: bool, static_x: bool = False, sh_static: str | None = None) -> onnx.GraphProto:
    """The then-branch for expert ``e``: rows xq [n, D] (uint8) and their scales sx ([n, 1] per
    token, or the static scalar when ``static_x``) -> (y [n, D] before its per-row factor, and with a
    per-token ``h`` scale, sh [n, 1], that factor's activation scale). The routing weight (and
    ``sh``) are applied once per layer, after the experts' rows are concatenated. A static scale
    goes to the kernel as its ``a_scale``: no Mul, and ``h`` is quantized by one node."""
    sub = _Emit(f"{em.prefix}e{e}")
    a = sub.op("MatMulIntegerToFloat", [xq, W1, sx if static_x else c["one"], s1 if fold else c["one"], c["zp"]],
               "gu", domain=MS)
    if not static_x:
        a = sub.op("Mul", [a, sx]) if fold else sub.op("Mul", [sub.op("Mul", [a, sx]), s1], "gu_f")
    g, u = sub.op("Split", [a, c["split_gu"]], "g_u", n_out=2, axis=-1)
    h = sub.op("Mul", [sub.op("Mul", [g, sub.op("Sigmoid", [g])]), u], "h")
    if sh_static:
        hq, sh = sub.op("QuantizeLinear", [h, sh_static, c["zp"]], "hq"), sh_static
    else:
        hq, sh = token_quant(sub, h, c)
    out = f"{em.prefix}e{e}.y"
    if fold:
        sub.nodes.append(helper.make_node("MatMulIntegerToFloat", [hq, W2, sh if sh_static else c["one"], s2, c["zp"]],
                                          [out], name=out, domain=MS))
    else:
        y = sub.op("MatMulIntegerToFloat", [hq, W2, c["one"], c["one"], c["zp"]], "dn", domain=MS)
        sub.nodes.append(helper.make_node("Mul", [y, s2], [out], name=out))
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    outs += [] if sh_static else [helper.make_tensor_value_info(sh, TensorProto.FLOAT, None)]
    return helper.make_graph(sub.nodes, f"{em.prefix}e{e}.then", [], outs)


def _expert_branch_nbits(em: _Emit, e: int, xs: str, w1: np.ndarray, w2: np.ndarray,
                         c: dict, cfg: NBitsConfig) -> onnx.GraphProto:
    """The then-branch for expert ``e`` on the MatMulNBits path: fp32 rows xs [n, D] -> y [n, D]
    before the routing weight; the kernel quantizes its inputs per row and block itself."""
    sub = _Emit(f"{em.prefix}e{e}")
    add = lambda arr, hint: em.const(arr, f"e{e}.{hint}")                                      # noqa: E731
    a = sub.name("gu")
    sub.nodes.append(matmul_nbits(xs, w1, a, a, add, cfg, "w1"))
    g, u = sub.op("Split", [a, c["split_gu"]], "g_u", n_out=2, axis=-1)
    h = sub.op("Mul", [sub.op("Mul", [g, sub.op("Sigmoid", [g])]), u], "h")
    out = f"{em.prefix}e{e}.y"
    sub.nodes.append(matmul_nbits(h, w2, out, out, add, cfg, "w2"))
    return helper.make_graph(sub.nodes, f"{em.prefix}e{e}.then", [],
                             [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def grouped_nodes(node: onnx.NodeProto, fc1: np.ndarray, fc2: np.ndarray, cfg: GroupedMoEConfig,
                  qmax: float = QMAX, eps: float = EPS) -> tuple[list, list]:
    """Pure core: the nodes and initializers that compute ``node``'s output from int8 experts."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("swiglu_fusion") != 1:
        raise ValueError(f"{node.name}: grouped experts need swiglu_fusion=1 (interleaved gate/up rows)")
    k, normalize = int(attrs["k"]), int(attrs.get("normalize_routing_weights", 0))
    E, two_i, D = fc1.shape
    inter = two_i // 2
    x, probs, out = node.input[0], node.input[1], node.output[0]
    em = _Emit("m" + (node.name or "moe").replace("moe.", ""))
    c = {"split_gu": em.const(np.array([inter, inter], np.int64), "split_gu")}
    if cfg.nbits is None:                       # the MatMulIntegerToFloat path's quantization constants
        c.update(one=em.const(np.array(1.0, np.float32), "one"), zp=em.const(np.array(128, np.uint8), "zp"),
                 inv_qmax=em.const(np.array(1.0 / qmax, np.float32), "inv_qmax"),
                 eps=em.const(np.array(eps * qmax, np.float32), "eps"))
    k_t = em.const(np.array([k], np.int64), "k")
    vals, idx = em.op("TopK", [probs, k_t], "topk", n_out=2, axis=-1, largest=1, sorted=1)   # [N, k]
    if normalize:
        w = em.op("Softmax", [vals], "w", axis=-1)
    else:
        w = em.op("GatherElements", [em.op("Softmax", [probs], "p", axis=-1), idx], "w", axis=1)
    flat = em.op("Reshape", [idx, em.const(np.array([-1], np.int64), "flat")], "slot_expert")      # [N*k]
    n_slots = em.op("Shape", [flat], "n_slots")
    _, order = em.op("TopK", [em.op("Cast", [flat], to=TensorProto.FLOAT), n_slots], "order", n_out=2,
                     axis=0, largest=0, sorted=1)                                                  # slots by expert
    _, inverse = em.op("TopK", [em.op("Cast", [order], to=TensorProto.FLOAT), n_slots], "inverse", n_out=2,
                       axis=0, largest=0, sorted=1)                                                # argsort(order)
    token = em.op("Div", [order, k_t], "token")                                                    # slot -> token
    onehot = em.op("OneHot", [flat, em.const(np.array(E, np.int64), "E"), em.const(np.array([0, 1], np.int64), "oh")],
                   "onehot", axis=-1)                                                              # [N*k, E]
    counts = em.op("ReduceSum", [onehot, em.const(np.array([0], np.int64), "ax0")], "counts", keepdims=0)  # [E]
    nb = cfg.nbits
    if nb is not None and (D % nb.block or inter % nb.block):
        raise ValueError(f"{node.name}: expert sizes {D}, {inter} are not multiples of the MatMulNBits "
                         f"block {nb.block}")
    static = nb is None and cfg.static_x is not None and cfg.static_h is not None
    if static and not cfg.fold:
        raise ValueError(f"{node.name}: static expert activation scales go into the kernel: they need fold=True")
    if static and len(cfg.static_h) != E:
        raise ValueError(f"{node.name}: {len(cfg.static_h)} static expert scales for {E} experts")
    scale = lambda amax, hint: em.const(np.array(max(float(amax), eps) / qmax, np.float32), hint)  # noqa: E731
    if static:
        sx_c = scale(cfg.static_x, "sx")
        xs = em.op("Gather", [em.op("QuantizeLinear", [x, sx_c, c["zp"]], "xq"), token], "xs", axis=0)
        ss_e = [sx_c] * E
    elif nb is None:
        xq, sx = token_quant(em, x, c)
        xs = em.op("Gather", [xq, token], "xs", axis=0)
        ss = em.op("Gather", [sx, token], "ss", axis=0)
        ss_e = None if cfg.fold and cfg.layout == "batched" else em.op("Split", [ss, counts], "ss_e", n_out=E, axis=0)
    else:
        xs = em.op("Gather", [x, token], "xs", axis=0)
        ss_e = [None] * E
    ws = em.op("Gather", [em.op("Reshape", [w, em.const(np.array([-1, 1], np.int64), "col")]), order], "ws",
               axis=0)
    xs_e = em.op("Split", [xs, counts], "xs_e", n_out=E, axis=0)
    if E == 1:
        xs_e = [xs_e]
        ss_e = ss_e if nb is not None or static else [ss_e]
    if nb is not None and cfg.layout == "batched":
        _batched_experts_nbits(em, fc1, fc2, xs_e, ws, inverse, counts, k, c, nb, out)
        return em.nodes, em.inits
    batched = nb is None and not static and cfg.fold and cfg.layout == "batched"
    if batched:
        _batched_experts(em, fc1, fc2, xs_e, ss, ws, inverse, counts, k, c, cfg, out, qmax)
        return em.nodes, em.inits
    dyn_h = nb is None and not static             # the branch returns its per-token h scale too
    has = em.op("Greater", [counts, em.const(np.array(0, np.int64), "zero")], "has")
    empties = [np.zeros((0, D), np.float32)] + ([np.zeros((0, 1), np.float32)] if dyn_h else [])
    ys, shs = [], []
    for e in range(E):
        w1 = np.concatenate([fc1[e, 0::2], fc1[e, 1::2]], axis=0).T                               # [D, 2I]
        if nb is not None:
            then = _expert_branch_nbits(em, e, xs_e[e], w1, fc2[e].T, c, nb)
        else:
            q1, s1 = quantize_sym(w1, axis=0, qmax=cfg.wmax)                                      # per column
            q2, s2 = quantize_sym(fc2[e].T, axis=0, qmax=cfg.wmax)                                # [I, D]
            if not static:                     # per-token scales are max |x|: the 1/qmax goes here
                s1, s2 = per_token_columns(s1, qmax), per_token_columns(s2, qmax)
            W1, S1 = em.const(q1, f"e{e}.w1"), em.const(s1, f"e{e}.s1")
            W2, S2 = em.const(q2, f"e{e}.w2"), em.const(s2, f"e{e}.s2")
            then = _expert_branch(em, e, xs_e[e], ss_e[e], W1, S1, W2, S2, c, cfg.fold, static_x=static,
                                  sh_static=scale(cfg.static_h[e], f"e{e}.sh") if static else None)
        # an If per expert: one without tokens costs a Gather and an If, not a GEMM chain over 0 rows
        cond = em.op("Gather", [has, em.const(np.array(e, np.int64), f"e{e}.i")], f"e{e}.has", axis=0)
        names = [f"{em.prefix}e{e}.{j}" for j in range(len(empties))]
        els = helper.make_graph([helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v, n), name=n)
                                 for n, v in zip(names, empties)], f"{em.prefix}e{e}.else", [],
                                [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names])
        outs = em.op("If", [cond], f"e{e}.y", n_out=len(empties), then_branch=then, else_branch=els)
        ys.append(outs[0] if dyn_h else outs)
        shs += [outs[1]] if dyn_h else []
    # one per-row factor for all experts' rows: routing weight (x the down GEMM's per-token scale)
    factor = em.op("Mul", [em.op("Concat", shs, "sh", axis=0), ws], "row_factor") if dyn_h else ws
    _combine(em, ys, factor, inverse, k, D, out)
    return em.nodes, em.inits


def _combine(em: _Emit, ys: list[str], factor: str, inverse: str, k: int, D: int, out: str) -> None:
    """The experts' rows (in expert order) times one factor per row, back in slot order and summed
    over each token's k slots into ``out`` [N, D]."""
    y_sorted = em.op("Mul", [em.op("Concat", ys, "y_cat", axis=0), factor], "y_sorted")           # [N*k, D]
    y_slots = em.op("Gather", [y_sorted, inverse], "y_slots", axis=0)                               # [N*k, D]
    y3 = em.op("Reshape", [y_slots, em.const(np.array([-1, k, D], np.int64), "nkd")], "y3")
    em.nodes.append(helper.make_node("ReduceSum", [y3, em.const(np.array([1], np.int64), "ax1")], [out],
                                     keepdims=0, name=f"{em.prefix}/sum_slots"))


def _batched_experts(em: _Emit, fc1, fc2, xs_e, ss, ws, inverse, counts, k: int, c: dict,
                     cfg: GroupedMoEConfig, out: str, qmax: float = QMAX) -> None:
    """The dynamic integer path (column scales folded into the kernel) with its elementwise work
    batched: per expert only the two GEMMs
    (``MatMulIntegerToFloat`` over that expert's rows, none for an expert without tokens: the kernel
    takes 0 rows); between them, over all N*k rows at once: the per-token x scale, SwiGLU and the
    per-token quantization of h. Per row the same operations on the same values as the per-expert
    branches ("branch" layout), so the same results, bit for bit; ~14 fewer nodes per expert, and no
    If (measured on the 1.6B shape: small per-expert elementwise nodes cost as much as the GEMMs)."""
    E, two_i, D = fc1.shape                    # xs_e: one name per expert (the caller lists a single one)
    gu = []
    s2s = []
    for e in range(E):
        w1 = np.concatenate([fc1[e, 0::2], fc1[e, 1::2]], axis=0).T                               # [D, 2I]
        q1, s1 = quantize_sym(w1, axis=0, qmax=cfg.wmax)                                          # per column
        q2, s2 = quantize_sym(fc2[e].T, axis=0, qmax=cfg.wmax)                                    # [I, D]
        s1, s2 = per_token_columns(s1, qmax), per_token_columns(s2, qmax)                    # token_quant
        W1, S1 = em.const(q1, f"e{e}.w1"), em.const(s1, f"e{e}.s1")
        s2s.append((em.const(q2, f"e{e}.w2"), em.const(s2, f"e{e}.s2")))
        gu.append(em.op("MatMulIntegerToFloat", [xs_e[e], W1, c["one"], S1, c["zp"]], f"e{e}.gu", domain=MS))
    a = em.op("Mul", [em.op("Concat", gu, "gu_cat", axis=0), ss], "gu")                            # [N*k, 2I]
    g, u = em.op("Split", [a, c["split_gu"]], "g_u", n_out=2, axis=-1)
    h = em.op("Mul", [em.op("Mul", [g, em.op("Sigmoid", [g])]), u], "h")                           # [N*k, I]
    hq, sh = token_quant(em, h, c)
    hq_e = em.op("Split", [hq, counts], "hq_e", n_out=E, axis=0)
    hq_e = [hq_e] if E == 1 else hq_e
    ys = []
    for e, (W2, S2) in enumerate(s2s):
        ys.append(em.op("MatMulIntegerToFloat", [hq_e[e], W2, c["one"], S2, c["zp"]], f"e{e}.y", domain=MS))
    _combine(em, ys, em.op("Mul", [sh, ws], "row_factor"), inverse, k, D, out)


def _batched_experts_nbits(em: _Emit, fc1, fc2, xs_e, ws, inverse, counts, k: int, c: dict, nb: NBitsConfig,
                           out: str) -> None:
    """The MatMulNBits path, batched like ``_batched_experts``: per expert only its two
    ``MatMulNBits`` (fp32 rows in; the kernel quantizes them per row and block itself), SwiGLU once
    over all N*k rows between them. Per row the same operations as the per-expert branches."""
    E, _, D = fc1.shape
    add = lambda arr, hint: em.const(arr, hint)                                                 # noqa: E731
    gu, w2s = [], []
    for e in range(E):
        w1 = np.concatenate([fc1[e, 0::2], fc1[e, 1::2]], axis=0).T                               # [D, 2I]
        a = em.name("gu")
        em.nodes.append(matmul_nbits(xs_e[e], w1, a, a, add, nb, f"e{e}.w1"))
        gu.append(a)
        w2s.append(fc2[e].T)                                                                      # [I, D]
    g, u = em.op("Split", [em.op("Concat", gu, "gu_cat", axis=0), c["split_gu"]], "g_u", n_out=2, axis=-1)
    h = em.op("Mul", [em.op("Mul", [g, em.op("Sigmoid", [g])]), u], "h")                           # [N*k, I]
    h_e = em.op("Split", [h, counts], "h_e", n_out=E, axis=0)
    h_e = [h_e] if E == 1 else h_e
    ys = []
    for e, w2 in enumerate(w2s):
        y = em.name("y")
        em.nodes.append(matmul_nbits(h_e[e], w2, y, y, add, nb, f"e{e}.w2"))
        ys.append(y)
    _combine(em, ys, ws, inverse, k, D, out)


def rewrite_moe_grouped(proto: onnx.ModelProto, node_name: str, cfg: GroupedMoEConfig | None = None,
                        base_dir: str = "") -> str:
    """In place: replace MoE node ``node_name`` by grouped int8 experts. Returns the path's name.
    ``base_dir``: where expert weights kept as external data live."""
    cfg = cfg or GroupedMoEConfig()
    g = proto.graph
    node = next(n for n in g.node if n.name == node_name)
    inits = {t.name: t for t in g.initializer}
    fc1, fc2 = (numpy_helper.to_array(inits[node.input[k]], base_dir) for k in (2, 4))
    nodes, new_inits = grouped_nodes(node, fc1, fc2, cfg)
    i = list(g.node).index(node)
    g.node.remove(node)
    for j, n in enumerate(nodes):
        g.node.insert(i + j, n)
    g.initializer.extend(new_inits)
    used = used_names(g)
    keep = [t for t in g.initializer if t.name in used or t.name not in (node.input[2], node.input[4])]
    del g.initializer[:]
    g.initializer.extend(keep)
    return "grouped"
