"""Sparse MoE on onnxruntime CPU: does decode time stay flat when routed experts grow 4x?

What: random-init models of v3-nano's shape (``ModelArgs()`` defaults) with E and 4E routed
experts at the same top-k and expert width (same active parameters per token), exported with
``edgekit.export`` on each MoE path; prints decode ms/token (prompt of ``--ctx`` tokens, then
``--steps`` timed greedy steps through ``OrtModel.decode``, median per round, median over
``--rounds`` rounds interleaved across variants) and the 4x/1x ratio against the 1.3x bar.
``--dense`` adds a dense-dispatch baseline (every expert on every token, unselected weights 0).
``--design`` measures the export's design choices on the base model: IO-bound cache buffers vs
``session.run`` with a concatenated cache; absorbed vs expanded attention (prefill and decode);
one session vs a prefill + decode session pair in one process. ``--shape NAME [--layers N]
[--experts N]`` runs the design measurements on a named shape instead (random init as
``edgekit synth``; e.g. the first 3 layers of v3-1.6b with 16 routed experts, to see what the
attention form costs at that layer size on a small machine).

Run: ``python benchmarks/expert_scaling.py [--dense] [--design] [--threads N]``. Figures are noisy
on shared 2-core machines: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgekit.export import ExportConfig, export  # noqa: E402
from edgekit.model import ModelArgs, MoE, Transformer  # noqa: E402
from edgekit.runtime import OrtModel  # noqa: E402
from edgekit.shapes import shape_names  # noqa: E402


def model(n_experts: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(n_routed_experts=n_experts)).eval()


class DenseMoE(nn.Module):
    """Baseline: every routed expert runs on every token; unselected experts are weighted 0."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.gate(x)
        full = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype).scatter(1, idx, w)   # [N, E]
        y = sum(e(x) * full[:, i:i + 1] for i, e in enumerate(self.experts))
        return (y + self.shared_experts(x)).view(shape)


def densified(m: Transformer) -> Transformer:
    m = copy.deepcopy(m)
    for layer in m.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp = DenseMoE(layer.mlp)
    return m


def decode_ms(om: OrtModel, ctx: int, steps: int, seed: int = 0) -> float:
    ids = np.random.default_rng(seed).integers(0, om.vocab_size, (1, ctx))
    _, cache = om.prefill(ids, capacity=ctx + steps)
    tok, times = np.array([1]), []
    for _ in range(steps):
        t = time.perf_counter()
        tok = om.decode(tok, cache).argmax(-1)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def prefill_ms(om: OrtModel, T: int, reps: int = 5) -> float:
    ids = np.random.default_rng(0).integers(0, om.vocab_size, (1, T))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        om.logits(ids)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rounds_median(fns: dict, rounds: int) -> dict:
    """Interleave the measurements so machine noise hits every variant alike."""
    got = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            got[k].append(fn())
    return {k: statistics.median(v) for k, v in got.items()}


