"""Structured pruning: importance criteria on constructed cases, surgery exactness, save/load round trip."""

import json

import numpy as np
import pytest
import torch

import edgekit.prune.importance as imp
from edgekit.checkpoint import load, save
from edgekit.errors import EdgekitError
from edgekit.info import param_count
from edgekit.prune import PruneConfig, prune_, prune_checkpoint, removed_nothing
from edgekit.prune.importance import channel_scores, expert_scores, top_indices
from edgekit.prune.stats import collect_stats
from edgekit.prune.surgery import regroup

from .conftest import TINY, tiny_model

CALIB = np.random.default_rng(0).integers(0, TINY["vocab_size"], 2400)
IDS = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


def _diff(a, b):
    d = (a - b).abs()
    return d.max().item(), d.mean().item()


# -- importance criteria: pure functions, answers known by construction ---------------------------
def test_top_indices_sorted_and_ties_to_lower_index():
    assert top_indices(torch.tensor([1.0, 3.0, 3.0, 0.5, 2.0]), 3).tolist() == [1, 2, 4]
    assert top_indices(torch.tensor([2.0, 2.0, 2.0]), 2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        top_indices(torch.tensor([1.0]), 0)


def test_expert_criteria_disagree_where_they_should():
    # expert 0: routed often, tiny outputs; expert 1: rare but strong; expert 2: medium on both
    count = torch.tensor([100.0, 2.0, 20.0, 0.0])
    gate_sum = torch.tensor([50.0, 1.8, 10.0, 0.0])
    reap_sum = torch.tensor([10.0, 20.0, 40.0, 0.0])      # mean g*||out||: 0.1, 10, 2, 0
    assert imp.keep_experts(count, gate_sum, reap_sum, 2, "reap").tolist() == [1, 2]
    assert imp.keep_experts(count, gate_sum, reap_sum, 2, "frequency").tolist() == [0, 2]
    assert imp.keep_experts(count, gate_sum, reap_sum, 2, "contribution").tolist() == [1, 2]
    assert imp.keep_experts(count, gate_sum, reap_sum, 1, "contribution").tolist() == [2]
    assert expert_scores(count, gate_sum, reap_sum)[3] == 0, "unrouted expert must score 0"
    with pytest.raises(ValueError, match="reap"):
        expert_scores(count, gate_sum, reap_sum, "magnitude")


def test_channel_scores_need_both_activation_and_weight():
    act_sq = torch.tensor([4.0, 100.0, 1.0, 0.0])
    down = torch.tensor([[1.0, 0.0, 3.0, 9.0], [0.0, 0.0, 4.0, 9.0]])   # column norms 1, 0, 5, 12.7
    assert torch.allclose(channel_scores(act_sq, down), torch.tensor([2.0, 0.0, 5.0, 0.0]))
    assert imp.keep_channels(act_sq, down, 2).tolist() == [0, 2]


def test_heads_and_layers_keep_the_influential():
    assert imp.keep_heads(torch.tensor([0.3, 0.0, 2.0, 0.1]), 2).tolist() == [0, 2]
    assert imp.keep_layers([0.5, 0.01, 0.2, 0.03], 2) == [0, 2]
    with pytest.raises(ValueError):
        imp.keep_layers([0.1, 0.2], 2)


def test_regroup_keeps_whole_groups_and_stays_valid():
    assert regroup([2, 3, 4, 5, 6, 7], 8, 2, 4, 2) == (3, 2), "whole groups must survive as groups"
    for kept in ([0, 1, 2, 3, 4, 5], [0, 2, 4, 6], [1, 5, 7], [3]):
        for k in (1, 2):
            g, tg = regroup(kept, 8, min(k, len(kept)), 4, 2)
            assert len(kept) % g == 0 and 1 <= tg <= g and tg * (len(kept) // g) >= min(k, len(kept)), (kept, g, tg)


# -- statistics from hooks on constructed models ------------------------------------------------
def _silence(m, layer, heads=(), experts=(), ffn=None):
    """Zero what makes the chosen units contribute nothing (and never route to ``experts``)."""
    with torch.no_grad():
        blk = m.model.layers[layer]
        v = TINY["v_head_dim"]
        for h in heads:
            blk.self_attn.o_proj.weight[:, h * v:(h + 1) * v] = 0
        for e in experts:
            blk.mlp.gate.e_score_correction_bias[e] = -1e4
        if ffn is not None:
            mlps = [blk.mlp] if not hasattr(blk.mlp, "experts") else [*blk.mlp.experts, blk.mlp.shared_experts]
            for mlp in mlps:
                mlp.down_proj.weight[:, ffn] = 0


def test_stats_see_dead_heads_experts_and_identity_layers():
    m = tiny_model()
    _silence(m, 1, heads=(0, 2), experts=(4, 5, 6, 7))
    with torch.no_grad():                      # layer 2 becomes the identity
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        for mlp in [*m.model.layers[2].mlp.experts, m.model.layers[2].mlp.shared_experts]:
            mlp.down_proj.weight.zero_()
    st = collect_stats(m, CALIB, seq_len=64)
    assert st[1].head_norm[[0, 2]].abs().max() == 0 and st[1].head_norm[[1, 3]].min() > 0, st[1].head_norm
    assert st[1].expert_count[4:].sum() == 0, f"experts 4-7 are never routed: {st[1].expert_count}"
    assert st[1].expert_count.sum() == st[1].tokens * TINY["num_experts_per_tok"], st[1].expert_count
    assert (st[1].expert_reap_sum > 0).tolist() == (st[1].expert_count > 0).tolist(), st[1].expert_reap_sum
    assert st[2].block_influence < 1e-6 < min(st[0].block_influence, st[1].block_influence), \
        [s.block_influence for s in st]


def test_stats_hooks_leave_the_forward_alone_and_ignore_batching():
    """Block influence from the hooks equals the one from the model's own hidden states, whatever the
    batch size (a pre-hook that returned a value used to replace down_proj's input)."""
    from edgekit.data import windows

    m = tiny_model()
    rows = torch.from_numpy(windows(CALIB[:97], 32)[:, :-1])
    with torch.no_grad():
        hid = m.forward_cached(rows, return_hidden=True)[3]
    ref = [float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean()) for a, b in zip(hid, hid[1:])]
    for bs in (1, 3):
        got = [s.block_influence for s in collect_stats(m, CALIB[:97], seq_len=32, batch_size=bs)]
        assert np.allclose(got, ref, rtol=1e-5), f"batch {bs}: block influence {got} vs hidden states {ref}"


# -- surgery: removing zero-importance parts leaves logits unchanged -----------------------------
@pytest.mark.parametrize("kind", ["heads", "experts", "ffn", "layers"])
def test_pruning_dead_units_keeps_logits(kind):
    m = tiny_model()
    half = torch.arange(0, TINY["moe_intermediate_size"], 2)
    for i in range(TINY["num_hidden_layers"]):
        if kind == "heads":
            _silence(m, i, heads=(1, 3))
        elif kind == "experts" and i >= 1:
            _silence(m, i, experts=(4, 5, 6, 7))
        elif kind == "ffn":
            _silence(m, i, ffn=torch.arange(0, TINY["intermediate_size"], 2) if i == 0 else half)
    if kind == "layers":
        with torch.no_grad():
            m.model.layers[1].self_attn.o_proj.weight.zero_()
            for mlp in [*m.model.layers[1].mlp.experts, m.model.layers[1].mlp.shared_experts]:
                mlp.down_proj.weight.zero_()
    with torch.no_grad():
        ref = m(IDS)
    n0 = param_count(m)
    cfg = PruneConfig(layers=1) if kind == "layers" else PruneConfig(**{kind: 0.5})
    prune_(m, cfg, CALIB, progress=False)
    with torch.no_grad():
        out = m(IDS)
    mx, mean = _diff(ref, out)
    assert mx < 1e-4, f"{kind}: pruning dead units changed logits: max {mx:.2e} mean {mean:.2e}"
    assert param_count(m) < n0 and not m.args.layer_overrides, (param_count(m), n0, m.args.layer_overrides)


def test_prune_save_load_round_trip_with_per_layer_plan(tmp_path):
    m = tiny_model()
    cfg = PruneConfig(heads=0.25, ffn=0.25, per_layer={"1": {"experts": 0.5}, "2": {"heads": 0.5, "experts": 0.25}})
    prune_(m, cfg, CALIB, progress=False)
    a = m.args
    assert a.for_layer(1).n_routed_experts == 4 and a.for_layer(2).n_routed_experts == 6, a.layer_overrides
    assert a.for_layer(2).num_attention_heads == 2 and a.for_layer(0).num_attention_heads == 3, a.layer_overrides
    assert a.for_layer(0).intermediate_size == 48 and a.moe_intermediate_size == 12
    back = load(save(m, tmp_path / "pruned"))
    with torch.no_grad():
        mx, mean = _diff(m(IDS), back(IDS))
    assert mx < 1e-5, f"reloaded pruned model differs: max {mx:.2e} mean {mean:.2e}"
    assert param_count(back) == param_count(m)
    assert not any("mask" in k for k in back.state_dict())


def test_removing_the_dense_layer_renumbers_into_a_plain_config(tmp_path):
    m = tiny_model()
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.zero_()
        m.model.layers[0].mlp.down_proj.weight.zero_()
    prune_(m, PruneConfig(layers=1, experts=0.25), CALIB, progress=False)
    a = m.args
    assert a.num_hidden_layers == 2 and a.first_k_dense_replace == 0 and not a.layer_overrides, a
    assert a.n_routed_experts == 6 and a.num_experts_per_tok == 2 and a.n_routed_experts % a.n_group == 0
    back = load(save(m, tmp_path / "p"))
    with torch.no_grad():
        assert _diff(m(IDS), back(IDS))[0] < 1e-5


def test_extreme_expert_pruning_lowers_top_k():
    m = tiny_model()
    prune_(m, PruneConfig(experts=0.9), CALIB, progress=False)
    assert m.args.n_routed_experts == 1 and m.args.num_experts_per_tok == 1, m.args
    assert torch.isfinite(m(IDS)).all()


def test_recovery_runs_and_keeps_shapes():
    m = tiny_model()
    prune_(m, PruneConfig(experts=0.5, recover_steps=3, recover_seq_len=32, recover_batch_size=2), CALIB,
           progress=False)
    assert m.args.n_routed_experts == 4 and not m.training and torch.isfinite(m(IDS)).all()


# -- config validation and checkpoint path --------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    (dict(experts=1.0), "fraction removed"), (dict(heads=-0.1), "fraction removed"),
    (dict(layers=-1), ">= 0"), (dict(expert_criterion="norm"), "reap"),
    (dict(per_layer={"x": {"experts": 0.5}}), "layer index"),
    (dict(per_layer={"1": {"channels": 0.5}}), "keys among"),
])
def test_config_errors_name_the_fix(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PruneConfig(**kw)


def test_plan_errors_are_user_errors():
    with pytest.raises(EdgekitError, match="layers"):
        prune_(tiny_model(), PruneConfig(layers=3), CALIB, progress=False)
    with pytest.raises(EdgekitError, match="per_layer"):
        prune_(tiny_model(), PruneConfig(per_layer={7: {"heads": 0.5}}), CALIB, progress=False)


def test_prune_checkpoint_writes_a_smaller_reloadable_checkpoint(tmp_path):
    out = prune_checkpoint(None, tmp_path / "nano-pruned", PruneConfig(experts=0.5, calib_max_tokens=512),
                           progress=False)
    small, big = load(out), load(None)
    assert param_count(small) < 0.75 * param_count(big), (param_count(small), param_count(big))
    assert (out / "tokenizer.json").exists() and (out / "prune.json").exists()
    assert not removed_nothing(out)


def test_removed_nothing_reads_the_prune_record(tmp_path):
    # the pipeline skips scoring the "pruned" model only when its record shows it unchanged
    out = prune_checkpoint(None, tmp_path / "same", PruneConfig(experts=0.0, calib_max_tokens=256), progress=False)
    assert removed_nothing(out)
    same = dict(load(out).state_dict())
    assert all(torch.equal(v, same[k]) for k, v in load(None).state_dict().items())
    rec = json.loads((out / "prune.json").read_text())
    rec["config"]["recover_steps"] = 5           # distilled weights differ even with nothing removed
    (out / "prune.json").write_text(json.dumps(rec))
    assert not removed_nothing(out)


def test_pruned_model_exports_to_onnx_matching_torch(tmp_path, moe="contrib"):
    from edgekit.export import ExportConfig, export, verify

    m = tiny_model()
    prune_(m, PruneConfig(heads=0.25, ffn=0.25, per_layer={"2": {"experts": 0.5}}), CALIB, progress=False)
    assert m.args.layer_overrides == {"2": {"n_routed_experts": 4}}, m.args.layer_overrides
    r = verify(m, export(m, tmp_path / "onnx", ExportConfig(moe=moe, simplify=False)), prompt_lens=(1, 9), steps=8)
    assert r["passed"], f"ORT vs torch after pruning ({moe}): {r}"
