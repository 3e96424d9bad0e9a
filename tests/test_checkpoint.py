"""Checkpoint I/O: round trip, Hugging Face parity, and one-line errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgekit.checkpoint import load, save
from edgekit.errors import EdgekitError

from .conftest import tiny_model


def test_round_trip_is_exact(tiny, tmp_path):
    save(tiny, tmp_path / "m")
    back = load(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert torch.equal(tiny(ids), back(ids))


def test_tied_embeddings_round_trip(tmp_path):
    m = tiny_model(tie_word_embeddings=True)
    save(m, tmp_path / "t")
    assert "lm_head.weight" not in load_file(tmp_path / "t" / "model.safetensors")
    back = load(tmp_path / "t")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


def test_save_is_atomic_on_failure(tiny, tmp_path, monkeypatch):
    import edgekit.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(RuntimeError):
        save(tiny, tmp_path / "x")
    assert list(tmp_path.iterdir()) == [], "a failed save must leave nothing behind"


def _corrupt(d, how):
    f = d / "model.safetensors"
    cfg = json.loads((d / "config.json").read_text())
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garbage":
        f.write_bytes(b"\x00\x01not a safetensors file")
    elif how == "model_type":
        cfg["model_type"] = "llama"
    elif how == "shape":
        cfg["kv_lora_rank"] = 12
    elif how == "nan":
        sd = load_file(f)
        sd["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("nan")
        save_file(sd, f)
    elif how == "missing":
        sd = load_file(f)
        del sd["model.norm.weight"]
        save_file(sd, f)
    elif how == "pickle":
        f.unlink()
        (d / "pytorch_model.bin").write_bytes(b"x")
    elif how == "config_json":
        (d / "config.json").write_text("{not json")
        return
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how,msg", [
    ("truncated", "corrupt or truncated"), ("garbage", "corrupt or truncated"),
    ("model_type", "not a DeepSeek-V3-family"), ("shape", "shape"), ("nan", "NaN"),
    ("missing", "lacks tensor"), ("pickle", "never unpickles"), ("config_json", "not valid JSON"),
])
def test_bad_checkpoints_fail_with_the_fix(tiny_ckpt, how, msg):
    _corrupt(tiny_ckpt, how)
    with pytest.raises(EdgekitError, match=msg) as e:
        load(tiny_ckpt)
    assert "\n" not in str(e.value)


def test_mtp_layers_are_skipped_with_a_note(tiny_ckpt, capsys):
    f = tiny_ckpt / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, f)
    load(tiny_ckpt)
    assert "multi-token-prediction" in capsys.readouterr().err
