"""Build the artifact each benchmark row runs: checkpoints, the fp32 ONNX export and its quantized
copies (onnxruntime ``quantize_dynamic`` defaults, NNCF ``ModelType.TRANSFORMER`` defaults).

What: ``MODELS`` (v3-nano, trained; v3-50m, random init by ``edgekit synth``) and ``model_spec`` (any
named shape of edgekit/data/shapes.toml, or a checkpoint dir), ``prepare_model`` (an fp32 HF
checkpoint dir), ``export_fp32``
(ONNX via ``edgekit.export`` when present, else a cache-less fallback), ``quantize_ort_dynamic`` and
``quantize_nncf`` (applied to the SAME fp32 export, so the rows differ only by quantizer).

Why: baselines must be what a user would get from each tool with defaults, on identical graphs.

Invariants: every builder writes into a temp dir and renames it into place when complete; a
present output dir is reused (so a re-run only measures).

Failure modes: exceptions propagate; ``run.py`` records them as the row's ``error``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from edgekit.atomic import atomic_dir
from edgekit.shapes import shape_config

# source: "v3-nano" (the shipped trained checkpoint), {"synth": SHAPE} (``edgekit synth SHAPE``, seed 0)
# or {"path": DIR} (a user's HF checkpoint, used in place). ``model_spec`` makes the entry for a name.
MODELS = {
    "v3-nano": {"trained": True, "source": "v3-nano"},
    "v3-50m": {"trained": False, "source": {"synth": "v3-50m"}},
}
# Above this many bytes of fp32 weights an ONNX graph cannot be one protobuf (2 GiB): external data.
LARGE_BYTES = 1_800_000_000


def model_spec(name: str | None = None, checkpoint: str | os.PathLike | None = None) -> tuple[str, dict]:
    """(row name, MODELS-style entry) for a named shape or a checkpoint dir. v3-nano is the trained
    reference model (same shape, and its accuracy means something); any other shape is synthesized."""
    if checkpoint is not None:
        d = Path(checkpoint)
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"--checkpoint {d}: no config.json there; pass a Hugging Face checkpoint dir")
        return d.absolute().name, {"trained": False, "source": {"path": str(d.resolve())}}   # a link keeps its name
    if name in MODELS:
        return name, MODELS[name]
    shape_config(name)  # unknown shape -> EdgekitError naming the choices
    return name, {"trained": False, "source": {"synth": name}}


def _atomic_dir(out: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename tmp -> out; reuse ``out`` if it already exists."""
    if out.exists():
        return out
    with atomic_dir(out) as tmp:
        build(tmp)
    return out


def dir_mb(d: Path, suffixes: tuple[str, ...] | None = None) -> float:
    files = [p for p in Path(d).rglob("*") if p.is_file() and (suffixes is None or p.suffix in suffixes
                                                                or p.name.endswith(".onnx.data"))]
    return sum(p.stat().st_size for p in files) / 1e6


def prepare_model(name: str, work: Path, spec: dict | None = None) -> Path:
    """fp32 HF checkpoint dir (config.json, safetensors, tokenizer.json) for model ``name``
    (``spec``: its MODELS-style entry, default ``MODELS[name]``)."""
    import torch

    from edgekit import checkpoint

    src = (spec or MODELS[name])["source"]
    if isinstance(src, dict) and "path" in src:
        return Path(src["path"])
    if isinstance(src, dict) and "synth" in src:
        from edgekit.synth import synth

        out = work / name / "checkpoint"
        return out if (out / "config.json").exists() else synth(src["synth"], out, seed=0, dtype="fp32")

    def build(tmp: Path):
        model = checkpoint.load(src)
        checkpoint.save(model, tmp / "ckpt", tokenizer_from="v3-nano", dtype=torch.float32)
        for p in (tmp / "ckpt").iterdir():
            os.replace(p, tmp / p.name)
        (tmp / "ckpt").rmdir()

    return _atomic_dir(work / name / "checkpoint", build)


