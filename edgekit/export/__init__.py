"""ONNX export for on-device generation: ``export(model, out_dir, config) -> Path``.

What: one ONNX graph (``model.onnx``) that serves both prompt processing and per-token decoding:
``input_ids`` [batch, seq] + ``past_latent.{i}`` [batch, past_seq, W] per layer in,
``logits`` [batch, seq, vocab] + ``new_latent.{i}`` [batch, seq, W] out, W = kv_lora_rank +
qk_rope_head_dim (MLA's compressed latent | shared rotary key). Prefill = the same graph with
past_seq = 0. Two optional inputs: ``logits_keep`` (logits of the last positions only) and
``left_pad`` [batch] (leading padding columns per row, so rows of any prompt and cache length
share one call; see graph.py). Beside it: ``export.json`` (the I/O spec, cache widths, max
positions, MoE path, opset, and ``units``: every weight-carrying module of the model by name ->
the graph node and initializers holding it, see onnx_io.py), ``config.json`` and, with
``tokenizer_from``, ``tokenizer.json``. Run it with ``edgekit.runtime.OrtModel`` (no torch).

Why one graph (measured with ``benchmarks/expert_scaling.py --design`` on v3-nano's shape, 2
shared, heavily loaded cores; two runs, medians of 3 and 5 rounds): absorbed attention is what
decode needs (ctx 1024: 1.7 ms/token vs 11.6-15.8 ms re-expanding the cache per head) and costs
prefill nothing measurable (128 tokens: 38/58 ms vs 46/59 ms expanded; 512: 156/192 vs
149/204 ms), so one absorbed graph serves both. One session also holds the weights once, and a
prefill + decode session pair in one process was slower (186/250 vs 124/175 ms for a mixed
prompt/decode workload: idle sessions' threads spin).
Routed experts run sparsely on both MoE paths:
``moe="contrib"``: one ``com.microsoft::MoE`` node per layer (onnxruntime CPU kernels; faster);
``moe="portable"``: standard opset-17 ops only, for runtimes without contrib ops (onnxruntime-web,
minimal mobile builds): an ``If`` on the token count picks gathered per-token expert weights (decode)
or a ``Loop`` over experts with NonZero/GatherND/ScatterND-add dispatch (prefill); see
moe_portable.py.

Invariants: onnxruntime fp32 logits match torch to <= 1e-4 (tests/test_export.py, ``verify``);
each graph carries metadata_props ``edgekit.version``, ``edgekit.model_hash`` (sha256 of config and
weights) and ``edgekit.io_spec`` (JSON). The output directory appears only when complete.

Failure modes: non-fp32 weights or a config the contrib MoE op cannot express raise
``EdgekitError`` naming the fix. Models over ~2 GB are written with external data
(``model.onnx.data``) and onnxsim is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from ..atomic import atomic_dir
from ..errors import EdgekitError
from ..info import cache_bytes_per_token
from .onnx_io import finish_graph, graph_units, model_hash

PROTOBUF_LIMIT = 2**31          # one serialized ModelProto cannot exceed 2 GiB
GRAPH_FILE, SPEC_FILE = "model.onnx", "export.json"

__all__ = ["ExportConfig", "export", "cache_bytes_per_token", "model_hash", "verify"]


@dataclass
class ExportConfig:
    moe: str = "contrib"            # "contrib": com.microsoft::MoE (ORT CPU); "portable": plain ONNX ops
    simplify: bool = True           # run onnxsim (skipped, with a warning, when external data is needed)
    opset: int = 17
    # graphs whose weights exceed this are saved with external data (headroom for the graph itself)
    external_data_threshold: int = PROTOBUF_LIMIT - 2**26

    def __post_init__(self):
        if self.moe not in ("contrib", "portable"):
            raise EdgekitError(f"export moe={self.moe!r}: use 'contrib' (onnxruntime CPU) or 'portable' (plain ONNX)")
        if self.opset < 17:
            raise EdgekitError(f"export opset={self.opset}: use 17 or newer")


def _check(model, cfg: ExportConfig) -> None:
    import torch

    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and p.dtype != torch.float32]
    if bad:
        raise EdgekitError(f"{bad[0]} is not float32; load the checkpoint with dtype=torch.float32 before export")
    a = model.args
    if cfg.moe == "contrib":
        from .moe_contrib import contrib_routing
        for i in range(a.num_hidden_layers):
            la = a.for_layer(i)
            if la.is_moe and contrib_routing(a, la) is None:
                raise EdgekitError(f"layer {i}: the com.microsoft MoE op cannot express this routing (needs "
                                   "norm_topk_prob with num_experts_per_tok > 1, or plain greedy softmax); "
                                   "export with moe='portable'")


def io_spec(args) -> dict:
    from .graph import io_names
    W = args.kv_lora_rank + args.qk_rope_head_dim
    ins, outs = io_names(args.num_hidden_layers)
    return {
        "inputs": [{"name": ins[0], "dtype": "int64", "shape": ["batch", "seq"]}]
        + [{"name": n, "dtype": "float32", "shape": ["batch", "past_seq", W]} for n in ins[1:-2]]
        + [{"name": ins[-2], "dtype": "int64", "shape": [], "optional": True,
            "default": args.max_position_embeddings,
            "doc": "logits are returned for the last min(seq, logits_keep) positions (generation: 1)"},
           {"name": ins[-1], "dtype": "int64", "shape": ["batch"], "optional": True, "default": [0],
            "doc": "per row, the number of leading padding columns of [past | new] (left padding): "
                   "row b sees columns >= left_pad[b]; its positions are past_seq + arange(seq) - left_pad[b]"}],
        "outputs": [{"name": outs[0], "dtype": "float32", "shape": ["batch", "logits_seq", args.vocab_size]}]
        + [{"name": n, "dtype": "float32", "shape": ["batch", "seq", W]} for n in outs[1:]],
    }


def _trace(model, cfg: ExportConfig, path: Path, attention: str = "absorb") -> set[str]:
    """Trace the decoder graph to ``path``; returns the module names whose linears it calls."""
    import torch

    from .graph import LatentDecoder, dynamic_axes, io_names, name_keyed_weights
    a = model.args
    dec = LatentDecoder(model, cfg.moe, attention).eval()
    W, L = a.kv_lora_rank + a.qk_rope_head_dim, a.num_hidden_layers
    gen = torch.Generator().manual_seed(0)                   # leave the caller's RNG alone
    ids = torch.randint(0, a.vocab_size, (2, 3), generator=gen)   # batch/seq/past > 1: nothing specialises
    past = [torch.zeros(2, 2, W) for _ in range(L)]
    keep = torch.tensor(2)                                   # < seq, so the row selection is traced
    pad = torch.tensor([0, 1])                               # per row, so nothing folds to a constant
    ins, outs = io_names(L)
    with torch.no_grad(), warnings.catch_warnings(), name_keyed_weights(model) as used:
        warnings.simplefilter("ignore")
        torch.onnx.export(dec, (ids, *past, keep, pad), str(path), dynamo=False, opset_version=cfg.opset,
                          input_names=ins, output_names=outs, dynamic_axes=dynamic_axes(L),
                          custom_opsets={"com.microsoft": 1, "edgekit": 1} if cfg.moe == "contrib" else {"edgekit": 1})
    return used


def export(model, out_dir: str | os.PathLike, config: ExportConfig | None = None,
           tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Export ``model`` (fp32 ``Transformer``) to ``out_dir`` (replaced if present); returns the dir."""
    cfg = config or ExportConfig()
    _check(model, cfg)
    a = model.args
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        unique = {t.data_ptr(): t for t in model.state_dict().values()}.values()   # tied weights once
        weight_bytes = sum(t.numel() * t.element_size() for t in unique)
        large = weight_bytes > cfg.external_data_threshold
        (tmp / "raw").mkdir()
        linears = _trace(model, cfg, tmp / "raw" / GRAPH_FILE)
        proto = onnx.load(str(tmp / "raw" / GRAPH_FILE))
        simplify = cfg.simplify and not large
        if cfg.simplify and large:
            print(f"warning: weights are {weight_bytes / 1e9:.1f} GB, over the 2 GB protobuf limit: "
                  "saved with external data, onnxsim skipped", file=sys.stderr)
        shutil.rmtree(tmp / "raw")
        write_export(tmp, proto, a, cfg, digest=model_hash(model), model_name=getattr(model, "name", None),
                     simplify=simplify, large=large, linears=linears, tokenizer_from=tokenizer_from)
    return out


