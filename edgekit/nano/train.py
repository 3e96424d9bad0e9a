"""Train a shipped DeepSeek-V3-family reference model (v3-nano or v3-mini) on its corpus.

What: ``python -m edgekit.nano.train --model v3-nano|v3-mini --out DIR [--steps N] [--device auto]
[--time-budget-s S]`` reads the model's train tokens (see "Tokens"), trains its config
(``specs.py``) on random ``--seq``-token windows with AdamW (linear warmup, cosine decay to
``min_lr_ratio``, decoupled weight decay on matrices, grad-norm clipping), prints held-out losses
every ``--eval-every`` steps (per domain for v3-mini), and writes ``DIR`` with
``edgekit.checkpoint.save(..., dtype=<the spec's storage dtype>)`` (router weights stay fp32) plus
``training.json`` holding the full recipe and results. ``--max-shard-mb`` splits the weights into
shards (the device tool returns files of <= 16 MiB).

Tokens: the train text is tokenized once into ``.corpus/tokens/<model>/train.u16`` (+ ``train.json``
recording the tokenizer's and the corpus manifest's sha256); ``--prepare-only`` does just that. A
run reads that file when its recorded hashes match the repo's tokenizer and manifest, so a machine
without the corpus (the GPU host) needs only that directory, not the Debian packages.

V3 specifics: aux-loss-free load balancing. A forward hook on every ``Gate`` counts the tokens routed
to each expert during the step; after the optimizer step each gate's ``e_score_correction_bias``
moves by ``bias_update_speed * sign(mean_load - load_e)`` (DeepSeek-V3 paper, sec. 2.1.2). The bias
only affects which experts are selected, never the mixing weights.

Speed: on CUDA, MoE layers run "dense dispatch" (every expert on every token, outputs weighted by
a [tokens, experts] combine matrix that is zero off the selected experts). It is the same function
as ``MoE.forward`` (checked by ``check_dense_moe``), but has no data-dependent shapes, so no host
syncs; the tiny experts make the extra FLOPs negligible. bf16 autocast on CUDA; fp32 on CPU.

Model selection: validation loss on the ``calib`` split is tracked at every eval and the weights
with the best one are saved (the ``eval`` split is only reported, never used for a choice).

Time budget: after ``TIMING_STEPS`` steps the script times itself and, if the planned steps would
not fit ``--time-budget-s``, re-plans fewer steps (the cosine schedule follows the new plan;
warmup is unaffected). It also stops hard at the budget. ``training.json`` records both.

Invariants: seeded (python/torch/data generator); on CPU two runs give identical weights. On CUDA
atomics in index ops make runs bit-inexact but statistically identical.

Failure modes: missing train text/tokens or tokenizer, or a token file made with another tokenizer
or corpus, raise ``SystemExit`` with the command to run; a non-finite loss stops training with an
error naming the step.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import save
from ..data import load_text
from ..model import Gate, ModelArgs, MoE, Transformer
from . import shards
from .corpus import SEPARATOR, sha256_hex
from .specs import NANO_CONFIG, SPECS, ModelSpec

__all__ = ["NANO_CONFIG", "encode_split", "train"]
TIMING_STEPS = 20          # steps 5..20 are timed to re-plan against the time budget
SAVE_RESERVE_S = 30.0      # time kept back from the budget for the final eval and save


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def encode_split(tok, text: str) -> torch.Tensor:
    """1-D int64 ids; documents are encoded in parallel, each followed by <|eos|> (id 1),
    identical to ``tok.encode(text)`` because the byte-level pre-tokenizer splits at specials."""
    eos = tok.token_to_id(SEPARATOR)
    docs = [d for d in text.split(SEPARATOR) if d]
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def prepare_tokens(spec: ModelSpec, tokenizer: Path, texts: list[Path], out: Path | None = None) -> Path:
    """Tokenize the train texts into ``out/train.u16`` (+ ``train.json``: hashes, per-text spans)."""
    from tokenizers import Tokenizer

    out = out or spec.tokens_dir
    for p in texts:
        if not p.exists():
            raise SystemExit(f"error: {p} not found; run `{spec.corpus_command}`")
    tok = Tokenizer.from_file(str(tokenizer))
    if tok.get_vocab_size() > 2 ** 16:
        raise SystemExit(f"error: vocab {tok.get_vocab_size()} does not fit uint16 token files")
    parts, spans, at = [], {}, 0
    stems = [p.name.removesuffix(".gz").removesuffix(".txt") for p in texts]
    names = stems if len(set(stems)) == len(stems) else [f"{p.parent.name}/{s}" for p, s in zip(texts, stems)]
    for name, p in zip(names, texts):
        ids = encode_split(tok, load_text(str(p))).numpy().astype(np.uint16)
        spans[name] = [at, at + len(ids)]
        at += len(ids)
        parts.append(ids)
    out.mkdir(parents=True, exist_ok=True)
    np.concatenate(parts).tofile(out / "train.u16.tmp")
    (out / "train.u16.tmp").replace(out / "train.u16")
    meta = {"model": spec.name, "tokens": at, "spans": spans, "dtype": "uint16",
            "tokenizer_sha256": sha256_hex(tokenizer.read_bytes()),
            "manifest_sha256": sha256_hex(spec.manifest.read_bytes())}
    (out / "train.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_train_tokens(spec: ModelSpec, tokenizer: Path, out: Path | None = None) -> tuple[torch.Tensor, dict]:
    """The prepared train tokens, after checking they were made with this tokenizer and corpus."""
    out = out or spec.tokens_dir
    meta = json.loads((out / "train.json").read_text())
    want = {"tokenizer_sha256": sha256_hex(tokenizer.read_bytes()),
            "manifest_sha256": sha256_hex(spec.manifest.read_bytes())}
    stale = [k for k, v in want.items() if meta.get(k) != v]
    if stale:
        raise SystemExit(f"error: {out / 'train.u16'} was made with another {stale[0].split('_')[0]}; re-run "
                         f"`python -m edgekit.nano.train --model {spec.name} --prepare-only`")
    ids = np.fromfile(out / "train.u16", dtype=np.uint16)
    if len(ids) != meta["tokens"]:
        raise SystemExit(f"error: {out / 'train.u16'} is truncated; re-run with --prepare-only")
    return torch.from_numpy(ids.astype(np.int64)), meta


def eval_windows(ids: torch.Tensor, seq: int) -> torch.Tensor:
    """Non-overlapping [N, seq + 1] rows (inputs + next-token targets), as edgekit.data.windows."""
    n = (len(ids) - 1) // seq
    return torch.stack([ids[i * seq: i * seq + seq + 1] for i in range(n)])


def sample_batch(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] random windows of ``ids`` (on ids' device); offsets from the CPU generator."""
    starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
    idx = starts.to(ids.device)[:, None] + torch.arange(seq + 1, device=ids.device)
    return ids[idx]


