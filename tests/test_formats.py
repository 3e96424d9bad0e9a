"""Real checkpoint formats: fp8 e4m3 with 128x128 block scales (ragged last blocks), bf16, fp16,
sharded with an index, MTP layers skipped; edgekit's logits equal transformers' run on the
dequantized weights; broken files are one-line errors with exit code 2."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgekit import fp8
from edgekit.checkpoint import load
from edgekit.errors import EdgekitError
from edgekit.lazy import CheckpointReader

transformers = pytest.importorskip("transformers")

# sizes that are not multiples of 128, so most weights have ragged last blocks and several blocks
HF = dict(vocab_size=120, hidden_size=160, intermediate_size=200, moe_intermediate_size=72, num_hidden_layers=3,
          num_attention_heads=2, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
          first_k_dense_replace=1, kv_lora_rank=48, q_lora_rank=136, qk_rope_head_dim=8, qk_nope_head_dim=16,
          v_head_dim=16, max_position_embeddings=64)
BLOCK = 128


def _hf_model():
    torch.manual_seed(0)
    m = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**HF)).eval()
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for n, b in m.named_buffers():
            if "e_score" in n:
                b.uniform_(-0.1, 0.1)
    return m


def _fp8_block(w: torch.Tensor):
    """The test's own block quantizer (not edgekit's): per 128x128 block, scale = amax / 448."""
    n, k = w.shape
    s = torch.empty(math.ceil(n / BLOCK), math.ceil(k / BLOCK))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            blk = w[bi * BLOCK:(bi + 1) * BLOCK, bj * BLOCK:(bj + 1) * BLOCK]
            s[bi, bj] = blk.abs().max().clamp_min(1e-12) / 448.0
            q[bi * BLOCK:(bi + 1) * BLOCK, bj * BLOCK:(bj + 1) * BLOCK] = (blk / s[bi, bj]).to(torch.float8_e4m3fn)
    return q, s


def _deq_block(q, s):
    out = q.float().clone()
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            out[bi * BLOCK:(bi + 1) * BLOCK, bj * BLOCK:(bj + 1) * BLOCK] *= s[bi, bj]
    return out


def write_fp8_checkpoint(hf, d):
    """DeepSeek-V3's release layout: *_proj weights fp8 + weight_scale_inv, the rest bf16 (router fp32),
    two shards + index, one MTP layer (index 3). Returns the dequantized state the model should get."""
    d.mkdir()
    sd, deq = hf.state_dict(), {}
    shards = [{}, {}]
    for i, (k, v) in enumerate(sd.items()):
        shard = shards[i % 2]
        if v.dim() == 2 and k.endswith("_proj.weight"):
            q, s = _fp8_block(v)
            shard[k], shard[k + "_scale_inv"] = q, s
            deq[k] = _deq_block(q, s)
        elif ".gate." in k or v.dim() < 2:
            shard[k], deq[k] = v.float(), v.float()
        else:
            shard[k] = v.to(torch.bfloat16)
            deq[k] = shard[k].float()
    q, s = _fp8_block(torch.randn(160, 320))                     # an MTP layer: never read
    shards[1]["model.layers.3.eh_proj.weight"], shards[1]["model.layers.3.eh_proj.weight_scale_inv"] = q, s
    wmap = {}
    for j, sh in enumerate(shards):
        name = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file(sh, str(d / name), metadata={"format": "pt"})
        wmap.update(dict.fromkeys(sh, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    cfg = hf.config.to_dict()
    cfg.update(num_nextn_predict_layers=1, torch_dtype="bfloat16",
               quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [BLOCK, BLOCK]})
    (d / "config.json").write_text(json.dumps(cfg))
    return deq


def test_fp8_block_quantizer_round_trip_and_ragged_blocks():
    torch.manual_seed(1)
    for shape in [(300, 200), (128, 128), (1, 129), (257, 5)]:
        w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
        q, s = fp8.quantize(w)
        assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
        d = fp8.dequantize(q, s)
        ref = _deq_block(q, s)                                   # the test's own block loop
        assert torch.equal(d, ref)
        err = (d - w).abs()
        bound = w.abs() * 2 ** -4 + s.max() * 2 ** -6           # e4m3: 3 mantissa bits; subnormals near 0
        assert (err <= bound).all(), f"{shape}: worst {(err - bound).max():.3e}"


def test_fp8_sharded_checkpoint_equals_transformers_on_dequantized_weights(tmp_path, capsys):
    hf = _hf_model()
    deq = write_fp8_checkpoint(hf, tmp_path / "fp8")
    ours = load(tmp_path / "fp8")
    assert "multi-token-prediction" in capsys.readouterr().err
    missing, unexpected = hf.load_state_dict(deq, strict=False)
    assert not unexpected and all("rotary" in k or "e_score" in k for k in missing), missing
    ids = torch.randint(0, 120, (2, 33))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"fp8 checkpoint: max abs logit diff vs transformers on the dequantized weights {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_match_transformers(tmp_path, dtype):
    hf = _hf_model().to(dtype)
    hf.save_pretrained(tmp_path / "h", max_shard_size="200KB")
    ours = load(tmp_path / "h")
    assert (tmp_path / "h" / "model.safetensors.index.json").exists()
    # transformers reading the same file, computing in fp32 (its rotary tables are recomputed, not rounded)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "h", dtype=torch.float32).eval()
    ids = torch.randint(0, 120, (2, 21))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"{dtype} checkpoint: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_reader_streams_layers_equal_to_load(tmp_path):
    hf = _hf_model()
    write_fp8_checkpoint(hf, tmp_path / "fp8")
    r = CheckpointReader(tmp_path / "fp8")
    model = load(tmp_path / "fp8")
    ref = model.state_dict()
    for i in range(r.args.num_hidden_layers):
        st = r.layer_state(i)
        assert st and all(torch.equal(v, ref[k]) and v.dtype == torch.float32 for k, v in st.items())
        blk = r.layer(i)
        assert all(torch.equal(v, ref[f"model.layers.{i}.{k}"]) for k, v in blk.state_dict().items())
    assert all(torch.equal(v, ref[k]) for k, v in r.global_state().items())


def _break(d, how):
    idx = d / "model.safetensors.index.json"
    wmap = json.loads(idx.read_text())
    shard = d / "model-00002-of-00002.safetensors"
    if how == "corrupt_shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "missing_index_entry":
        del wmap["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
        idx.write_text(json.dumps(wmap))
    elif how == "index_points_wrong":
        k = next(k for k, f in wmap["weight_map"].items() if f == shard.name and "layers.2" in k)
        wmap["weight_map"][k] = "model-00001-of-00002.safetensors"
        idx.write_text(json.dumps(wmap))
    elif how in ("scale_shape", "no_scale"):
        for f in d.glob("model-*.safetensors"):
            sd = load_file(f)
            k = "model.layers.2.mlp.shared_experts.up_proj.weight_scale_inv"
            if k in sd:
                if how == "scale_shape":
                    sd[k] = torch.ones(1, 1)
                else:
                    del sd[k]
                save_file(sd, f)
        if how == "no_scale":
            del wmap["weight_map"]["model.layers.2.mlp.shared_experts.up_proj.weight_scale_inv"]
            idx.write_text(json.dumps(wmap))
    elif how == "quant_method":
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["quant_method"] = "gptq"
        (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how,msg", [
    ("corrupt_shard", "corrupt or truncated"), ("missing_index_entry", "has no entry for"),
    ("index_points_wrong", "the index and the shards disagree"), ("scale_shape", "blocks needs (1, 2)"),
    ("no_scale", "has no model.layers.2.mlp.shared_experts.up_proj.weight_scale_inv"),
    ("quant_method", "quant_method='gptq' is not supported"),
])
def test_broken_fp8_checkpoints_fail_with_one_line(tmp_path, how, msg):
    write_fp8_checkpoint(_hf_model(), tmp_path / "c")
    _break(tmp_path / "c", how)
    with pytest.raises(EdgekitError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        load(tmp_path / "c")
    assert "\n" not in str(e.value)
    if how in ("corrupt_shard", "missing_index_entry", "scale_shape"):
        p = subprocess.run([sys.executable, "-m", "edgekit.cli", "info", str(tmp_path / "c")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        lines = [x for x in p.stderr.strip().splitlines() if not x.startswith("note:")]
        assert len(lines) == 1 and msg.split("(")[0] in lines[0], p.stderr


def test_synth_fp8_loads_and_matches_fp32_synth(tmp_path):
    from edgekit.info import describe
    from edgekit.synth import synth

    a = load(synth("v3-nano", tmp_path / "f32", seed=4))
    b = load(synth("v3-nano", tmp_path / "f8", seed=4, dtype="fp8", shard_bytes=4 << 20))
    assert (tmp_path / "f8" / "model.safetensors.index.json").exists()
    sa, sb = a.state_dict(), b.state_dict()
    k = "model.layers.3.mlp.experts.5.down_proj.weight"
    assert (sa[k] - sb[k]).abs().max() <= sa[k].abs().max() * 2 ** -4
    assert describe(str(tmp_path / "f8"))["params_total"] == describe(str(tmp_path / "f32"))["params_total"]
