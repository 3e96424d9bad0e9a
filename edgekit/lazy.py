"""Lazy checkpoint I/O: read a Hugging Face checkpoint one decoder layer at a time, write one shard
at a time.

What: ``CheckpointReader(path)`` reads ``config.json`` and the safetensors headers only (names,
dtypes, shapes; no weight bytes) and checks them against the config up front: every tensor the
model needs is present with its shape, fp8 weights have ``weight_scale_inv`` block scales of the
right shape, index and shards agree. Then ``read(names)``, ``layer_state(i)`` and
``global_state()`` return fp32 (or ``dtype``) tensors: fp8 e4m3 weights are dequantized with
their block scales (``edgekit.fp8``), bf16/fp16 are widened, NaN/Inf is rejected.
``layer(i)`` builds one ``Block`` with its weights, ``embedding()``/``final_norm()``/``lm_head()``
the other modules. ``ShardWriter(dir)`` takes tensors in order and writes
``model-0000k-of-0000n.safetensors`` shards of at most ``shard_bytes`` plus the index.

Why: a checkpoint larger than RAM (DeepSeek's are sharded fp8) must be usable by calibration,
pruning, smoothing and export without ever holding the whole model. Files are opened per read
(safetensors memory-maps them), so mapped pages are released after each layer and resident memory
stays at about one layer.

Invariants: the tensors a reader returns equal what ``checkpoint.load`` puts in the model (it is
built on this reader); multi-token-prediction layers (index >= num_hidden_layers) are never read
(a note says they were skipped); weights are read only through safetensors.

Failure modes (``EdgekitError``, one line naming the fix): no/invalid config, pickle weights,
corrupt or truncated shard, a shard the index names missing, a tensor missing from the index or the
shards, index and shard disagreeing, wrong shapes, fp8 weights without scales or with scales of the
wrong shape, an unsupported ``quantization_config``, NaN/Inf weights.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .bundle import member
from .configcheck import check_shapes
from .errors import EdgekitError
from .fp8 import SCALE_SUFFIX, check_scale, dequantize, fp8_config, quantization_config

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")


def weight_files(d: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of checkpoint dir ``d`` and the index's weight map (None: single file)."""
    index = d / INDEX_FILE
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            if not isinstance(wmap, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EdgekitError(f"{index} is corrupt; re-save the checkpoint with save_pretrained") from None
        names = sorted(set(wmap.values()))
        for n in names:  # shard names must stay inside the checkpoint directory
            member(d, n, INDEX_FILE)
        missing = [n for n in names if not (d / n).exists()]
        if missing:
            raise EdgekitError(f"{d} lacks shard {missing[0]} named in {INDEX_FILE}; copy all shards")
        return [d / n for n in names], wmap
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"], None
    pickled = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise EdgekitError(
            f"{d} holds pickle weights ({pickled[0]}), which edgekit never unpickles; convert with "
            "`python -c \"import torch,safetensors.torch as s; s.save_file(torch.load('IN', weights_only=True), "
            "'model.safetensors')\"` or transformers' save_pretrained(safe_serialization=True)")
    raise EdgekitError(f"{d} has no model.safetensors; point to a Hugging Face checkpoint directory")


def _corrupt(f: Path, e: Exception) -> EdgekitError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return EdgekitError(f"{f} is corrupt or truncated ({msg}); re-download or re-save it")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


class CheckpointReader:
    """Header-checked, lazily read checkpoint directory (see module doc)."""

    def __init__(self, path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                 check_finite: bool = True):
        from .hfconfig import args_from_config, read_config
        from .shapes import meta_model

        self.dir, self.config = read_config(path)
        self.args = args_from_config(self.config)
        self.block = fp8_config(self.config)
        self.dtype, self.check_finite = dtype, check_finite
        self.name = self.dir.name
        self.files, wmap = weight_files(self.dir)
        self.where: dict[str, Path] = {}               # tensor name -> file
        self.header: dict[str, tuple[str, tuple]] = {}  # tensor name -> (dtype, shape)
        unindexed = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        sl = st.get_slice(k)
                        if wmap is not None and wmap.get(k) != f.name:
                            unindexed[k] = f.name
                            continue
                        self.where[k] = f
                        self.header[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise _corrupt(f, e) from None
        if wmap is not None:
            lost = sorted(k for k, f in wmap.items() if k not in self.where)
            if lost:
                raise EdgekitError(f"{self.dir / wmap[lost[0]]} lacks tensor {lost[0]}, which {INDEX_FILE} places "
                                   "there; the index and the shards disagree (re-download or re-save the checkpoint)")
        n = self.args.num_hidden_layers
        # shapes from headers vs config before anything is allocated; which layers beyond n are MTP
        self.mtp = sorted(check_shapes(self.dir, self.args, self.config,
                                       {k: shape for k, (_, shape) in self.header.items()}))
        if self.mtp:
            print(f"note: skipped {len(self.mtp)} multi-token-prediction tensors (layers >= {n}); "
                  "edgekit runs the main model only", file=sys.stderr)
        self._fused = self._fused_experts()
        self.expected = {k: tuple(v.shape) for k, v in meta_model(self.args).state_dict().items()}
        if self.args.tie_word_embeddings:
            self.expected.pop("lm_head.weight", None)
        self._check(unindexed)

    # -- header checks ------------------------------------------------------------------------
    def _fused_experts(self) -> dict[str, tuple[str, int, str]]:
        """transformers' in-memory fused expert layout (gate_up_proj [E, 2I, D], down_proj [E, D, I])
        -> virtual per-expert names: name -> (fused tensor, expert, part)."""
        out = {}
        for k, (_, shape) in self.header.items():
            m = _FUSED.match(k)
            if not m or len(shape) != 3:
                continue
            for e in range(shape[0]):
                if m.group(2) == "gate_up_proj":
                    out[f"{m.group(1)}{e}.gate_proj.weight"] = (k, e, "gate")
                    out[f"{m.group(1)}{e}.up_proj.weight"] = (k, e, "up")
                else:
                    out[f"{m.group(1)}{e}.down_proj.weight"] = (k, e, "down")
        return out

    def _shape(self, k: str) -> tuple | None:
        if k in self.header:
            return self.header[k][1]
        if k in self._fused:
            fused, _, part = self._fused[k]
            shape = self.header[fused][1]
            return (shape[1] // 2, shape[2]) if part in ("gate", "up") else tuple(shape[1:])
        return None

    def _check(self, unindexed: dict[str, str]) -> None:
        d = self.dir
        extra = [k for k in self.header if k not in self.expected and k not in self.mtp
                 and not k.endswith(SCALE_SUFFIX) and not _FUSED.match(k) and k != "lm_head.weight"]
        if extra:
            raise EdgekitError(f"{d}: tensor {sorted(extra)[0]} does not fit this config "
                               f"({len(extra)} unexpected); check config.json matches the weights")
        for k, want in self.expected.items():
            got = self._shape(k)
            if got is None:
                if k.endswith("e_score_correction_bias"):
                    continue                       # older checkpoints: bias 0
                if k in unindexed:
                    raise EdgekitError(f"{INDEX_FILE} has no entry for {k} (it is in {unindexed[k]}); "
                                       "re-save the checkpoint so the index lists every tensor")
                raise EdgekitError(f"{d} lacks tensor {k}; the checkpoint is incomplete or config.json is wrong")
            if tuple(got) != want:
                raise EdgekitError(f"{d}: {k} has shape {tuple(got)} but config.json implies "
                                   f"{want}; fix config.json or use matching weights")
            if k in self.header and self.header[k][0].startswith("F8"):
                if self.block is None:
                    raise EdgekitError(f"{d}: {k} is fp8 but config.json has no quantization_config; add "
                                       f"{json.dumps(quantization_config())}")
                s = self.header.get(k + SCALE_SUFFIX)
                if s is None:
                    raise EdgekitError(f"{d}: fp8 weight {k} has no {k}{SCALE_SUFFIX}; the checkpoint is incomplete")
                check_scale(k, got, s[1], self.block)

    # -- reading ------------------------------------------------------------------------------
    def layer_names(self, i: int) -> list[str]:
        pre = f"model.layers.{i}."
        return [k for k in self.expected if k.startswith(pre)]

    def global_names(self) -> list[str]:
        return [k for k in self.expected if not k.startswith("model.layers.")]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``names`` (model tensor names) as ``self.dtype`` tensors; each file is opened once."""
        want = defaultdict(set)
        for k in names:
            if k in self._fused:
                k = self._fused[k][0]
            if k in self.where:
                want[self.where[k]].add(k)
                if k + SCALE_SUFFIX in self.where:
                    want[self.where[k + SCALE_SUFFIX]].add(k + SCALE_SUFFIX)
        raw = {}
        for f, keys in want.items():
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in keys:
                        raw[k] = st.get_tensor(k)
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise _corrupt(f, e) from None
        out = {}
        for k in names:
            if k in self._fused:
                fused, e, part = self._fused[k]
                t = raw[fused][e]
                t = t.chunk(2, dim=0)[part == "up"] if part != "down" else t
            elif k in raw:
                t = raw[k]
                if k + SCALE_SUFFIX in raw:
                    t = dequantize(t, raw[k + SCALE_SUFFIX], self.block, k)
            elif k.endswith("e_score_correction_bias"):
                t = torch.zeros(self.expected[k])
            else:
                raise EdgekitError(f"{self.dir} lacks tensor {k}; the checkpoint is incomplete or config.json is wrong")
            t = t.to(self.dtype) if t.is_floating_point() else t
            if self.check_finite and t.is_floating_point() and not torch.isfinite(t).all():
                raise EdgekitError(f"{self.dir}: {k} contains NaN/Inf values; re-export the checkpoint "
                                   "from a healthy run")
            out[k] = t.contiguous()
        return out

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        return self.read(self.layer_names(i))

    def global_state(self) -> dict[str, torch.Tensor]:
        sd = self.read(self.global_names())
        if self.args.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    # -- modules --------------------------------------------------------------------------------
    def layer(self, i: int, device: str | torch.device = "cpu"):
        """Decoder layer ``i`` as a ``Block`` holding its weights (eval mode)."""
        from .model import Block

        pre = f"model.layers.{i}."
        with torch.device("meta"):
            block = Block(self.args, i)
        sd = {k[len(pre):]: v for k, v in self.layer_state(i).items()}
        block.load_state_dict(sd, assign=True, strict=True)
        return block.to(device).eval()

    def embedding(self, device="cpu") -> torch.nn.Embedding:
        w = self.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        return torch.nn.Embedding.from_pretrained(w, freeze=True).to(device)

    def head(self, device="cpu") -> tuple[torch.nn.Module, torch.nn.Linear]:
        """(final RMSNorm, lm_head)."""
        from .model import RMSNorm

        a = self.args
        k = "model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"
        sd = self.read(["model.norm.weight", k])
        norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        norm.weight.data = sd["model.norm.weight"]
        lm = torch.nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        lm.weight.data = sd[k]
        return norm.to(device).eval(), lm.to(device).eval()


# torch dtype -> safetensors' dtype name (the header's "dtype")
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class ShardWriter:
    """Writes tensors in order into safetensors shards of at most ``shard_bytes`` (a tensor larger
    than that gets a shard of its own); ``close()`` names them ``-of-n`` and writes the index (or
    ``model.safetensors`` when one shard suffices).

    Memory: without ``save``, each tensor's bytes go to the shard's data file as it is added
    (nothing is held); ``flush`` then writes the safetensors header (known only once the shard is
    complete) and appends that data file to it, a copy done by the kernel. With ``save`` (a
    ``safetensors.torch.save_file``-like function) the shard's tensors are held until it is saved."""

    def __init__(self, out_dir: str | os.PathLike, shard_bytes: int = 1 << 30, save=None):
        self.dir, self.limit = Path(out_dir), shard_bytes
        self._save = save
        self.pending: dict[str, torch.Tensor] = {}
        self.header: dict[str, dict] = {}              # streamed: the open shard's entries
        self.data = None                               # streamed: the open shard's data file
        self.size, self.parts, self.weight_map, self.total = 0, [], {}, 0

    def _path(self, suffix: str) -> Path:
        return self.dir / f".shard-{len(self.parts) + 1:05d}{suffix}"

    def add(self, name: str, t: torch.Tensor) -> None:
        b = t.numel() * t.element_size()
        if (self.pending or self.header) and self.size + b > self.limit:
            self.flush()
        t = t.detach().contiguous()
        if self._save is not None:
            self.pending[name] = t
        else:
            if t.dtype not in _ST_DTYPES:
                raise EdgekitError(f"{name}: dtype {t.dtype} cannot be stored in safetensors; convert it first")
            if self.data is None:
                self.data = open(self._path(".data"), "wb")
            self.header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                                 "data_offsets": [self.size, self.size + b]}
            self.data.write(t.cpu().reshape(-1).view(torch.uint8).numpy().data)
        self.size += b

    def flush(self) -> None:
        if not (self.pending or self.header):
            return
        f = self._path(".safetensors")
        if self._save is not None:
            self._save(self.pending, str(f), metadata={"format": "pt"})
            names = list(self.pending)
        else:
            self.data.close()
            head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
            head += b" " * (-len(head) % 8)            # data starts 8-byte aligned, as safetensors writes it
            with open(f, "wb", buffering=0) as out, open(self.data.name, "rb", buffering=0) as src:
                out.write(len(head).to_bytes(8, "little") + head)
                _copy(src, out, self.size)
            os.unlink(self.data.name)
            names, self.header, self.data = list(self.header), {}, None
        self.parts.append((f, names))
        self.total += self.size
        self.pending, self.size = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n, files = len(self.parts), []
        for k, (f, names) in enumerate(self.parts):
            final = self.dir / ("model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors")
            os.replace(f, final)
            files.append(final)
            self.weight_map.update(dict.fromkeys(names, final.name))
        if n > 1:
            (self.dir / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2) + "\n")
        return files


def _copy(src, dst, n: int) -> None:
    """Append ``n`` bytes of file ``src`` to file ``dst`` (both unbuffered), in the kernel where it can."""
    done = 0
    while done < n:
        try:
            k = os.copy_file_range(src.fileno(), dst.fileno(), n - done)
        except (AttributeError, OSError):          # no copy_file_range here (other OS, old kernel, filesystem)
            buf = src.read(min(n - done, 1 << 24))
            k = dst.write(buf)
        if not k:
            raise EdgekitError(f"writing {dst.name}: the shard's data ended early; check free disk space")
        done += k
