"""Quantization-aware recovery: the fake-quantized forward is the int8 emulation, gradients pass
straight through, and training under it leaves a student whose int8 version is closer to the teacher."""

import copy

import numpy as np
import pytest
import torch

from edgekit.distill import DistillConfig, distill_, distill_loss
from edgekit.prune import PruneConfig, prune_
from edgekit.qat import QATConfig, fake_quantized, ste_round
from edgekit.quantize.emulate import emulated, fq, units

from .conftest import TINY, tiny_model

TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], 4000)
HELD_OUT = torch.randint(0, TINY["vocab_size"], (4, 48), generator=torch.Generator().manual_seed(3))


def _int8_units(model):
    return {n for n, m in units(model).items() if type(m).__name__ != "Gate"}


def test_ste_round_is_int8_rounding_forward_and_identity_backward():
    x = torch.randn(5, 7, requires_grad=True)
    y = ste_round(x, dim=1)
    assert torch.equal(y.detach(), fq(x.detach(), dim=1))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="int8"):
        QATConfig("int4")


def test_fake_quantized_forward_equals_the_int8_emulation_and_is_undone_on_exit():
    m = tiny_model()
    with torch.no_grad():
        ref = m(HELD_OUT)
        with emulated(m, _int8_units(m)):
            emu = m(HELD_OUT)
        with fake_quantized(m):
            fake = m(HELD_OUT)
        after = m(HELD_OUT)
    diff = (fake - emu).abs().max().item()
    print(f"max |fake-quantized - emulated int8| = {diff:.2e}; |emulated - fp32| = {(emu - ref).abs().max():.2e}")
    assert diff < 1e-4 and (emu - ref).abs().max() > 1e-3, "two implementations of the int8 graph agree"
    assert torch.equal(after, ref), "the stock forward is back"
    assert "forward" not in vars(m.lm_head)


def _int8_kl(student, teacher):
    with torch.no_grad(), emulated(student, _int8_units(student)):
        return distill_loss(student(HELD_OUT), teacher(HELD_OUT)).item()


def test_quantization_aware_recovery_leaves_a_better_int8_student():
    teacher = tiny_model()
    pruned = prune_(copy.deepcopy(teacher), PruneConfig(experts=0.5, ffn=0.25), TOKENS, progress=False)
    kw = dict(steps=60, lr=3e-3, batch_size=4, seq_len=48, progress=False, device="cpu")
    plain = distill_(copy.deepcopy(pruned), teacher, TOKENS, DistillConfig(**kw))
    qat = distill_(copy.deepcopy(pruned), teacher, TOKENS, DistillConfig(**kw, fake_quant="int8"))
    a, b = _int8_kl(plain, teacher), _int8_kl(qat, teacher)
    print(f"held-out KL of the int8 student to the teacher: plain recovery {a:.4f}, quantization-aware {b:.4f}")
    assert b < a
    assert set(qat.state_dict()) == set(plain.state_dict()), "QAT leaves an ordinary checkpoint"