class ConcatRunner:
    """session.run with the cache as graph inputs and np.concatenate per step (no IO binding)."""

    def __init__(self, om: OrtModel):
        self.om = om

    def decode_ms(self, ctx: int, steps: int) -> float:
        om = self.om
        ids = np.random.default_rng(0).integers(0, om.vocab_size, (1, ctx))
        empty = np.zeros((1, 0, om.width), np.float32)
        out = om.session.run(None, {"input_ids": ids, **{n: empty for n in om._past}})
        cache, tok, times = out[1:], np.array([[1]]), []
        for _ in range(steps):
            t = time.perf_counter()
            out = om.session.run(None, {"input_ids": tok, **dict(zip(om._past, cache))})
            cache = [np.concatenate([c, n], axis=1) for c, n in zip(cache, out[1:])]
            tok = out[0][:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3


def expert_scaling(tmp: Path, a) -> None:
    base_e = ModelArgs().n_routed_experts
    variants = {}
    for moe in ("contrib", "portable"):
        for e in (base_e, 4 * base_e):
            d = export(model(e), tmp / f"{moe}{e}", ExportConfig(moe=moe))
            variants[(moe, e)] = OrtModel(d, threads=a.threads)
    if a.dense:
        for e in (base_e, 4 * base_e):
            d = export(densified(model(e)), tmp / f"dense{e}", ExportConfig(moe="portable"))
            variants[("dense", e)] = OrtModel(d, threads=a.threads)
    res = rounds_median({k: (lambda om=om: decode_ms(om, a.ctx, a.steps)) for k, om in variants.items()}, a.rounds)
    print(f"\ndecode ms/token, prompt {a.ctx}, {a.steps} steps, median of {a.rounds} interleaved rounds "
          f"(active params equal; routed experts {base_e} vs {4 * base_e}, top-{ModelArgs().num_experts_per_tok})")
    print(f"{'path':10} {'E=' + str(base_e):>10} {'E=' + str(4 * base_e):>10} {'ratio':>7}  bar 1.3x")
    for path in dict.fromkeys(k[0] for k in res):
        lo, hi = res[(path, base_e)], res[(path, 4 * base_e)]
        verdict = "ok" if hi / lo <= 1.3 else "MISS"
        print(f"{path:10} {lo:10.3f} {hi:10.3f} {hi / lo:7.2f}  {verdict if path != 'dense' else '(baseline)'}")
    c, p = res[("contrib", base_e)], res[("portable", base_e)]
    print(f"portable / contrib at E={base_e}: {p / c:.2f}x")
    if a.dense:
        print(f"dense / sparse(portable) at E={base_e}: {res[('dense', base_e)] / p:.2f}x, "
              f"at E={4 * base_e}: {res[('dense', 4 * base_e)] / res[('portable', 4 * base_e)]:.2f}x")


def shape_model(shape: str, layers: int | None, experts: int | None) -> Transformer:
    """A named shape (edgekit/data/shapes.toml), optionally cut to its first ``layers`` decoder
    layers and ``experts`` routed experts, random init as ``edgekit synth`` (std 0.02)."""
    from edgekit.checkpoint import args_from_config
    from edgekit.shapes import shape_config
    from edgekit.synth import random_model

    cfg = shape_config(shape)
    cfg.update({k: v for k, v in (("num_hidden_layers", layers), ("n_routed_experts", experts)) if v})
    return random_model(args_from_config(cfg))


def design(tmp: Path, a) -> None:
    import onnx

    from edgekit.export import _trace, optional_input_defaults
    from edgekit.export.onnx_io import finish_graph

    m = shape_model(a.shape, a.layers, a.experts) if a.shape else model(ModelArgs().n_routed_experts)
    simplify = not a.shape                                    # onnxsim on a big shape: minutes, same graph here
    absorbed = export(m, tmp / "absorb", ExportConfig(moe="contrib", simplify=simplify))
    expanded = export(m, tmp / "expand", ExportConfig(moe="contrib", simplify=simplify))   # graph replaced below
    _trace(m, ExportConfig(moe="contrib"), tmp / "raw.onnx", attention="expand")
    proto = onnx.load(str(tmp / "raw.onnx"))
    finish_graph(proto, simplify=simplify, meta={})
    proto.graph.initializer.extend(optional_input_defaults(m.args))
    onnx.save(proto, str(expanded / "model.onnx"), save_as_external_data=not simplify,
              location="model.onnx.data")
    om_a, om_e = OrtModel(absorbed, threads=a.threads), OrtModel(expanded, threads=a.threads)
    concat = ConcatRunner(om_a)

    what = (f"{a.shape}" + (f", first {a.layers} layers" if a.layers else "")
            + (f", {a.experts} routed experts" if a.experts else "")) if a.shape else "v3-nano shape"
    print(f"\n-- design (contrib MoE, {what}, median of {a.rounds} rounds) --")
    res = rounds_median({
        "io-binding ctx 128": lambda: decode_ms(om_a, 128, a.steps),
        "concat+run ctx 128": lambda: concat.decode_ms(128, a.steps),
        "io-binding ctx 1024": lambda: decode_ms(om_a, 1024, a.steps),
        "concat+run ctx 1024": lambda: concat.decode_ms(1024, a.steps),
    }, a.rounds)
    for k, v in res.items():
        print(f"decode ms/token  {k:22} {v:8.3f}")
    res = rounds_median({
        "absorbed prefill 128": lambda: prefill_ms(om_a, 128), "expanded prefill 128": lambda: prefill_ms(om_e, 128),
        "absorbed prefill 512": lambda: prefill_ms(om_a, 512), "expanded prefill 512": lambda: prefill_ms(om_e, 512),
        "absorbed decode ctx 1024": lambda: decode_ms(om_a, 1024, a.steps),
        "expanded decode ctx 1024": lambda: decode_ms(om_e, 1024, a.steps),
    }, a.rounds)
    for k, v in res.items():
        print(f"ms  {k:28} {v:8.3f}")
    # two sessions (expanded prefill + absorbed decode) vs one, alternating prompt and decode work
    def serve(pre: OrtModel, dec: OrtModel) -> float:
        ids = np.random.default_rng(1).integers(0, dec.vocab_size, (1, 128))
        t = time.perf_counter()
        for _ in range(4):
            pre.logits(ids)
            decode_ms(dec, 16, 16)
        return (time.perf_counter() - t) * 1e3 / 4
    res = rounds_median({"one session (absorbed)": lambda: serve(om_a, om_a),
                         "two sessions (expanded prefill)": lambda: serve(om_e, om_a)}, a.rounds)
    for k, v in res.items():
        print(f"ms per (prefill 128 + 16-token prefill + 16 decodes)  {k:32} {v:8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dense", action="store_true", help="add the dense-dispatch baseline")
    p.add_argument("--design", action="store_true", help="measure cache binding / attention / session choices")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--shape", default=None, choices=shape_names(),
                   help="--design on this named shape instead of v3-nano's")
    p.add_argument("--layers", type=int, default=None, help="with --shape: keep the first N decoder layers")
    p.add_argument("--experts", type=int, default=None, help="with --shape: routed experts kept per MoE layer")
    a = p.parse_args()
    if a.shape and not a.design:
        p.error("--shape applies to --design; add --design (and --skip-scaling to skip the expert scaling)")
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_scaling:
            expert_scaling(Path(tmp), a)
        if a.design:
            design(Path(tmp), a)


if __name__ == "__main__":
    main()
