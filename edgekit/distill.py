"""Recovery by knowledge distillation: train a pruned student to match its unpruned teacher.

What: ``distill_(student, teacher, tokens, config)`` runs ``config.steps`` AdamW steps on random
windows of ``tokens`` (1-D ids), minimising the KL divergence from the teacher's next-token
distribution to the student's (temperature ``T``, scaled by T^2), plus optionally
``hidden_weight`` x the MSE between the final hidden states (relative to the teacher's mean square;
the one hidden state every pruned student still shares with its teacher, whatever layers it lost).

Why KL to the teacher rather than cross-entropy on the text: the teacher's full distribution carries
far more signal per token than the one-hot target, which matters when the recovery text is small
(the shipped calibration split); the student is pulled back towards the model it was cut from
instead of being fine-tuned towards the recovery text.

Quantization-aware recovery: with ``fake_quant="int8"`` the student trains under int8 fake
quantization with a straight-through estimator (``edgekit/qat.py``), so recovery also absorbs the
int8 rounding the bundle will apply; the student's parameters stay fp32 and load/export as usual.

Invariants: the teacher is never modified (no grad, eval mode); the student ends in eval mode on
the device it started on; runs on CUDA when present (``device="auto"``), CPU otherwise; the same
seed gives the same windows. Learning rate: linear warm-up, then cosine to 10%.

MoE dispatch: on CUDA (``moe_dispatch="auto"``) student and teacher run their routed experts in
``model.MoE``'s dense form (three wide GEMMs, no host sync per expert; the same sums and gradients
up to fp rounding), which is what makes thousands of GPU steps affordable on fine-grained MoE; on
the CPU the sparse form, whose FLOPs are k/E of the dense one.

Data-parallel under torchrun (``edgekit.dist``): every rank draws the same global batch of
``batch_size`` windows and runs its contiguous share on FSDP2-sharded copies of student and teacher
(``dist.fsdp_copy``). Each rank's loss is weighted by its share of the batch, so FSDP's gradient
average is the gradient of the global-batch loss: step for step the same updates (and the same
logged loss, ``on_step``) as one process with the same batch, up to fp summation order. Afterwards
the trained parameters are gathered back into ``student`` on every rank.

Failure modes: fewer tokens than one window, a teacher with another vocabulary, or fewer windows
per step than ranks raise ``EdgekitError``; invalid settings raise ``ValueError`` naming the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from .errors import EdgekitError


@dataclass
class DistillConfig:
    steps: int = 200                 # optimizer steps; 0 = no recovery
    lr: float = 2e-4                 # peak AdamW learning rate (1e-3 made small prunes worse)
    batch_size: int = 4              # windows per step
    seq_len: int = 256               # tokens per window
    temperature: float = 1.0         # softening of both distributions (KL is scaled by T^2)
    hidden_weight: float = 0.0       # weight of the final-hidden-state MSE term
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_embeddings: bool = True    # False: embeddings and lm_head stay frozen (less overfitting on tiny text)
    seed: int = 0
    device: str = "auto"             # "auto" (CUDA when present), "cpu", "cuda"
    fake_quant: str = ""             # "": plain fp32 student; "int8"/"int4-experts": quantization-aware (qat.py)
    fake_quant_block: int = 32       # "int4-experts": 4-bit expert weights per block of K
    moe_dispatch: str = "auto"       # "dense": every expert on every token (model.MoE); "sparse"; "auto": dense on CUDA
    progress: bool = True

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps={self.steps}: use >= 0")
        if self.lr <= 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("distill: need lr > 0, batch_size >= 1 and seq_len >= 2")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: use > 0 (1.0 is the plain KL)")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight={self.hidden_weight}: use >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: use 'auto', 'cpu' or 'cuda'")
        if self.moe_dispatch not in ("auto", "dense", "sparse"):
            raise ValueError(f"moe_dispatch={self.moe_dispatch!r}: use 'auto', 'dense' or 'sparse'")
        if self.fake_quant:
            from .qat import QATConfig

            QATConfig(self.fake_quant, experts_block=self.fake_quant_block)


def distill_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, averaged; logits [B, T, V]."""
    V = s_logits.shape[-1]
    s = F.log_softmax(s_logits.float().reshape(-1, V) / temperature, dim=-1)
    t = F.log_softmax(t_logits.float().reshape(-1, V) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def _lr_at(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _device(cfg: DistillConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def distill_(student, teacher, tokens: np.ndarray, config: DistillConfig | None = None,
             on_step: Callable[[int, float], None] | None = None):
    """Train ``student`` in place towards ``teacher`` on windows of ``tokens``; returns ``student``.
    ``on_step(step, loss)`` is called after every step with the loss of the whole (global) batch."""
    cfg = config or DistillConfig()
    if cfg.steps == 0:
        return student
    tokens = np.asarray(tokens, dtype=np.int64)
    seq_len = min(cfg.seq_len, student.args.max_position_embeddings, teacher.args.max_position_embeddings)
    if len(tokens) < seq_len + 1:
        raise EdgekitError(f"recovery text has {len(tokens)} tokens, fewer than one window of "
                           f"{seq_len}; pass more text or a smaller seq_len")
    if student.args.vocab_size != teacher.args.vocab_size:
        raise EdgekitError("student and teacher vocabularies differ; distill from the model the student was cut from")
    w = dist.world()
    if cfg.batch_size < w.size:
        raise EdgekitError(f"distillation batch_size {cfg.batch_size} is smaller than the {w.size} processes; "
                           "use a batch size of at least the number of ranks")
    if w.enabled:
        with dist.quiet_fsdp():
            dev = dist.device(cfg.device)
            sharded = dist.fsdp_copy(student, dev)
            _train(sharded, dist.fsdp_copy(teacher, dev), tokens, seq_len, cfg, on_step)
            dist.copy_full_(student, sharded)
        return student.eval()
    home = next(student.parameters()).device
    dev = _device(cfg)
    teacher_home = next(teacher.parameters()).device
    try:
        _train(student.to(dev), teacher.to(dev), tokens, seq_len, cfg, on_step)
    finally:
        student.to(home).eval()
        teacher.to(teacher_home)
    return student


def _train(student, teacher, tokens: np.ndarray, seq_len: int, cfg: DistillConfig, on_step):
    """The optimisation loop, under int8 fake quantization when ``cfg.fake_quant``; under torchrun
    ``student``/``teacher`` are FSDP2 copies and this rank runs its share of each global batch."""
    from contextlib import nullcontext

    from .model import dense_dispatch
    from .qat import QATConfig, fake_quantized

    student.train()
    teacher.eval()
    dev = next(student.parameters()).device
    frozen = () if cfg.train_embeddings else ("model.embed_tokens.", "lm_head.")
    params = [p for n, p in student.named_parameters() if not n.startswith(frozen)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    mine = dist.shard_range(cfg.batch_size)
    # FSDP averages gradients over ranks; weighting each rank's mean loss by its share of the batch
    # makes that average the gradient of the global-batch mean (1.0 in one process)
    weight = (mine.stop - mine.start) * dist.world().size / cfg.batch_size
    it = range(cfg.steps)
    if cfg.progress and dist.world().is_main:
        from tqdm import tqdm
        it = tqdm(it, desc="recover (KD)", unit="step", leave=False)
    dense = cfg.moe_dispatch == "dense" or (cfg.moe_dispatch == "auto" and dev.type == "cuda")
    with fake_quantized(student, QATConfig(cfg.fake_quant, experts_block=cfg.fake_quant_block)) \
            if cfg.fake_quant else nullcontext(), dense_dispatch(student, dense), dense_dispatch(teacher, dense):
        for step in it:
            starts = rng.integers(0, len(tokens) - seq_len + 1, cfg.batch_size)[mine]  # same draw on every rank
            ids = torch.from_numpy(np.stack([tokens[s: s + seq_len] for s in starts])).to(dev)  # [B_rank, T]
            with torch.no_grad():
                t_logits, _, _, t_hid = teacher.forward_cached(ids, return_hidden=True)
            s_logits, _, _, s_hid = student.forward_cached(ids, return_hidden=True)
            loss = distill_loss(s_logits, t_logits, cfg.temperature)
            if cfg.hidden_weight:
                ref = t_hid[-1].float()
                sq, n = dist.all_reduce_sums([ref.pow(2).sum(), ref.numel()])   # the global batch's mean square
                loss = loss + cfg.hidden_weight * F.mse_loss(s_hid[-1].float(), ref) / (sq / n)
            loss = loss * weight
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            global_loss = dist.mean_over_ranks(loss)  # every rank, every step: never a collective on one rank only
            if on_step is not None:
                on_step(step, global_loss.item())
            if step % 10 == 0 and hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{global_loss.item():.4f}")
