"""SmoothQuant folding: scales on a constructed case, fp32 logits and routing unchanged, error lowered."""

import numpy as np
import pytest
import torch

from edgekit.export.graph import LatentDecoder
from edgekit.smooth import SmoothConfig, group_error, smooth_, smooth_scales

from .conftest import tiny_model


def test_smooth_scales_constructed():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 1.0])
    s = smooth_scales(act, w, 0.5)
    want = torch.tensor([2.0, 0.5, 1.0, 3.0])           # sqrt(a)/sqrt(w); unseen channel -> 1
    assert torch.allclose(s, want), f"got {s.tolist()} want {want.tolist()}"
    s1 = smooth_scales(act, w, 1.0, min_scale=1e-3, max_scale=1e3)
    assert torch.allclose(s1, torch.tensor([4.0, 1.0, 1.0, 9.0])), s1.tolist()
    assert torch.allclose(smooth_scales(act, w, 0.0), (1 / w).clamp(1e-2, 1e2) * (act > 0) + (act == 0))


def test_smoothing_lowers_int8_error_on_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    x[:, 3] *= 60                                         # one outlier channel, as in LLM activations
    w = torch.randn(48, 32, generator=g)
    s = smooth_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    before, after = group_error(x, [w], None), group_error(x, [w], s)
    assert after < 0.5 * before, f"smoothing should cut the error: before {before:.2e} after {after:.2e}"


@pytest.mark.parametrize("groups", [("input_layernorm", "post_attention_layernorm", "q_a_layernorm"),
                                    ("input_layernorm", "post_attention_layernorm", "q_a_layernorm",
                                     "kv_a_layernorm")])
def test_fp32_logits_and_routing_unchanged(groups):
    m = tiny_model()
    calib = np.random.default_rng(0).integers(0, 128, 600)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 128, (2, 40)))
    routes = {}

    def hook(i):
        return lambda _m, _a, out: routes.setdefault(i, []).append(out[1].sort(-1)[0])
    hs = [b.mlp.gate.register_forward_hook(hook(i)) for i, b in enumerate(m.model.layers) if hasattr(b.mlp, "gate")]
    with torch.no_grad():
        before = m(ids)
        dec_before = LatentDecoder(m)(ids[:, 20:], *[torch.zeros(2, 0, 24)] * 3, torch.tensor(20),
                                torch.zeros(2, dtype=torch.long))[0]
        rep = smooth_(m, calib, SmoothConfig(groups=groups, calib_seq_len=64, search_rows=128))
        after = m(ids)
        dec_after = LatentDecoder(m)(ids[:, 20:], *[torch.zeros(2, 0, 24)] * 3, torch.tensor(20),
                                torch.zeros(2, dtype=torch.long))[0]  # absorbed path
    for h in hs:
        h.remove()
    diff = (before - after).abs()
    assert diff.max() <= 1e-4, f"fp32 logits moved: max {diff.max():.2e} mean {diff.mean():.2e}"
    ddiff = (dec_before - dec_after).abs().max()
    assert ddiff <= 1e-4, f"absorbed-attention logits moved: max {ddiff:.2e}"
    for i, r in routes.items():
        # calls: full forward, absorbed forward, calibration..., full forward, absorbed forward
        assert torch.equal(r[0], r[-2]) and torch.equal(r[1], r[-1]), f"layer {i}: routing changed by smoothing"
    assert any(v["alpha"] is not None for v in rep.values()), f"nothing smoothed: {rep}"
    assert all(v["error_after"] <= v["error_before"] + 1e-12 for v in rep.values()), rep


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="alpha"):
        SmoothConfig(alpha=1.5)
    with pytest.raises(ValueError, match="groups"):
        SmoothConfig(groups=("o_proj",))
