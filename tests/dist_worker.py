"""One rank of the 2-process tests in test_dist.py; launched by ``python -m torch.distributed.run``.

Usage: ``dist_worker.py MODE WORK`` with WORK holding ``src/`` (a tiny checkpoint with a tokenizer)
and receiving ``out/`` (what edgekit writes) and ``result.*`` (what rank 0 reports to the test).

- ``library``: calibration statistics and 3 distillation steps (per-step loss, final weights) on
  both ranks, which rank 0 reports; compress's distributed prune stage into ``out/cache``; then
  ``edgekit prune --recipe WORK/recipe.toml`` (the CLI, as torchrun would start it) writes
  ``out/pruned``.
- ``kill-commit``: rank 1 dies (SIGKILL) once rank 0 has begun writing the checkpoint.
- ``kill-step``: rank 1 dies (SIGKILL) in its second distillation step.

On every rank but 0 the writers (``checkpoint.save``, the atomic staging helpers) are replaced by
ones that fail, so a write from another rank shows up as an error.
"""

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tomli_w
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit import atomic, checkpoint, dist  # noqa: E402
from edgekit.data import load_tokens  # noqa: E402
from edgekit.distill import DistillConfig, distill_  # noqa: E402
from edgekit.pipeline import STAGE_CONFIGS, Texts, prune_on_all_ranks  # noqa: E402
from edgekit.prune import PruneConfig, prune_, prune_checkpoint  # noqa: E402
from edgekit.prune.stats import collect_stats  # noqa: E402
from edgekit.recipes import load_recipe  # noqa: E402
from edgekit.stagecache import StageCache  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

VOCAB = 4096  # the shipped tokenizer's, so the shipped calib split tokenizes into this model
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 3000)
# dense MoE dispatch under FSDP here; the one-process reference in test_dist.py runs the sparse form
DISTILL = DistillConfig(steps=3, lr=1e-3, batch_size=4, seq_len=32, hidden_weight=0.1, progress=False,
                        moe_dispatch="dense")
PRUNE = dict(experts=0.5, heads=0.25, ffn=0.25, recover_steps=3, calib_seq_len=32, calib_max_tokens=1024,
             recover_seq_len=32, recover_batch_size=4)
RECIPE = tomli_w.dumps({"target": {"name": "dist-test"}, "prune": PRUNE})
CKPT_PRUNE = PruneConfig(**PRUNE)


def teacher():
    return tiny_model(vocab_size=VOCAB)


def student(t):
    return prune_(copy.deepcopy(t), PruneConfig(experts=0.5, heads=0.25), TOKENS, progress=False)


def _forbid_writes():
    def fail(*a, **k):
        raise AssertionError(f"rank {dist.world().rank} tried to write")
    checkpoint.save = atomic.atomic_dir = atomic.staging_dir = dist.staging_dir = fail


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def library(work: Path):
    stats = collect_stats(teacher(), TOKENS, seq_len=32, batch_size=3)
    t = teacher()
    s = student(t)
    losses = []
    distill_(s, t, TOKENS, DISTILL, on_step=lambda i, v: losses.append(v))
    if dist.world().is_main:
        flat = {f"{i}.{k}": torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                for i, st in enumerate(stats) for k, v in vars(st).items() if v is not None}
        save_file(flat, str(work / "result.stats.safetensors"))
        save_file({k: v.contiguous() for k, v in s.state_dict().items()}, str(work / "result.student.safetensors"))
        (work / "result.json").write_text(json.dumps({"losses": losses, "world_size": dist.world().size}))
    # compress's distributed stage: the prune (+recover) stage-cache entry, written by rank 0
    src, recipe = work / "src", load_recipe(str(work / "recipe.toml"), STAGE_CONFIGS)
    calib = load_tokens("calib", checkpoint.load_tokenizer(src))
    texts = Texts(calib, calib, calib, None, "calib", "calib")
    row = prune_on_all_ranks(src, recipe, texts, StageCache(work / "out" / "cache"))
    assert row["world_size"] == 2 and not row["cached"], row
    from edgekit.cli import cli  # last: the command leaves the process group when done

    cli.main(["prune", str(work / "src"), "--recipe", str(work / "recipe.toml"), "-o", str(work / "out" / "pruned")],
             standalone_mode=False)


def kill_commit(work: Path):
    if dist.world().rank == 1:
        def agree(ok):                         # rank 0 is writing: wait for its staging dir, then die
            deadline = time.monotonic() + 60
            while not list((work / "out").glob(".pruned.tmp-*")) and time.monotonic() < deadline:
                time.sleep(0.01)
            _die()
        dist.agree = agree
    prune_checkpoint(work / "src", work / "out" / "pruned", CKPT_PRUNE, progress=False)


def kill_step(work: Path):
    if dist.world().rank == 1:
        import edgekit.distill as d
        calls, loss = [], d.distill_loss

        def dying_loss(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                _die()
            return loss(*a, **k)
        d.distill_loss = dying_loss
    prune_checkpoint(work / "src", work / "out" / "pruned", CKPT_PRUNE, progress=False)


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    w = dist.init_from_env()
    assert w.size == 2, w
    if not w.is_main:
        _forbid_writes()
    {"library": library, "kill-commit": kill_commit, "kill-step": kill_step}[mode](work)
    dist.shutdown()
