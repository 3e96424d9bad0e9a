"""ONNX graph rewrite: fp32 linears, embeddings and MoE nodes -> symmetric int8 onnxruntime CPU ops.

What: ``quantize_graph(proto, plan, static_scales)`` rewrites in place
- every ``MatMul`` whose B is a 2-D fp32 initializer (a ``Linear``) and whose unit is in
  ``plan.int8`` -> ``com.microsoft::MatMulIntegerToFloat`` on symmetric int8 weights (per output
  channel, zero point 0) and symmetric int8 activations; consumers of the same activation share
  one quantization and, with ``merge=True``, one matmul over their concatenated weights + ``Split``;
- ``Gather`` of an fp32 [V, D] embedding initializer -> ``Gather`` of int8 rows + per-row scale;
- ``com.microsoft::MoE`` nodes -> ``com.microsoft::QMoE`` with 8-bit weights: per row (weights
  only; exact against the dequantized weights) or per block along K (int8 activations, faster).

Why these ops (measured on the 2-core AVX-512-VNNI dev VM, onnxruntime 1.32; see
benchmarks/quant_bench.py and the module notes in ``edgekit/quantize/__init__.py``):
- symmetric int8 activations are fed to the u8s8 kernel as ``uint8`` with zero point 128 (the same
  integers shifted by 128; MLAS removes the offset with row sums). Real ``int8`` activations
  (s8s8) ran 10-400x slower than fp32 on this CPU; ``MatMulNBits`` 8-bit with accuracy_level 4 is
  fast for one token but as slow as fp32 for 32-128 tokens, and one graph serves both;
- the activation scale is dynamic (``max|x| / 127`` per token, a few small ops shared by all
  consumers of that activation, applied by a ``Mul`` after the matmul) or static (calibrated
  constant, ``mode="static"``, passed to the kernel);
- x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) run u8s8 through ``VPMADDUBSW``, whose int16
  sum of two u8 x s8 products saturates once both exceed ~181 x 90: 7-bit weights (``wmax`` 63,
  onnxruntime's ``reduce_range``) keep every pair sum exact on every x86 CPU (measured on the AVX2
  dev VM: full-range weights gave wrong sums on 70-100% of outputs of a random u8 x s8 product);
- per-channel weight scales are applied by a ``Mul`` after the matmul: ``MatMulIntegerToFloat``
  with a per-column ``b_scale`` ran ~10x slower for one token at N = 4096.

Invariants: graph inputs/outputs (names, dtypes, shapes) are unchanged; nodes keep a topological
order; units not in ``plan.int8`` keep their fp32 MatMul untouched.

Failure modes: a MoE node whose sizes don't divide the requested block size falls back to per-row
weights (noted in the returned log); unknown op layouts are left in fp32 and noted.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..int8 import EPS, QMAX, per_token_columns, quantize_blocks, quantize_sym
from .nbits import NBitsConfig, matmul_nbits

MS = "com.microsoft"


# ---------------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------------
def used_names(g: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``g`` reads, including nodes of its subgraphs (If/Loop bodies read
    outer-scope initializers by name)."""
    out = set()
    for n in g.node:
        out.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out |= used_names(sub)
    return out