def calib_ids(vocab: int, n: int, seq: int) -> np.ndarray:
    """[n, seq] calibration rows from the shipped calib split (ids < vocab)."""
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import load_tokens

    toks = load_tokens("calib", load_tokenizer("v3-nano"), max_tokens=n * seq)
    toks = toks[: (len(toks) // seq) * seq].reshape(-1, seq)[:n]
    return np.minimum(toks, vocab - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# fp32 ONNX export for the baseline rows
# ---------------------------------------------------------------------------------------------
def export_fp32(ckpt: Path, work: Path) -> Path:
    """The plain fp32 ONNX graph every onnxruntime baseline row shares: the model's own
    ``forward_cached`` traced as is (per-expert where/index_add dispatch, attention expanded
    through kv_b_proj, the latent cache as I/O), then onnxsim. This is what a generic exporter
    gives a user, and its expert weights are ordinary MatMul initializers that
    ``quantize_dynamic`` and NNCF can quantize (edgekit's own export stacks experts behind
    Gather/If/Loop or contrib ops, which those tools leave in fp32). Same I/O names and
    ``export.json`` as ``edgekit.export``, so ``edgekit.runtime.OrtModel`` runs it. Models of more
    than ``LARGE_BYTES`` of fp32 weights skip onnxsim and keep their weights in ``model.onnx.data``."""
    from edgekit import checkpoint

    def build(tmp: Path):
        model = checkpoint.load(ckpt)
        _export_plain_cached(model, tmp / "model.onnx")
        _write_spec(model.args, tmp)
        shutil.copy(ckpt / "config.json", tmp / "config.json")
        (tmp / "bench.json").write_text(json.dumps({"kind": "plain-cached"}))

    return _atomic_dir(ckpt.parent / "onnx-fp32", build)


def _export_plain_cached(model, path: Path, large_bytes: int = LARGE_BYTES) -> None:
    """Trace + onnxsim; above ``large_bytes`` of fp32 weights, no onnxsim (it needs one < 2 GiB protobuf)
    and the weights go to ``model.onnx.data`` beside the graph."""
    import onnx
    import torch
    from onnx import numpy_helper
    from torch import nn

    a, L = model.args, model.args.num_hidden_layers
    r, W = a.kv_lora_rank, a.kv_lora_rank + a.qk_rope_head_dim

    class PlainCached(nn.Module):
        """Transformer.forward_cached's loop, plus edgekit's ``logits_keep`` input (generation asks for
        the last row's logits only, as edgekit's graph and llama.cpp do; default: every row)."""

        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, *past_and_keep):
            """ids [B, T]; past[i] [B, P, W] = [c_kv | k_pe]; keep [] ->
            logits [B, min(T, keep), V], new rows [B, T, W]."""
            m, past, keep = self.m, past_and_keep[:-1], past_and_keep[-1]
            T, P = ids.shape[1], past[0].shape[1]
            pos = torch.arange(T) + P                                              # [T]
            cos, sin = m.rope_cos[pos], m.rope_sin[pos]
            mask = torch.arange(P + T)[None, :] <= pos[:, None]                    # [T, P+T]
            x, new = m.model.embed_tokens(ids), []
            for layer, p in zip(m.model.layers, past):
                x, kv, pe = layer(x, cos, sin, mask, p[..., :r], p[..., r:])
                new.append(torch.cat([kv[:, -T:], pe[:, -T:]], dim=-1))
            rows = torch.where(torch.arange(T) >= T - keep)[0]                     # last `keep` positions
            return (m.lm_head(m.model.norm(x[:, rows])), *new)

    ins = ["input_ids"] + [f"past_latent.{i}" for i in range(L)] + ["logits_keep"]
    outs = ["logits"] + [f"new_latent.{i}" for i in range(L)]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "kept"}}
    axes.update({n: {0: "batch", 1: "past_seq"} for n in ins[1:-1]})
    axes.update({n: {0: "batch", 1: "seq"} for n in outs[1:]})
    ids = torch.randint(0, a.vocab_size, (2, 3))
    past = [torch.zeros(2, 2, W) for _ in range(L)]
    large = sum(t.numel() * 4 for t in model.state_dict().values()) > large_bytes
    raw = path.parent / "raw" / path.name if large else path   # torch writes one file per tensor when large
    raw.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(PlainCached().eval(), (ids, *past, torch.tensor(2)), str(raw), input_names=ins,
                          output_names=outs, dynamic_axes=axes, opset_version=17, dynamo=False)
    proto = onnx.load(str(raw))
    if not large:  # onnxsim serializes the model into one protobuf: only below 2 GiB
        import onnxsim

        simp, ok = onnxsim.simplify(proto)
        proto = simp if ok else proto
    # an initializer named like an input is that input's default: logits for every position
    proto.graph.initializer.append(numpy_helper.from_array(np.array(a.max_position_embeddings, np.int64),
                                                           "logits_keep"))
    if large:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
        shutil.rmtree(raw.parent)
    else:
        onnx.save(proto, str(path))


def _write_spec(args, d: Path) -> None:
    """The export.json fields edgekit.runtime.OrtModel reads (same layout as edgekit.export's)."""
    from edgekit.export import io_spec
    W = args.kv_lora_rank + args.qk_rope_head_dim
    spec = {"format": "edgekit-onnx/1", "graph": "model.onnx", "num_layers": args.num_hidden_layers,
            "vocab_size": args.vocab_size, "max_position_embeddings": args.max_position_embeddings,
            "cache": {"width": W, "bytes_per_token": 4 * W * args.num_hidden_layers},
            "moe": "model's own per-expert dispatch", **io_spec(args)}
    # the plain graph has no left_pad input (one prompt length per call): declare only what it has
    spec["inputs"] = [i for i in spec["inputs"] if i["name"] != "left_pad"]
    (d / "export.json").write_text(json.dumps(spec, indent=1))


