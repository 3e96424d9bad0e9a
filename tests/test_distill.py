"""Distillation recovery: the loss is a KL, training moves the student towards the teacher only."""

import copy

import numpy as np
import pytest
import torch

from edgekit.distill import DistillConfig, distill_, distill_loss
from edgekit.errors import EdgekitError
from edgekit.prune import PruneConfig, prune_

from .conftest import TINY, tiny_model

TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], 4000)
HELD_OUT = torch.randint(0, TINY["vocab_size"], (4, 48), generator=torch.Generator().manual_seed(3))


def test_distill_loss_is_zero_for_the_teacher_and_positive_otherwise():
    t = torch.randn(2, 5, 11)
    assert distill_loss(t, t).item() == pytest.approx(0, abs=1e-6)
    assert distill_loss(t + 1.0, t).item() == pytest.approx(0, abs=1e-5), "a constant shift is the same distribution"
    assert distill_loss(torch.randn(2, 5, 11), t).item() > 0.01
    assert distill_loss(torch.randn(2, 5, 11), t, temperature=2.0).item() > 0


def _kl(student, teacher):
    with torch.no_grad():
        return distill_loss(student(HELD_OUT), teacher(HELD_OUT)).item()


def test_distillation_pulls_a_pruned_student_towards_its_teacher():
    teacher = tiny_model()
    student = prune_(copy.deepcopy(teacher), PruneConfig(heads=0.5, ffn=0.5), TOKENS, progress=False)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    kl0 = _kl(student, teacher)
    cfg = DistillConfig(steps=40, lr=3e-3, batch_size=4, seq_len=48, hidden_weight=0.1, progress=False)
    distill_(student, teacher, TOKENS, cfg)
    kl1 = _kl(student, teacher)
    assert kl1 < 0.7 * kl0, f"held-out KL to teacher {kl0:.4f} -> {kl1:.4f} after 40 steps"
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before_t[k])]
    assert not changed, f"teacher modified: {changed[:3]}"
    assert not student.training and not teacher.training


def test_frozen_embeddings_stay_put_and_zero_steps_is_a_no_op():
    teacher = tiny_model()
    student = prune_(copy.deepcopy(teacher), PruneConfig(experts=0.5), TOKENS, progress=False)
    emb, head = student.model.embed_tokens.weight.clone(), student.lm_head.weight.clone()
    distill_(student, teacher, TOKENS, DistillConfig(steps=0))
    assert torch.equal(emb, student.model.embed_tokens.weight)
    distill_(student, teacher, TOKENS, DistillConfig(steps=3, seq_len=32, batch_size=2, train_embeddings=False,
                                                     progress=False))
    assert torch.equal(emb, student.model.embed_tokens.weight) and torch.equal(head, student.lm_head.weight)


def test_bad_inputs_name_the_fix():
    with pytest.raises(EdgekitError, match="fewer than one window"):
        distill_(tiny_model(), tiny_model(1), TOKENS[:10], DistillConfig(steps=1, seq_len=32))
    with pytest.raises(EdgekitError, match="vocabularies"):
        distill_(tiny_model(), tiny_model(vocab_size=64), TOKENS, DistillConfig(steps=1, seq_len=32))
    for kw in (dict(steps=-1), dict(temperature=0), dict(device="tpu"), dict(hidden_weight=-1)):
        with pytest.raises(ValueError):
            DistillConfig(**kw)