# ---------------------------------------------------------------------------------------------
# model pieces specific to training
# ---------------------------------------------------------------------------------------------
def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-style init: N(0, std) for every matrix and embedding; norms keep weight 1."""
    for _name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=std)


def dense_moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Same function as ``MoE.forward``: every expert on every token, weighted by a combine matrix
    that is zero off the chosen experts (no data-dependent shapes, so no host syncs)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])                                          # [N, D]
    weights, indices = moe.gate(x)                                        # [N, k]
    combine = torch.zeros(x.shape[0], len(moe.experts), device=x.device, dtype=weights.dtype)
    combine = combine.scatter(1, indices, weights)                        # [N, E]
    wg = torch.stack([e.gate_proj.weight for e in moe.experts])           # [E, I, D]
    wu = torch.stack([e.up_proj.weight for e in moe.experts])
    wd = torch.stack([e.down_proj.weight for e in moe.experts])           # [E, D, I]
    h = F.silu(torch.einsum("nd,eid->nei", x, wg)) * torch.einsum("nd,eid->nei", x, wu)
    h = h * combine.unsqueeze(-1).to(h.dtype)
    y = torch.einsum("nei,edi->nd", h, wd)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x)
    return y.view(shape)


def use_dense_moe(model: Transformer) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.forward = dense_moe_forward.__get__(m)


def check_dense_moe(model: Transformer, tol: float = 1e-4) -> float:
    """Max |dense - sparse| over a random input on every MoE layer (fp32); raises if over ``tol``."""
    worst = 0.0
    for m in model.modules():
        if isinstance(m, MoE):
            x = torch.randn(2, 37, model.args.hidden_size, device=next(m.parameters()).device)
            with torch.no_grad():
                worst = max(worst, (MoE.forward(m, x) - dense_moe_forward(m, x)).abs().max().item())
    if worst > tol:
        raise RuntimeError(f"dense MoE dispatch differs from MoE.forward by {worst:.2e}")
    return worst


class LoadTracker:
    """Counts tokens routed to each expert per gate (forward hooks) and applies V3's bias update."""

    def __init__(self, model: Transformer, speed: float):
        self.speed = speed
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        self.counts = [torch.zeros(g.weight.shape[0], device=g.weight.device) for g in self.gates]
        self.handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if module.training:
                idx = output[1].reshape(-1)
                self.counts[i] += torch.bincount(idx, minlength=self.counts[i].numel()).float()
        return hook

    @torch.no_grad()
    def update(self) -> torch.Tensor:
        """Apply b_e += speed * sign(mean_load - load_e); return max/mean load per gate; reset."""
        ratios = []
        for g, c in zip(self.gates, self.counts):
            g.e_score_correction_bias += self.speed * torch.sign(c.mean() - c)
            ratios.append(c.max() / c.mean().clamp_min(1))
            c.zero_()
        return torch.stack(ratios)