def export_edgekit(ckpt: Path) -> Path:
    """edgekit.export with its defaults (fp32): what edgekit's graph alone gains, before compression."""
    from edgekit import checkpoint
    from edgekit.export import export

    return _atomic_dir(ckpt.parent / "edgekit-fp32",
                       lambda tmp: export(checkpoint.load(ckpt), tmp / "x", tokenizer_from=ckpt) and _flatten(tmp))


def _flatten(tmp: Path) -> None:
    for p in (tmp / "x").iterdir():
        os.replace(p, tmp / p.name)
    (tmp / "x").rmdir()


def onnx_graphs(d: Path) -> list[Path]:
    return sorted(Path(d).glob("*.onnx"))


# ---------------------------------------------------------------------------------------------
# Baseline quantizers, applied to every graph of the fp32 export
# ---------------------------------------------------------------------------------------------
def _copy_side_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".onnx" and not p.name.endswith(".onnx.data"):
            shutil.copy(p, dst / p.name)


def quantize_ort_dynamic(fp32: Path) -> Path:
    """onnxruntime.quantization.quantize_dynamic with its defaults (QInt8 weights, per-tensor)."""
    from onnxruntime.quantization import quantize_dynamic

    def build(tmp: Path):
        large = dir_mb(fp32, (".onnx",)) * 1e6 > LARGE_BYTES
        for g in onnx_graphs(fp32):
            quantize_dynamic(str(g), str(tmp / g.name), use_external_data_format=large)
        _copy_side_files(fp32, tmp)

    return _atomic_dir(fp32.parent / "onnx-ort-dynamic", build)


def constants_to_initializers(model):
    """Move tensor-valued Constant nodes into initializers (same graph semantics). NNCF 3.4 looks up
    a Gather's data (here the RoPE tables) as an initializer and fails with "There is no tensor with
    the name /Constant_3_output_0" otherwise."""
    from onnx import numpy_helper

    keep = []
    for n in model.graph.node:
        attr = {a.name: a for a in n.attribute}
        if n.op_type == "Constant" and "value" in attr:
            arr = numpy_helper.to_array(attr["value"].t)
            model.graph.initializer.append(numpy_helper.from_array(arr, n.output[0]))
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def calib_feeds(graph: Path, rows: int, seq: int = 128) -> list[dict]:
    """NNCF calibration inputs for one graph: ``rows`` calib-split rows of ``seq`` tokens.
    Cache graphs get realistic decode inputs: the first half of a row is prefilled by the fp32
    graph (OrtModel) and its latent rows are fed as past_latent.* with the second half as input_ids,
    so every cache tensor has statistics (an empty past would give none)."""
    import onnx

    names = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.input]
    vocab = json.loads((graph.parent / "config.json").read_text())["vocab_size"] \
        if (graph.parent / "config.json").exists() else None
    ids = calib_ids(vocab or 2**31, rows, seq)
    if names == ["input_ids"]:
        return [{"input_ids": r[None]} for r in ids]
    from edgekit.runtime.session import OrtModel

    m, half, feeds = OrtModel(graph.parent), seq // 2, []
    for r in ids:
        _, cache = m.prefill(r[None, :half])
        feed = {"input_ids": r[None, half:]}
        feed.update({n: b[:, :cache.length].copy() for n, b in zip(m._past, cache.buffers)})
        feeds.append(feed)
    return feeds


def batched_weight_matmuls(model) -> list[str]:
    """MatMul nodes whose B is a >2-D initializer (the export's absorbed per-head MLA weights
    [H, r, d]). NNCF's per-channel int8 weights there give a zero-point shape onnxruntime's fused
    MatMulIntegerToFloat rejects at run time ("b zero point is not valid")."""
    init = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and init.get(n.input[1], 2) > 2]


def quantize_nncf(fp32: Path, rows: int) -> Path:
    """nncf.quantize(ModelType.TRANSFORMER) with defaults on each graph of the fp32 export,
    calibrated on ``rows`` calib-split rows (see calib_feeds). One deviation from defaults, the
    smallest that makes the result run: the batched-weight MatMuls stay fp32 (ignored_scope)."""
    import nncf
    import onnx

    def build(tmp: Path):
        for g in onnx_graphs(fp32):
            model = constants_to_initializers(onnx.load(str(g)))
            skip = nncf.IgnoredScope(names=batched_weight_matmuls(model), validate=False)
            q = nncf.quantize(model, nncf.Dataset(calib_feeds(g, rows)), model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=skip)
            onnx.save(q, str(tmp / g.name))
        _copy_side_files(fp32, tmp)

    return _atomic_dir(fp32.parent / "onnx-nncf", build)
