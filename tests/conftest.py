"""Shared fixtures: tiny random V3 models written as checkpoints (fast on 2 cores)."""

import pytest
import torch

from edgekit.checkpoint import save
from edgekit.model import ModelArgs, Transformer

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
            first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=160)


def tiny_model(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(**{**TINY, **over}))
    with torch.no_grad():  # larger-than-init weights so differences show up in logits
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return m.eval()


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture
def tiny_ckpt(tmp_path):
    return save(tiny_model(), tmp_path / "tiny")
