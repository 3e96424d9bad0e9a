"""edgekit's model equals transformers' DeepseekV3ForCausalLM on checkpoints written by save_pretrained."""

import pytest
import torch

from edgekit.checkpoint import load, save

transformers = pytest.importorskip("transformers")

HF = dict(vocab_size=120, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
          num_attention_heads=4, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
          first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
          v_head_dim=8, max_position_embeddings=64)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1)


def _hf_model(**over):
    torch.manual_seed(0)
    m = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**HF, **over})).eval()
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for n, b in m.named_buffers():
            if "e_score" in n:
                b.uniform_(-0.1, 0.1)
    return m


@pytest.mark.parametrize("over,shard", [
    ({}, None), ({}, "20KB"), ({"q_lora_rank": None}, None), ({"rope_parameters": YARN}, None),
    ({"rope_interleave": False, "tie_word_embeddings": True}, None),
])
def test_logits_match_transformers(tmp_path, over, shard):
    hf = _hf_model(**over)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", **kw)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load(tmp_path / "hf")
    ids = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, f"max abs diff vs transformers {diff:.2e} ({over}, shard={shard})"


def test_our_checkpoint_loads_in_transformers(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    save(ours, tmp_path / "ours")
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 120, (1, 17))
    with torch.no_grad():
        diff = (back(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, f"transformers reading edgekit's checkpoint: max abs diff {diff:.2e}"
