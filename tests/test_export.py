"""ONNX export: onnxruntime fp32 vs torch (logits, greedy tokens, max positions), both MoE paths,
the export directory's spec and metadata, external data, and a torch-free runtime."""

import json
import shutil
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
import torch

import edgekit
from edgekit.errors import EdgekitError
from edgekit.evaluate import evaluate
from edgekit.export import ExportConfig, cache_bytes_per_token, export, model_hash, verify
from edgekit.export.parity import torch_greedy
from edgekit.runtime import OrtModel

from .conftest import tiny_model

MOE_PATHS = ["contrib", "portable"]


@pytest.fixture(scope="module")
def tiny_m():
    return tiny_model()   # max_position_embeddings 160: prompt 128 + 32 steps fits


@pytest.fixture(scope="module", params=MOE_PATHS)
def exported(request, tiny_m, tmp_path_factory):
    d = export(tiny_m, tmp_path_factory.mktemp(request.param) / "onnx", ExportConfig(moe=request.param))
    return request.param, d, OrtModel(d, spinning=False)   # spinning ORT threads would slow torch


def test_parity_prompt_lengths_and_greedy(tiny_m, exported):
    moe, d, om = exported
    r = verify(tiny_m, d, prompt_lens=(1, 7, 128), steps=32, ort_model=om)
    assert r["passed"], f"{moe}: {json.dumps(r['runs'], indent=1)}"
    assert [x["new_tokens"] for x in r["runs"]] == [32, 32, 32]