# ---------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------
def make_optimizer(model: Transformer, lr: float, wd: float, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def lm_loss(model: Transformer, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        logits = model(rows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model: Transformer, rows: torch.Tensor, device: torch.device, batch: int) -> float:
    """Mean next-token NLL over all rows (token-weighted)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(rows), batch):
        r = rows[i: i + batch].to(device)
        total += lm_loss(model, r, device).item() * r[:, 1:].numel()
        n += r[:, 1:].numel()
    model.train(was)
    return total / n


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="v3-nano", choices=sorted(SPECS), help="which reference model to train")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint directory (required unless --prepare-only)")
    ap.add_argument("--prepare-only", action="store_true", help="tokenize the train text into --tokens and stop")
    ap.add_argument("--tokens", type=Path, default=None, help="prepared-token directory (default .corpus/tokens/MODEL)")
    ap.add_argument("--steps", type=int, default=2200, help="planned optimizer steps (sets the schedule)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--bias-update-speed", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--time-budget-s", type=float, default=0.0, help="0: none")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the model's shipped tokenizer.json")
    ap.add_argument("--train-text", type=Path, nargs="*", default=None,
                    help="tokenize these instead of reading prepared tokens (default: prepared, else the corpus)")
    ap.add_argument("--max-shard-mb", type=float, default=0.0, help="0: one model.safetensors")
    ap.add_argument("--eval-max-rows", type=int, default=0, help="0: all eval/calib windows")
    a = ap.parse_args(argv)
    a.spec = SPECS[a.model]
    a.tokenizer = a.tokenizer or a.spec.tokenizer
    if a.out is None and not a.prepare_only:
        ap.error("--out is required (or pass --prepare-only)")
    return a


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def load_data(a: argparse.Namespace, device: torch.device):
    """Train ids (on ``device``), their per-domain spans, and the held-out rows by name."""
    from tokenizers import Tokenizer

    spec = a.spec
    if not a.tokenizer.exists():
        raise SystemExit(f"error: {a.tokenizer} not found; run `python -m edgekit.nano.tokenizer --model "
                         f"{spec.name} --out {a.tokenizer.parent}`")
    tok = Tokenizer.from_file(str(a.tokenizer))
    tokens_dir = a.tokens or spec.tokens_dir
    if a.train_text:
        ids = torch.cat([encode_split(tok, load_text(str(p))) for p in a.train_text])
        spans = {"train": [0, len(ids)]}
    else:
        if not (tokens_dir / "train.json").exists():
            prepare_tokens(spec, a.tokenizer, spec.train_texts(), tokens_dir)
        ids, meta = load_train_tokens(spec, a.tokenizer, tokens_dir)
        spans = meta["spans"]
    held = {}
    for name, path in spec.heldout_paths().items():
        rows = eval_windows(encode_split(tok, load_text(str(path))), a.seq)
        held[name] = rows[: a.eval_max_rows] if a.eval_max_rows else rows
    return ids.to(device), spans, held


def heldout_losses(model: Transformer, held: dict, device: torch.device, batch: int) -> dict[str, float]:
    """Loss per held-out split, plus token-weighted ``calib`` and ``eval`` over the domains."""
    out = {name: eval_loss(model, rows, device, batch) for name, rows in held.items()}
    for kind in ("calib", "eval"):
        names = [n for n in held if n.split("/")[-1] == kind]
        if names and kind not in out:
            w = [held[n][:, 1:].numel() for n in names]
            out[kind] = sum(out[n] * k for n, k in zip(names, w)) / sum(w)
    return out


def train(a: argparse.Namespace) -> dict:
    t0 = time.time()
    device = pick_device(a.device)
    gen = seed_all(a.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = a.spec
    train_ids, spans, held = load_data(a, device)
    print(f"device {device}; {spec.name}; train {len(train_ids):,} tokens "
          f"({', '.join(f'{k} {v[1] - v[0]:,}' for k, v in spans.items())}); held-out "
          + ", ".join(f"{k} {v.numel():,}" for k, v in held.items()) + f" (rows of {a.seq + 1})", flush=True)

    args = ModelArgs(**spec.config)
    model = Transformer(args)
    init_weights(model)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    dense = device.type == "cuda"
    if dense:
        print(f"dense MoE dispatch, max |dense - sparse| = {check_dense_moe(model):.1e}", flush=True)
        use_dense_moe(model)
    tracker = LoadTracker(model, a.bias_update_speed)
    opt = make_optimizer(model, a.lr, a.weight_decay, fused=device.type == "cuda")

    from tqdm import tqdm

    total, log, best = a.steps, [], {"calib_loss": float("inf"), "step": 0, "state": None}
    budget = a.time_budget_s
    t_train = time.time()
    bar = tqdm(range(a.steps), desc="train", unit="step", mininterval=2.0, file=sys.stdout)
    step, tokens, t_mark, stopped_by_budget = 0, 0, None, False
    loss_ema, imbalance = None, None
    for step in bar:
        if step >= total:
            break
        if budget and time.time() - t0 > budget - SAVE_RESERVE_S:
            stopped_by_budget = True
            break
        lr = lr_at(step, total, a.lr, a.warmup, a.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = sample_batch(train_ids, a.batch, a.seq, gen)
        loss = lm_loss(model, rows, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        imbalance = tracker.update()
        tokens += rows[:, 1:].numel()

        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_mark = time.time()
        if step == TIMING_STEPS and budget:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_mark) / (TIMING_STEPS - 5)
            fit = int((budget - SAVE_RESERVE_S - (time.time() - t0)) / (per_step * 1.08)) + step
            if fit < total:
                print(f"\nre-planning: {per_step * 1e3:.0f} ms/step, {total} steps do not fit "
                      f"{budget:.0f}s; planning {fit}", flush=True)
                total = fit
        if step % 50 == 0 or step == total - 1:
            lv = loss.item()
            if not math.isfinite(lv):
                raise SystemExit(f"error: loss is {lv} at step {step}; lower --lr")
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
            bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.1e}", gnorm=f"{gnorm.item():.2f}",
                            maxload=f"{imbalance.max().item():.2f}")
        if (step + 1) % a.eval_every == 0 or step == total - 1:
            losses = heldout_losses(model, held, device, a.batch)
            cl, el = losses["calib"], losses["eval"]
            log.append({"step": step + 1, "tokens": tokens, "train_loss": round(loss.item(), 4),
                        "calib_loss": round(cl, 4), "eval_loss": round(el, 4), "lr": lr,
                        **({"eval_loss_by_domain": {k.split("/")[0]: round(v, 4) for k, v in losses.items()
                                                    if k.endswith("/eval")}} if spec.domains else {}),
                        "max_over_mean_expert_load": [round(v, 3) for v in imbalance.tolist()],
                        "elapsed_s": round(time.time() - t0, 1)})
            bar.write(f"step {step + 1}: train {loss.item():.4f} calib {cl:.4f} eval {el:.4f} "
                      f"ppl {math.exp(el):.2f} maxload {imbalance.max().item():.2f}")
            if cl < best["calib_loss"]:
                best = {"calib_loss": cl, "eval_loss": el, "step": step + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    bar.close()
    steps_done = step if stopped_by_budget else min(step + 1, total)
    train_wall = time.time() - t_train

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    final = heldout_losses(model, held, device, a.batch)
    print(f"selected step {best['step']}: calib {final['calib']:.4f} eval {final['eval']:.4f} "
          f"(ppl {math.exp(final['eval']):.2f})", flush=True)

    recipe = {
        "model": spec.name,
        "config": spec.config,
        "params": n_params,
        "seed": a.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "moe_dispatch": "dense (same function as MoE.forward)" if dense else "sparse (MoE.forward)",
        "optimizer": {"name": "AdamW", "lr": a.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": a.weight_decay, "weight_decay_on": "params with dim >= 2",
                      "grad_clip": a.grad_clip, "warmup_steps": a.warmup, "schedule": "linear warmup, cosine",
                      "min_lr_ratio": a.min_lr_ratio, "init": "normal(0, 0.02) for matrices"},
        "load_balancing": {"method": "aux-loss-free bias (DeepSeek-V3)", "bias_update_speed": a.bias_update_speed},
        "batch": a.batch, "seq_len": a.seq, "tokens_per_step": a.batch * a.seq,
        "steps_requested": a.steps, "steps_planned": total, "steps_done": steps_done,
        "stopped_by_time_budget": stopped_by_budget, "time_budget_s": a.time_budget_s,
        "tokens_seen": tokens, "train_tokens_unique": len(train_ids),
        **({"domains": list(spec.domains),
            "train_tokens_by_domain": {k: v[1] - v[0] for k, v in spans.items()},
            "final_eval_loss_by_domain": {k.split("/")[0]: round(v, 4) for k, v in final.items()
                                          if k.endswith("/eval")}} if spec.domains else {}),
        "epochs": round(tokens / len(train_ids), 2),
        "selected_step": best["step"], "selection": "lowest calib-split loss among periodic evals",
        "final_calib_loss": round(final["calib"], 4), "final_eval_loss": round(final["eval"], 4),
        "final_eval_ppl": round(math.exp(final["eval"]), 3),
        "final_eval_note": f"bf16/fp32 training-time value on "
                           f"{sum(v.shape[0] for k, v in held.items() if k.split('/')[-1] == 'eval')} "
                           f"eval windows of {a.seq}",
        "train_wall_s": round(train_wall, 1), "total_wall_s": round(time.time() - t0, 1),
        "corpus_manifest_sha256": sha256_hex(spec.manifest.read_bytes()),
        "corpus_manifest": spec.manifest.name,
        "tokenizer": f"byte-level BPE, vocab {spec.config['vocab_size']}, <|bos|>=0 <|eos|>=1 (edgekit.nano.tokenizer)",
        "storage_dtype": f"{spec.storage_dtype} (router weights fp32)",
        "command": "python -m edgekit.nano.train " + " ".join(sys.argv[1:]),
        "log": log,
    }
    write_checkpoint(model, a, recipe)
    return recipe


def write_checkpoint(model: Transformer, a: argparse.Namespace, recipe: dict) -> None:
    model = model.float().cpu().eval()
    for m in model.modules():              # restore the stock MoE.forward before saving
        if isinstance(m, MoE):
            m.__dict__.pop("forward", None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_bytes(a.tokenizer.read_bytes())
        save(model, a.out, tokenizer_from=tmp, dtype=getattr(torch, a.spec.storage_dtype),
             extra_files={"training.json": json.dumps(recipe, indent=1) + "\n"})
    if a.max_shard_mb:
        shards.shard(a.out, int(a.max_shard_mb * 2 ** 20))
    print(f"wrote {a.out}: " + ", ".join(sorted(p.name for p in a.out.iterdir())), flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.prepare_only:
        out = prepare_tokens(a.spec, a.tokenizer, a.train_text or a.spec.train_texts(), a.tokens)
        print(f"wrote {out / 'train.u16'}: {json.loads((out / 'train.json').read_text())['spans']}")
        return 0
    r = train(a)
    print(json.dumps({k: r[k] for k in ("steps_done", "tokens_seen", "final_eval_loss", "final_eval_ppl",
                                        "train_wall_s", "device")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