class _Graph:
    def __init__(self, proto: onnx.ModelProto, base_dir: str = ""):
        self.g, self.base_dir = proto.graph, base_dir
        self.inits = {i.name: i for i in self.g.initializer}
        self.consumers = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self._n = 0
        # names already in the graph: a second pass over the same graph (8-bit, then 4-bit linears)
        # must not reuse a name an earlier pass gave
        self.taken = set(self.inits) | {o for n in self.g.node for o in n.output} | {n.name for n in self.g.node}

    def _unique(self, fmt: str) -> str:
        while True:
            self._n += 1
            name = fmt.format(self._n)
            if name not in self.taken:
                self.taken.add(name)
                return name

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return numpy_helper.to_array(t, self.base_dir) if t is not None else None

    def add_init(self, arr: np.ndarray, hint: str) -> str:
        name = self._unique(f"q8.{hint}.{{}}")
        t = numpy_helper.from_array(arr, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def fresh(self, hint: str) -> str:
        return self._unique(f"q8/{hint}/{{}}")

    def node_name(self, tag: str, op: str) -> str:
        """``q8:{tag}:{op}/{n}``: read by the profile report to attribute time to layer kinds."""
        return self._unique(f"q8:{tag}:{op}/{{}}")

    def drop_unused_inits(self) -> None:
        used = used_names(self.g) | {o.name for o in self.g.output}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


def linear_nodes(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(MatMul node, weight initializer name) for every MatMul with a 2-D fp32 constant B."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in inits:
            t = inits[n.input[1]]
            if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
                out.append((n, n.input[1]))
    return out


def unit_tag(unit: str) -> str:
    """Short profile tag of a unit: ``model.layers.3.self_attn.q_a_proj`` -> ``3.attn``,
    ``...mlp.shared_experts.up_proj`` -> ``3.shared``, ``...mlp.down_proj`` -> ``0.mlp``, ``lm_head``."""
    parts = unit.split(".")
    if "layers" not in parts:
        return parts[-1]
    layer = parts[parts.index("layers") + 1]
    kind = "shared" if "shared_experts" in parts else "attn" if "self_attn" in parts else "mlp"
    return f"{layer}.{kind}"


def _act_quant(G: _Graph, x: str, static_scale: float | None, nodes: list,
               hint: str = "act") -> tuple[str, str, str, bool]:
    """Emit the symmetric int8 quantization of activation ``x``; returns (xq, scale, zero_point, per_row).

    Dynamic: one scale per token (row of the last axis, ``max|x| / 127``) so a row's result never
    depends on the other rows of the call: prefill equals decode, a batched row equals the row alone.
    The returned per-row "scale" is then the row's max |x| (floored at 127 * EPS): x / max|x| is
    quantized with the constant scale 1/127, and the 1/127 of the dequantization goes into the
    column scales (``_int8_matmul``), one node per activation fewer than computing max|x| / 127.
    Static: the calibrated constant (one scalar)."""
    zp = G.add_init(np.array(128, np.uint8), "zp")
    if static_scale is not None:
        s = G.add_init(np.array(max(static_scale, EPS) / QMAX, np.float32), "ascale")
        xq = G.fresh("xq")
        nodes.append(helper.make_node("QuantizeLinear", [x, s, zp], [xq], name=G.node_name(hint, "quant")))
        return xq, s, zp, False
    a, m, s, xs = G.fresh("abs"), G.fresh("amax"), G.fresh("ascale"), G.fresh("xs")
    inv = G.add_init(np.array(1.0 / QMAX, np.float32), "inv127")
    floor = G.add_init(np.array(EPS * QMAX, np.float32), "eps")
    xq = G.fresh("xq")
    nm = lambda op: G.node_name(hint, f"quant.{op}")                      # noqa: E731
    nodes += [helper.make_node("Abs", [x], [a], name=nm("abs")),
              helper.make_node("ReduceMax", [a], [m], axes=[-1], keepdims=1, name=nm("amax")),  # [..., 1] per token
              helper.make_node("Max", [m, floor], [s], name=nm("floor")),
              helper.make_node("Div", [x, s], [xs], name=nm("div")),                  # in [-1, 1]
              helper.make_node("QuantizeLinear", [xs, inv, zp], [xq], name=nm("q"))]  # round(127 x / max|x|)
    return xq, s, zp, True


def _int8_matmul(G: _Graph, xq: str, s: str, zp: str, per_row: bool, w: np.ndarray, out: str, hint: str,
                 nodes: list, wmax: float = QMAX, fold: bool = False):
    """out = (xq - 128) @ Wq * s * col_scale, W [K, N] quantized per output column; ``s`` is a scalar
    (passed to the kernel) or per row [..., 1] (the row's max |x|, applied after it; the column
    scales then carry the activation's 1/127, see ``_act_quant``). ``fold``: the column scales go
    to the kernel as its per-column ``b_scale`` instead of a ``Mul`` after it."""
    q, cs = quantize_sym(w, axis=0, qmax=wmax)              # q [K, N], cs [N]
    if per_row:
        cs = per_token_columns(cs)
    one = G.add_init(np.array(1.0, np.float32), "one")
    wq = G.add_init(q, hint + ".w")
    csn = G.add_init(cs, hint + ".s")
    a_scale = one if per_row else s
    steps = ([s] if per_row else []) + ([] if fold else [csn])
    y = out if not steps else G.fresh("y")
    nodes.append(helper.make_node("MatMulIntegerToFloat", [xq, wq, a_scale, csn if fold else one, zp], [y],
                                  domain=MS, name=G.node_name(hint, "gemm")))
    for i, factor in enumerate(steps):
        nxt = out if i == len(steps) - 1 else G.fresh("ys")
        nodes.append(helper.make_node("Mul", [y, factor], [nxt], name=G.node_name(hint, "quant.rescale")))
        y = nxt


def rewrite_linears(proto: onnx.ModelProto, units: dict[str, str], int8: set[str],
                    static_scales: dict[str, float] | None = None, merge: bool = True,
                    wmax: float = QMAX, fold: bool = False, nbits: NBitsConfig | None = None,
                    base_dir: str = "") -> list[str]:
    """Replace MatMuls whose unit (``units[weight_name]``) is in ``int8``. Returns the unit names done.
    ``wmax`` 63: 7-bit weights, so u8 x s8 pair sums fit int16 on CPUs without VNNI (reduce_range).
    ``nbits``: one ``MatMulNBits`` per matmul instead (block scales; the kernel quantizes its input
    per row and block), for units whose K is a multiple of the block and that have no static scale.
    ``base_dir``: where weights kept as external data live (read one unit at a time)."""
    G = _Graph(proto, base_dir)
    static_scales = static_scales or {}
    todo = [(n, w) for n, w in linear_nodes(proto) if units.get(w) in int8]
    by_input = defaultdict(list)
    for n, w in todo:
        by_input[n.input[0]].append((n, w))
    first = {id(group[0][0]): x for x, group in by_input.items()}
    replaced = {id(n) for n, _ in todo}
    new_nodes, done = [], []
    for node in G.g.node:
        if id(node) not in replaced:
            new_nodes.append(node)
            continue
        x = first.get(id(node))
        if x is None:
            continue                                        # emitted with its group
        group = by_input[x]
        unit_names = [units[w] for _, w in group]
        scale = max((static_scales[u] for u in unit_names if u in static_scales), default=None)
        tag = unit_tag(unit_names[0])
        ws = [G.array(w) for _, w in group]
        if nbits is not None and scale is None and ws[0].shape[0] % nbits.block == 0:
            cat = np.concatenate(ws, axis=1) if merge and len(group) > 1 else None
            pairs = [(cat, G.fresh("ycat"))] if cat is not None else [(w, n.output[0]) for (n, _), w in zip(group, ws)]
            for w, y in pairs:
                new_nodes.append(matmul_nbits(x, w, y, G.node_name(tag, "gemm"), G.add_init, nbits, tag))
            if cat is not None:
                split = G.add_init(np.array([w.shape[1] for w in ws], np.int64), "split")
                new_nodes.append(helper.make_node("Split", [pairs[0][1], split], [n.output[0] for n, _ in group],
                                                  axis=-1, name=G.node_name(tag, "split")))
            done += unit_names
            continue
        xq, s, zp, per_row = _act_quant(G, x, scale, new_nodes, tag)
        if merge and len(group) > 1:
            y = G.fresh("ycat")
            _int8_matmul(G, xq, s, zp, per_row, np.concatenate(ws, axis=1), y, tag, new_nodes, wmax, fold)
            split = G.add_init(np.array([w.shape[1] for w in ws], np.int64), "split")
            new_nodes.append(helper.make_node("Split", [y, split], [n.output[0] for n, _ in group], axis=-1,
                                              name=G.node_name(tag, "split")))
        else:
            for (n, _), w, u in zip(group, ws, unit_names):
                _int8_matmul(G, xq, s, zp, per_row, w, n.output[0], unit_tag(u), new_nodes, wmax, fold)
        done += unit_names
    del G.g.node[:]
    G.g.node.extend(new_nodes)
    G.drop_unused_inits()
    return done


def rewrite_embedding(proto: onnx.ModelProto, weight_name: str, base_dir: str = "") -> bool:
    """Gather(fp32 [V, D], ids) -> Gather(int8 rows) * Gather(row scales). Returns True if done."""
    G = _Graph(proto, base_dir)
    w = G.array(weight_name)
    users = [n for n in G.consumers.get(weight_name, []) if n.op_type == "Gather"]
    if w is None or w.ndim != 2 or not users or len(users) != len(G.consumers[weight_name]):
        return False
    q, s = quantize_sym(w, axis=1)                          # q [V, D], s [V]
    qn, sn = G.add_init(q, "embed.w"), G.add_init(s[:, None], "embed.s")
    new_nodes = []
    for node in G.g.node:
        if node in users and node.input[0] == weight_name:
            ids, out = node.input[1], node.output[0]
            a, b, c = G.fresh("eq"), G.fresh("ef"), G.fresh("es")
            new_nodes += [helper.make_node("Gather", [qn, ids], [a], axis=0),
                          helper.make_node("Cast", [a], [b], to=onnx.TensorProto.FLOAT),
                          helper.make_node("Gather", [sn, ids], [c], axis=0),
                          helper.make_node("Mul", [b, c], [out])]
        else:
            new_nodes.append(node)
    del G.g.node[:]
    G.g.node.extend(new_nodes)
    G.drop_unused_inits()
    return True


def rewrite_moe(proto: onnx.ModelProto, node_name: str, block: int = 0, base_dir: str = "", bits: int = 8) -> str:
    """``com.microsoft::MoE`` node -> ``QMoE`` 8-bit. ``block`` 0: per-row scales (weights only);
    else per block of K (needs hidden and inter sizes divisible by it). Returns 'row' or 'block{b}'.
    ``bits`` 4: 4-bit weights (two per byte, low nibble first; onnxruntime's CPU kernel dequantizes
    them and computes in fp32); returns 'row4' or 'block{b}x4'. Per row and per block do not run
    alike everywhere: onnxruntime 1.30's CPU kernel took 11x longer per block than per row for one
    token at v3-nano's expert shape (1.51 vs 0.13 ms, 1 thread, 2-core AVX-512 VM), 1.32 about the
    same (0.16 vs 0.13); benchmarks/moe_kernels.py --qmoe 4/0,4/32."""
    G = _Graph(proto, base_dir)
    node = next(n for n in G.g.node if n.name == node_name)
    fc1, fc2 = G.array(node.input[2]), G.array(node.input[4])        # [E, 2I, D], [E, D, I]
    if block and (fc1.shape[2] % block or fc2.shape[2] % block):
        block = 0
    qmax, offset = float(2 ** (bits - 1) - 1), 2 ** (bits - 1)
    qs = []
    for w in (fc1, fc2):
        q, s = quantize_blocks(w, block, qmax=qmax) if block else quantize_sym(w, axis=2, qmax=qmax)
        u = (q.astype(np.int16) + offset).astype(np.uint8)
        if bits == 4:
            u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
        qs.append((G.add_init(u, node_name + ".w"), G.add_init(s, node_name + ".s")))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    attrs["expert_weight_bits"] = bits
    if block:
        attrs["block_size"] = block
    new = helper.make_node("QMoE", [node.input[0], node.input[1], qs[0][0], qs[0][1], "", qs[1][0], qs[1][1]],
                           list(node.output), name=node.name, domain=MS, **attrs)
    idx = list(G.g.node).index(node)
    G.g.node.remove(node)
    G.g.node.insert(idx, new)
    G.drop_unused_inits()
    kind = f"block{block}" if block else "row"
    return kind if bits == 8 else kind + ("x4" if block else "4")


def ensure_ms_opset(proto: onnx.ModelProto) -> None:
    if not any(o.domain == MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))