def test_batch_prefill_then_decode(tiny_m, exported):
    moe, _, om = exported
    ids = torch.randint(0, tiny_m.args.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    got, ref = om.generate_greedy(ids.numpy(), 12), torch_greedy(tiny_m, ids, 12)
    assert (got == ref).all(), f"{moe}: batch-3 tokens differ at {np.argwhere(got != ref)[:5].tolist()}"
    logits, cache = om.prefill(ids.numpy())
    with torch.no_grad():
        full = tiny_m(torch.cat([ids, ids[:, :2]], 1)).numpy()
    step1 = om.decode(ids[:, 0].numpy(), cache)
    step2 = om.decode(ids[:, 1].numpy(), cache)
    for name, a, b in [("prefill", logits, full[:, 8]), ("decode1", step1, full[:, 9]),
                       ("decode2", step2, full[:, 10])]:
        diff = np.abs(a - b)
        assert diff.max() <= 1e-4, f"{moe} {name}: max {diff.max():.2e} mean {diff.mean():.2e}"
    assert cache.length == 11
    feed = {"input_ids": ids.numpy(), **{n: np.zeros((3, 0, om.width), np.float32) for n in om._past}}
    all_rows = om.session.run(["logits"], feed)[0]
    last = om.session.run(["logits"], {**feed, "logits_keep": np.array(1, np.int64)})[0]
    assert all_rows.shape == (3, 9, om.vocab_size) and last.shape == (3, 1, om.vocab_size)
    assert np.abs(last[:, 0] - all_rows[:, -1]).max() <= 1e-5


def test_rows_of_any_length_share_calls_like_each_row_alone(tiny_m, exported):
    """Left-padded prefill of prompts of 3 lengths, decode, a row joining mid-way, rows leaving:
    every row's logits equal its unbatched run (torch and onnxruntime batch 1) and its greedy
    tokens are identical."""
    moe, _, om = exported
    g = np.random.default_rng(4)
    rows = [g.integers(0, tiny_m.args.vocab_size, n).tolist() for n in (3, 11, 6, 1)]
    steps = [9, 4, 12, 7]                                    # tokens per row: rows leave at different steps
    want = [om.generate_greedy(np.array([r]), n)[0, len(r):].tolist() for r, n in zip(rows, steps)]
    ref = [torch_greedy(tiny_m, torch.tensor([r]), n)[0, len(r):].tolist() for r, n in zip(rows, steps)]
    assert want == ref, f"{moe}: onnxruntime batch 1 differs from torch"
    logits, cache = om.prefill_rows(rows[:3])
    assert cache.pad.tolist() == [8, 0, 5] and cache.length == 11
    solo = np.stack([om.prefill(np.array([r]))[0][0] for r in rows[:3]])
    diff = np.abs(logits - solo).max()
    assert diff <= 1e-5, f"{moe}: padded prefill vs alone max abs {diff:.2e}"
    got, logs, active, worst = [[int(t)] for t in logits.argmax(-1)], [[] for _ in rows], [0, 1, 2], 0.0
    for step in range(16):
        if step == 2:                                        # a 1-token prompt joins an 11-column batch
            lg, c = om.prefill_rows([rows[3]])
            got.append([int(lg[0].argmax())])
            cache = cache.join(cache, c)
            active.append(3)
        keep = [i for i, r in enumerate(active) if len(got[r]) < steps[r]]
        if len(keep) < len(active):
            cache.take(keep)
            active = [active[i] for i in keep]
        if not active:
            break
        lg = om.decode(np.array([got[r][-1] for r in active]), cache)
        for i, r in enumerate(active):
            got[r].append(int(lg[i].argmax()))
            logs[r].append(lg[i])
    assert got == want, f"{moe}: batched {got} vs alone {want}"
    for r, n in zip(rows, steps):                            # decode logits vs the row alone
        _, c = om.prefill(np.array([r]))
        for t in range(n - 1):
            worst = max(worst, float(np.abs(om.decode(np.array([want[rows.index(r)][t]]), c)
                                            - logs[rows.index(r)][t]).max()))
    assert worst <= 1e-5, f"{moe}: batched decode logits vs alone max abs {worst:.2e}"


def _rows_vs_alone(om, rows, steps=4):
    """Max abs difference between batched (prefill_rows, then decode with a row joining) and each
    row alone, over prefill and decode logits."""
    logits, cache = om.prefill_rows(rows[:-1])
    lg, c = om.prefill_rows(rows[-1:])
    logits, cache = np.concatenate([logits, lg]), cache.join(cache, c)     # the last row joins
    alone = [om.prefill(np.array([r])) for r in rows]
    worst = max(float(np.abs(logits[i] - a[0][0]).max()) for i, a in enumerate(alone))
    for step in range(steps):
        t = (np.arange(len(rows)) * 7 + step) % om.vocab_size
        batched = om.decode(t, cache)
        for i, (_, c) in enumerate(alone):
            worst = max(worst, float(np.abs(batched[i] - om.decode(t[i:i + 1], c)[0]).max()))
    return worst


def test_padded_rows_are_bit_identical_to_rows_alone(tmp_path):
    """Dense layers only (onnxruntime's GEMMs and norms compute rows independently): prompts of 5
    lengths (one of a single token) batched with padding give exactly the logits of each alone."""
    m = tiny_model(first_k_dense_replace=3)
    om = OrtModel(export(m, tmp_path / "o", ExportConfig(simplify=False)), spinning=False)
    g = np.random.default_rng(6)
    rows = [g.integers(0, m.args.vocab_size, n).tolist() for n in (3, 17, 1, 6, 9)]
    worst = _rows_vs_alone(om, rows)
    assert worst == 0.0, f"batched vs alone max abs {worst:.3e}"


def test_graph_without_left_pad_refuses_mixed_lengths(tmp_path, exported):
    _, d, _ = exported
    old = tmp_path / "old"
    shutil.copytree(d, old)
    spec = json.loads((old / "export.json").read_text())
    spec["inputs"] = [i for i in spec["inputs"] if i["name"] != "left_pad"]
    (old / "export.json").write_text(json.dumps(spec))
    om = OrtModel(old, spinning=False)
    assert om.prefill_rows([[1, 2], [3, 4]])[0].shape == (2, om.vocab_size)   # equal lengths still work
    with pytest.raises(EdgekitError, match="re-export"):
        om.prefill_rows([[1, 2], [3, 4, 5]])


@pytest.mark.parametrize("moe", MOE_PATHS)
def test_run_reaches_max_positions(moe, tmp_path):
    m = tiny_model(max_position_embeddings=24)
    om = OrtModel(export(m, tmp_path / "o", ExportConfig(moe=moe, simplify=False)), spinning=False)
    ids = torch.randint(0, m.args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    n = 24 - 5 + 1                           # the last decode step uses position 23, the table's last
    got, ref = om.generate_greedy(ids.numpy(), n), torch_greedy(m, ids, n)
    assert got.shape == (1, 25) and (got == ref).all(), f"{moe}: differ at {np.flatnonzero(got != ref)}"
    full = np.abs(om.logits(torch.randint(0, 128, (1, 24)).numpy()))
    assert np.isfinite(full).all()
    _, cache = om.prefill(ids.numpy())
    for t in range(24 - 5):
        om.decode(np.array([t]), cache)
    assert cache.length == 24
    with pytest.raises(EdgekitError, match="maximum of 24 positions"):
        om.decode(np.array([0]), cache)
    with pytest.raises(EdgekitError, match="24"):
        om.generate_greedy(ids.numpy(), n + 1)
    with pytest.raises(EdgekitError, match="24"):
        om.logits(np.zeros((1, 25), np.int64))


def test_export_dir_spec_and_metadata(tiny_m, exported):
    moe, d, om = exported
    spec = json.loads((d / "export.json").read_text())
    a = tiny_m.args
    W = a.kv_lora_rank + a.qk_rope_head_dim
    assert spec["moe"] == moe and spec["num_layers"] == a.num_hidden_layers and spec["cache"]["width"] == W
    assert spec["max_position_embeddings"] == a.max_position_embeddings and spec["vocab_size"] == a.vocab_size
    assert (d / "config.json").exists()
    proto = onnx.load(str(d / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["edgekit.version"] == edgekit.__version__
    assert meta["edgekit.model_hash"] == model_hash(tiny_m) == spec["model_hash"]
    io = json.loads(meta["edgekit.io_spec"])
    names = [i.name for i in proto.graph.input]
    assert names == [i["name"] for i in io["inputs"]] == [i["name"] for i in spec["inputs"]]
    assert [o.name for o in proto.graph.output] == [o["name"] for o in io["outputs"]]
    past = proto.graph.input[1].type.tensor_type.shape.dim
    assert [x.dim_param for x in past[:2]] == ["batch", "past_seq"] and past[2].dim_value == W
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    row_ifs = sorted(n.name for n in proto.graph.node if n.op_type == "If" and n.name.startswith("rowattn."))
    assert row_ifs == [f"rowattn.{i}" for i in range(a.num_hidden_layers)], row_ifs   # one per layer
    assert all(dom != "edgekit" for dom, _ in ops) and all(o.domain != "edgekit" for o in proto.opset_import)
    moe_layers = [i for i in range(a.num_hidden_layers) if a.for_layer(i).is_moe]
    if moe == "contrib":
        inits = {i.name: list(i.dims) for i in proto.graph.initializer}
        names = {n.name for n in proto.graph.node if n.op_type == "MoE"}
        assert names == {f"moe.{i}" for i in moe_layers}
        for node in spec["moe_nodes"]:
            assert inits[node["fc1"]] == [a.n_routed_experts, 2 * a.moe_intermediate_size, a.hidden_size]
            assert inits[node["fc2"]] == [a.n_routed_experts, a.hidden_size, a.moe_intermediate_size]
    else:
        assert not any(dom for dom, _ in ops), f"portable graph uses non-standard ops: {ops}"
        ifs = {n.name for n in proto.graph.node if n.op_type == "If" and not n.name.startswith("rowattn.")}
        assert ifs == {f"experts.{i}" for i in moe_layers} == {e["node"] for e in spec["sparse_experts"]}
        assert spec["moe_nodes"] == []


def test_model_hash_tracks_weights(tiny_m):
    m2 = tiny_model()
    assert model_hash(m2) == model_hash(tiny_m)
    with torch.no_grad():
        m2.model.layers[1].mlp.experts[3].up_proj.weight[0, 0] += 1e-3
    assert model_hash(m2) != model_hash(tiny_m)


def test_external_data_skips_onnxsim(tmp_path, capfd):
    m = tiny_model(num_hidden_layers=2, max_position_embeddings=40)
    d = export(m, tmp_path / "o", ExportConfig(external_data_threshold=1000), tokenizer_from=None)
    assert "onnxsim skipped" in capfd.readouterr().err
    assert (d / "model.onnx.data").stat().st_size > (d / "model.onnx").stat().st_size
    assert json.loads((d / "export.json").read_text())["external_data"] is True
    r = verify(m, d, prompt_lens=(3,), steps=8)
    assert r["passed"], r


def test_tokenizer_copied_and_dir_replaced(tmp_path, tiny_ckpt):
    m = edgekit.load(tiny_ckpt)
    (tiny_ckpt / "tokenizer.json").write_text("{}")
    out = tmp_path / "o"
    export(m, out, ExportConfig(simplify=False))      # an earlier export (edgekit's own output: replaceable)
    (out / "stale.txt").write_text("x")
    export(m, out, ExportConfig(simplify=False), tokenizer_from=tiny_ckpt)
    assert (out / "tokenizer.json").read_text() == "{}" and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_contrib_v2_softmax_routing(tmp_path):
    m = tiny_model(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)
    r = verify(m, export(m, tmp_path / "o", ExportConfig(moe="contrib", simplify=False)), prompt_lens=(9,), steps=6)
    assert r["passed"], r


@pytest.mark.parametrize("over", [{}, {"n_group": 1, "topk_group": 1},
                                  {"scoring_func": "softmax", "topk_method": "group_limited_greedy"},
                                  {"scoring_func": "softmax", "topk_method": "greedy", "num_experts_per_tok": 3}])
def test_contrib_router_probs_pick_the_gates_experts_and_weights(over):
    """The export's few-node routing (threshold at the k-th value, log scores) selects exactly the
    experts ``Gate`` selects, and the MoE op's softmax over them gives ``Gate``'s weights / scale."""
    from edgekit.export.moe_contrib import MASKED_LOGIT, router_probs
    m = tiny_model(**over)
    a = m.args
    x = torch.randn(257, a.hidden_size, generator=torch.Generator().manual_seed(3))
    for i, layer in enumerate(m.model.layers):
        la = a.for_layer(i)
        if not la.is_moe:
            continue
        with torch.no_grad():
            w, idx = layer.mlp.gate(x)
            probs = router_probs(layer.mlp.gate, a, la, x)
        chosen = probs > MASKED_LOGIT
        want = torch.zeros_like(chosen).scatter_(1, idx, True)
        assert torch.equal(chosen, want), f"layer {i}: {(chosen != want).any(1).sum()} tokens route differently"
        got = torch.softmax(probs.gather(1, idx), dim=-1) * a.routed_scaling_factor
        assert torch.allclose(got, w, rtol=1e-5, atol=1e-6), f"layer {i}: max diff {(got - w).abs().max():.2e}"


def test_contrib_rejects_unnormalised_routing(tmp_path):
    m = tiny_model(norm_topk_prob=False)
    with pytest.raises(EdgekitError, match="moe='portable'"):
        export(m, tmp_path / "o", ExportConfig(moe="contrib"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(EdgekitError, match="portable"):
        ExportConfig(moe="fast")


def test_evaluate_scores_ort_like_torch(tiny_m, exported):
    tokens = np.random.default_rng(0).integers(0, tiny_m.args.vocab_size, 300)
    a = evaluate(tiny_m, tokens, seq_len=64, progress=False)
    b = evaluate(exported[2], tokens, seq_len=64, progress=False)
    assert a.tokens == b.tokens and abs(a.accuracy - b.accuracy) < 1e-9, (a, b)
    assert abs(a.perplexity - b.perplexity) / a.perplexity < 1e-4, (a, b)


def test_export_json_maps_every_unit_by_name(tiny_m, exported):
    """export.json ``units``: every quantizable module -> the node and initializer holding it. The
    map is read off names; here (test only) each linear's initializer is checked by value."""
    from onnx import numpy_helper

    from edgekit.quantize.emulate import units

    moe, d, _ = exported
    spec = json.loads((d / "export.json").read_text())
    proto = onnx.load(str(d / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    mods = units(tiny_m)
    assert set(mods) <= set(spec["units"]), sorted(set(mods) - set(spec["units"]))
    for name, e in spec["units"].items():
        w = mods[name].weight.detach().numpy() if hasattr(mods[name], "weight") else None
        if e["op"] == "MatMul":
            assert nodes[e["node"]].input[1] == e["weights"][0]
            np.testing.assert_array_equal(inits[e["weights"][0]], w.T, err_msg=name)
        elif e["op"] == "Gather":
            assert nodes[e["node"]].input[0] == e["weights"][0]
            np.testing.assert_array_equal(inits[e["weights"][0]], w, err_msg=name)
        elif e["op"] == "absorbed":
            assert name.endswith("kv_b_proj") and e["node"] is None and all(x in inits for x in e["weights"])
        else:
            assert name.endswith("mlp.experts") and e["node"] in nodes and all(x in inits for x in e["weights"])
    assert {e["op"] for e in spec["units"].values()} == {"MatMul", "Gather", "absorbed",
                                                        "MoE" if moe == "contrib" else "If"}


def test_runtime_imports_without_torch():
    code = "import sys, edgekit.runtime; assert 'torch' not in sys.modules, 'runtime imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_bytes_and_export_api(tiny_m):
    c = cache_bytes_per_token(tiny_m.args)
    a = tiny_m.args
    assert c["latent"] == a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 4
    assert c["per_head_kv"] > c["latent"]
    assert callable(edgekit.export.export) and type(edgekit.export) is types.ModuleType  # no module hacks


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_as_constant_matmuls_is_bit_identical_to_the_model(interleave):
    from edgekit.export.graph import _rope, rope_matrices
    from edgekit.model import apply_rope

    g = torch.Generator().manual_seed(0)
    x, ang = torch.randn(2, 5, 3, 32, generator=g), torch.randn(2, 5, 16, generator=g) * 50
    cos, sin = ang.cos(), ang.sin()
    rot, fold = rope_matrices(32, interleave)
    got = _rope(x, rot, fold, torch.cat([cos, cos, sin, sin], -1)[:, :, None])
    ref = apply_rope(x, cos, sin, interleave)
    assert torch.equal(got, ref), f"max diff {(got - ref).abs().max().item():.3g}"