def optional_input_defaults(a) -> list:
    """logits_keep and left_pad become optional: an initializer of the same name is the default
    (all rows; no padding, a [1] zero that broadcasts over the batch)."""
    return [onnx.numpy_helper.from_array(np.array(a.max_position_embeddings, np.int64), "logits_keep"),
            onnx.numpy_helper.from_array(np.zeros(1, np.int64), "left_pad")]


def write_export(tmp: Path, proto, a, cfg: ExportConfig, *, digest: str, model_name, simplify: bool, large: bool,
                 linears: set[str] | None, tokenizer_from=None, data_written: bool = False, extra: dict | None = None):
    """The traced graph ``proto`` of a model with args ``a`` -> ``tmp``: post-processing
    (``finish_graph``), the unit map, the optional-input defaults, ``model.onnx`` (+ external data
    when ``large``; ``data_written``: its tensors already point into ``tmp/model.onnx.data``),
    ``export.json``, ``config.json`` and the tokenizer. Shared by ``export`` and the layer-by-layer
    export (``export.layered``), so both write the same directory."""
    from .. import __version__
    from ..checkpoint import config_from_args, resolve

    spec = io_spec(a)
    experts = finish_graph(proto, simplify=simplify, meta={
        "edgekit.version": __version__, "edgekit.model_hash": digest, "edgekit.io_spec": json.dumps(spec)})
    units = graph_units(proto, experts, a.num_hidden_layers)
    lost = sorted((linears or set()) - set(units))
    if lost:
        raise RuntimeError(f"export: the graph lost the name of {lost[0]} ({len(lost)} units); "
                           "graph_units cannot map it")
    proto.graph.initializer.extend(optional_input_defaults(a))
    if data_written:
        onnx.save_model(proto, str(tmp / GRAPH_FILE))
    else:
        onnx.save_model(proto, str(tmp / GRAPH_FILE), save_as_external_data=large,
                        all_tensors_to_one_file=True, location=GRAPH_FILE + ".data")
    W = a.kv_lora_rank + a.qk_rope_head_dim
    doc = {
        "format": "edgekit-onnx/1", "edgekit_version": __version__, "model_hash": digest,
        "model_name": model_name, "graph": GRAPH_FILE, "external_data": large,
        "simplified": simplify, "opset": cfg.opset, "moe": cfg.moe, "dtype": "float32",
        "num_layers": a.num_hidden_layers, "vocab_size": a.vocab_size,
        "max_position_embeddings": a.max_position_embeddings,
        "bos_token_id": a.bos_token_id, "eos_token_id": a.eos_token_id,
        "cache": {"width": W, "kv_lora_rank": a.kv_lora_rank, "qk_rope_head_dim": a.qk_rope_head_dim,
                  "row": "[norm(c_kv) (kv_lora_rank) | rope(k_pe) (qk_rope_head_dim)]",
                  "bytes_per_token": cache_bytes_per_token(a)},
        "usage": "prefill: past_latent.* with past_seq=0; decode: pass the rows so far, append new_latent.*; "
                 "logits_keep=1 for generation (omitted: logits for every position); "
                 "batching rows of different lengths: left-pad them and pass left_pad [batch] "
                 "(omitted: no padding); positions are past_seq + arange(seq) - left_pad and must "
                 "stay < max_position_embeddings",
        **spec, **experts, "units": units, "config": asdict(cfg), **(extra or {}),
    }
    (tmp / SPEC_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config_from_args(a), indent=2) + "\n")
    if tokenizer_from is not None:
        src = resolve(tokenizer_from) / "tokenizer.json"
        if not src.exists():
            raise EdgekitError(f"{src} not found; pass tokenizer_from= a checkpoint dir with tokenizer.json")
        shutil.copy(src, tmp / "tokenizer.json")


def verify(model, export_dir, prompt_lens=(1, 7, 128), steps: int = 32, seed: int = 0,
           ort_model=None) -> dict:
    """Parity of the export against torch: prefill logits max abs diff and greedy tokens per prompt
    length; ``passed`` = diff <= 1e-4 and identical tokens everywhere (see parity.py)."""
    from .parity import verify as _verify
    return _verify(model, export_dir, prompt_lens, steps, seed, ort_model)
