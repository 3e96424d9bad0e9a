"""Streamed stages (one layer in memory) equal the in-memory ones bit for bit: calibration
statistics, pruned checkpoint, smoothed checkpoint, evaluation; also from an fp8 checkpoint."""

import copy

import numpy as np
import pytest
import torch

from edgekit.checkpoint import load
from edgekit.errors import EdgekitError
from edgekit.evaluate import evaluate
from edgekit.lazy import CheckpointReader
from edgekit.prune import PruneConfig, prune_
from edgekit.prune.stats import collect_stats
from edgekit.smooth import SmoothConfig, smooth_
from edgekit.stream import collect_stats_streamed, evaluate_streamed, prune_streamed, smooth_streamed

TOKENS = np.random.default_rng(0).integers(0, 128, 1400)


def _equal_state(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    print(f"{what}: max abs diff {worst:.2e} over {len(sa)} tensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa), what


def test_streamed_stats_equal_in_memory(tiny_ckpt):
    ref = collect_stats(load(tiny_ckpt), TOKENS, seq_len=64, batch_size=4)
    got = collect_stats_streamed(CheckpointReader(tiny_ckpt), TOKENS, seq_len=64, batch_size=4)
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        for f in ("tokens", "block_influence", "head_norm", "ffn_act_sq", "shared_act_sq", "expert_act_sq",
                  "expert_count", "expert_gate_sum", "expert_reap_sum"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or (torch.equal(x, y) if torch.is_tensor(x) else x == y), f


@pytest.mark.parametrize("cfg", [dict(experts=0.5, heads=0.25), dict(ffn=0.25, layers=1)])
def test_streamed_prune_writes_the_same_checkpoint(tiny_ckpt, tmp_path, cfg):
    config = PruneConfig(calib_seq_len=64, **cfg)
    a = prune_(load(tiny_ckpt), config, TOKENS, progress=False)     # what prune_checkpoint saves
    st = prune_streamed(tiny_ckpt, tmp_path / "st", config, TOKENS, shard_bytes=20_000)
    assert (st / "model.safetensors.index.json").exists()
    b = load(st)
    assert a.args == b.args
    _equal_state(a, b, f"pruned {cfg}")


def test_streamed_prune_refuses_distillation(tiny_ckpt, tmp_path):
    with pytest.raises(EdgekitError, match="recover_steps = 0"):
        prune_streamed(tiny_ckpt, tmp_path / "x", PruneConfig(experts=0.5, recover_steps=5), TOKENS)
    assert not (tmp_path / "x").exists()


def test_streamed_smoothing_writes_the_same_checkpoint(tiny_ckpt, tmp_path):
    cfg = SmoothConfig(calib_seq_len=64, calib_max_tokens=1000, search_rows=96)
    m = load(tiny_ckpt)
    ref = smooth_(m, TOKENS, cfg)
    rep = smooth_streamed(tiny_ckpt, tmp_path / "s", TOKENS, cfg)
    assert rep == ref and any(v["alpha"] is not None for v in rep.values())
    _equal_state(m, load(tmp_path / "s"), "smoothed")


def test_streamed_evaluation_equals_in_memory(tiny_ckpt):
    ref = evaluate(load(tiny_ckpt), TOKENS, seq_len=100, batch_size=4, progress=False)
    # a tiny hidden-state budget: rows go through the layers in several groups
    got = evaluate_streamed(tiny_ckpt, TOKENS, seq_len=100, batch_size=4, max_hidden_bytes=4 * 100 * 32 * 4)
    print("eval", ref, got)
    assert got == ref


def test_streamed_from_fp8_checkpoint_equals_loaded_model(tmp_path):
    from edgekit.synth import synth

    d = synth("v3-nano", tmp_path / "f8", seed=1, dtype="fp8", shard_bytes=8 << 20)
    toks = TOKENS[:600] * 7 % 4096
    model = load(d)
    ref = collect_stats(copy.deepcopy(model), toks, seq_len=64, batch_size=4)
    got = collect_stats_streamed(d, toks, seq_len=64, batch_size=4)
    assert all(torch.equal(a.head_norm, b.head_norm) and torch.equal(a.expert_reap_sum, b.expert_reap_sum)
               for a, b in zip(ref[1:], got[1:]))
    assert evaluate_streamed(d, toks, seq_len=64, batch_size=4) == evaluate(model, toks, seq_len=64, batch_size=4,
                                                                             progress=False)


def test_device_choice(monkeypatch):
    from edgekit.device import pick, where

    assert pick("cpu").type == "cpu" and where(pick("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick("auto").type == "cpu"
    with pytest.raises(EdgekitError, match="sees no CUDA GPU"):
        pick("cuda")
    with pytest.raises(EdgekitError, match="use one of"):
        pick("tpu")


def test_shard_writer_streams_tensors_into_readable_shards(tmp_path):
    """ShardWriter without ``save`` writes each tensor's bytes as it comes (nothing held) and the
    header at flush: safetensors reads back every dtype the checkpoints use, in shards of the
    limit, exactly as ``save_file`` wrote them."""
    from safetensors.torch import load_file, save_file

    from edgekit.lazy import ShardWriter

    g = torch.Generator().manual_seed(0)
    ts = {"w": torch.randn(64, 48, generator=g), "ids": torch.arange(7), "h": torch.randn(9, generator=g).half(),
          "b": torch.randn(5, generator=g).bfloat16(), "s": torch.tensor(2.5), "m": torch.tensor([True, False]),
          "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn), "big": torch.randn(300, 40, generator=g)}
    out = {}
    for name, save in (("streamed", None), ("buffered", save_file)):
        (tmp_path / name).mkdir()
        w = ShardWriter(tmp_path / name, shard_bytes=16 << 10, save=save)
        for k, v in ts.items():
            w.add(k, v[1:] if k == "w" else v)          # a non-contiguous view is stored as its values
        files = w.close()
        out[name] = {k: v for f in files for k, v in load_file(str(f)).items()}
        print(name, [f.name for f in files], [f.stat().st_size for f in files])
        assert len(files) == 2 and (tmp_path / name / "model.safetensors.index.json").exists()
        assert sorted(p.name for p in (tmp_path / name).iterdir() if p.name.startswith(".")) == []
    def raw(t):                                          # torch.equal has no float8 kernel: compare bytes
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for k, v in ts.items():
        want = raw(v[1:] if k == "w" else v)
        for name in out:
            got = raw(out[name][k])
            assert got.dtype == want.dtype and torch.equal(got, want), (name, k)
