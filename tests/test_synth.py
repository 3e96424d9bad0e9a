"""Named shapes and ``edgekit synth``: shapes as the issues give them, random-init checkpoints that
load in edgekit and in transformers, written shard by shard, same weights for the same seed."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import edgekit.shapes as shapes
import edgekit.synth as synth_mod
from edgekit.checkpoint import load
from edgekit.info import describe, shape_info
from edgekit.synth import synth

TINY_SHAPE = """
[tiny]
vocab_size = 4096
hidden_size = 32
num_hidden_layers = 3
intermediate_size = 64
num_attention_heads = 4
q_lora_rank = 24
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 8
v_head_dim = 8
n_routed_experts = 8
num_experts_per_tok = 2
moe_intermediate_size = 16
n_group = 2
topk_group = 1
max_position_embeddings = 64
"""


@pytest.fixture
def tiny_shape(tmp_path, monkeypatch):
    f = tmp_path / "shapes.toml"
    f.write_text(shapes.SHAPES_FILE.read_text() + TINY_SHAPE)
    monkeypatch.setattr(shapes, "SHAPES_FILE", f)
    return "tiny"


def test_named_shapes_as_the_issues_give_them():
    assert {"v3-nano", "v3-50m", "v3-400m", "v3-1.6b"} <= set(shapes.shape_names())
    a = shapes.shape_args("v3-1.6b")
    got = (a.hidden_size, a.num_hidden_layers, a.for_layer(0).dense, a.intermediate_size, a.n_routed_experts,
           a.num_experts_per_tok, a.n_group, a.topk_group, a.n_shared_experts, a.moe_intermediate_size,
           a.num_attention_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim,
           a.v_head_dim, a.vocab_size)
    assert got == (1536, 20, True, 4096, 32, 4, 4, 2, 1, 512, 12, 768, 256, 64, 32, 64, 4096)
    info = shape_info("v3-1.6b")
    print("v3-1.6b params", info["params_total"])
    assert 1.58e9 < info["params_total"] < 1.60e9          # the issue's 1,593M
    i400 = shape_info("v3-400m")
    assert 4.6e8 < i400["params_total"] < 4.8e8 and 1.8e9 < 4 * i400["params_total"] < 2.0e9
    # v3-nano's shape is the shipped model's
    assert shape_info("v3-nano")["params_total"] == describe()["params_total"]


def test_info_cli_accepts_a_shape_name():
    r = subprocess.run([sys.executable, "-m", "edgekit.cli", "info", "v3-1.6b", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == "v3-1.6b" and round(info["params_total"] / 1e6) == 1593


def test_synth_loads_in_edgekit_and_transformers(tiny_shape, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = synth(tiny_shape, tmp_path / "ck", seed=3, shard_bytes=40_000)
    assert (d / "model.safetensors.index.json").exists() and (d / "tokenizer.json").exists()
    ours = load(d)
    w = ours.model.layers[1].mlp.experts[0].up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.004 and torch.equal(ours.model.norm.weight, torch.ones(32))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d).eval()
    ids = torch.randint(0, 4096, (2, 19))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"synth checkpoint: edgekit vs transformers max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_synth_same_seed_same_weights_any_sharding(tiny_shape, tmp_path):
    a = load(synth(tiny_shape, tmp_path / "a", seed=1))
    b = load(synth(tiny_shape, tmp_path / "b", seed=1, shard_bytes=30_000))
    c = load(synth(tiny_shape, tmp_path / "c", seed=2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    m = synth_mod.random_model(shapes.shape_args(tiny_shape), seed=1)         # in memory, same values
    sm = m.state_dict()
    assert sm.keys() == sa.keys() and all(torch.equal(sa[k], sm[k]) for k in sa)
    h = load(synth(tiny_shape, tmp_path / "h", seed=1, dtype="bf16"))
    k = "model.layers.2.self_attn.o_proj.weight"
    with safe_open(str(tmp_path / "h" / "model.safetensors"), "pt") as f:
        assert f.get_slice(k).get_dtype() == "BF16"
        assert f.get_slice("model.layers.2.mlp.gate.weight").get_dtype() == "F32"
    assert torch.equal(h.state_dict()[k], sa[k].to(torch.bfloat16).float())


def test_synth_holds_one_shard_at_a_time(tiny_shape, tmp_path, monkeypatch):
    sizes, real = [], synth_mod.save_file

    def spy(tensors, path, **kw):
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real(tensors, path, **kw)

    monkeypatch.setattr(synth_mod, "save_file", spy)
    synth(tiny_shape, tmp_path / "s", shard_bytes=50_000)
    biggest = 4096 * 32 * 4                                   # one embedding/head matrix, fp32
    print("bytes per save_file call", sizes)
    # a shard holds tensors up to the limit, or one tensor larger than it on its own
    assert len(sizes) >= 5 and all(s <= 50_000 or s == biggest for s in sizes)


def test_synth_bad_input_exit_2_nothing_written(tmp_path):
    for args in (["synth", "v3-nope", "-o", str(tmp_path / "x")],
                 ["synth", "v3-nano"]):
        r = subprocess.run([sys.executable, "-m", "edgekit.cli", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.iterdir())
