"""v3-mini's pieces: the pinned multi-domain corpus, its shipped splits, the domain data helpers and
the generalised training script (run end to end on CPU with a tiny step count)."""

import json
import tarfile

import numpy as np
import pytest
import torch

from edgekit.checkpoint import load
from edgekit.data import DOMAINS_DIR, DomainData, domain_names, load_text, load_tokens, model_domains, shipped_file
from edgekit.errors import EdgekitError
from edgekit.nano import corpus, debian, mixed
from edgekit.nano.specs import MINI_CONFIG, SPECS
from edgekit.nano.train import main as train_main
from edgekit.nano.train import prepare_tokens

MANIFEST = json.loads(mixed.MANIFEST_PATH.read_text())


def test_shipped_domain_splits_match_the_manifest_and_are_disjoint():
    assert set(MANIFEST["domains"]) == set(domain_names()) == {"python", "c", "prose"}
    for name, dom in MANIFEST["domains"].items():
        paths = [f["path"] for f in dom["files"]]
        assert len(paths) == len(set(paths)), f"{name}: a file is listed twice"
        assert {f["split"] for f in dom["files"]} == {"eval", "calib", "dev", "train"}
        assert all(f["split"] == "train" for f in dom["files"] if f.get("recover")), "recover samples train only"
        for split in mixed.SHIPPED:
            want = sum(1 for f in dom["files"] if (f.get("recover") if split == "recover" else f["split"] == split))
            text = load_text(f"{name}/{split}")
            assert text.count(corpus.SEPARATOR) == want, (name, split)
        train = shipped_file(DOMAINS_DIR / name, "train")
        assert train.is_file() == mixed.DOMAINS[name].ship_train, name
        if train.is_file():    # the whole train split: every train document, in the manifest's order
            want = sum(1 for f in dom["files"] if f["split"] == "train")
            assert load_text(f"{name}/train").count(corpus.SEPARATOR) == want, name
        held = sum(len(load_text(f"{name}/{s}").encode()) for s in ("eval", "calib", "dev"))
        assert held < 1_000_000 and len(load_text(f"{name}/recover").encode()) <= 2_600_000
    for name in ("c", "prose"):
        assert all(p["version"] and len(p["deb_sha256"]) == 64 for p in MANIFEST["domains"][name]["packages"])


def test_python_domain_is_v3_nanos_held_out_text_plus_a_dev_split_from_its_train_files():
    for s in ("eval", "calib", "recover"):
        assert load_text(f"python/{s}") == load_text(s), s
    nano = {f["path"]: f["split"] for f in json.loads(corpus.MANIFEST_PATH.read_text())["files"]}
    dev = [f["path"] for f in MANIFEST["domains"]["python"]["files"] if f["split"] == "dev"]
    assert dev and all(nano[p] == "train" for p in dev), "dev comes out of v3-nano's train files"


def _doc(path, n):
    return corpus.Document(path, corpus.sha256_hex(path.encode()), "x" * n)


def test_package_split_rule_fills_held_out_then_train_budget_deterministically():
    dom = mixed.Domain("t", "test", eval_bytes=300, calib_bytes=200, dev_bytes=200, train_bytes=2000,
                       heldout_max_file_bytes=100, recover_bytes=500)
    docs = [_doc(f"p/{i}.c", 40 + (i * 37) % 200) for i in range(80)]
    split_of, rec = mixed.assign_package_splits(dom, docs)
    assert mixed.assign_package_splits(dom, list(reversed(docs))) == (split_of, rec), "order on disk is irrelevant"
    size = {d.path: len(d.text) for d in docs}
    for s, target in (("eval", 300), ("calib", 200), ("dev", 200)):
        files = [p for p, v in split_of.items() if v == s]
        assert files and all(size[p] <= 100 for p in files)
        assert target <= sum(size[p] for p in files) < target + 100
    train = [p for p, v in split_of.items() if v == "train"]
    assert 2000 <= sum(size[p] for p in train) < 2000 + 240 and len(split_of) < len(docs), "budget caps train"
    assert rec <= set(train) and sum(size[p] + len(corpus.SEPARATOR) for p in rec) <= 500


def test_debian_reader_filters_a_tarball_and_a_directory(tmp_path):
    src = tmp_path / "pkg" / "usr" / "src" / "proj-1.0"
    for rel, text in {"a.c": "int a;", "sub/b.h": "#define B", "testsuite/t.c": "t", "big.c": "x" * 500,
                      "README": "r"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    with tarfile.open(tmp_path / "pkg" / "src.tar.xz", "w:xz") as tf:
        tf.add(src, arcname="proj-1.0")
    want = [("a.c", b"int a;"), ("sub/b.h", b"#define B")]
    got = list(debian.read_files(tmp_path / "pkg", "proj-1.0", ("*.c", "*.h"), ("testsuite/*",), "src.tar.xz", 100))
    assert got == want
    assert list(debian.read_files(tmp_path / "pkg", "usr/src/proj-1.0", ("*.c", "*.h"), ("testsuite/*",),
                                  max_bytes=100)) == want
    with pytest.raises(debian.DebianError, match="layout changed"):
        list(debian.read_files(tmp_path / "pkg", "nope", ("*",)))


def test_build_pins_then_verifies_and_names_a_changed_file(tmp_path, monkeypatch):
    pkg = tmp_path / "unpacked"
    for i in range(30):
        (pkg / "doc").mkdir(parents=True, exist_ok=True)
        (pkg / "doc" / f"f{i:02d}.rst.txt").write_text(f"Section {i}\n" + "words " * (20 + i))
    (pkg / "doc" / "latin1.rst.txt").write_bytes("caf\xe9".encode("latin-1"))
    monkeypatch.setattr(mixed, "fetch", lambda p, v, cache: tmp_path / f"{p}_{v}_all.deb")
    monkeypatch.setattr(mixed, "extract", lambda deb, dest: pkg)
    monkeypatch.setattr(mixed, "sha256_file", lambda f: "0" * 64)
    doms = {"t": mixed.Domain("t", "test", (mixed.Source("fake-doc", "1.0", "doc", ("*.rst.txt",)),),
                              eval_bytes=400, calib_bytes=200, dev_bytes=200, recover_bytes=400, train_bytes=10_000)}
    kw = dict(domains=doms, manifest_path=tmp_path / "m.json", out_dir=tmp_path / "out", train_dir=tmp_path / "tr")
    first = mixed.build(tmp_path, **kw)
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["domains"]["t"]["excluded"] == {"fake-doc/latin1.rst.txt": "not utf-8"}
    texts = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.txt")}
    assert mixed.build(tmp_path, **kw) == first, "the second build verifies and reproduces"
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.txt")} == texts
    (pkg / "doc" / "f07.rst.txt").write_text("changed")
    with pytest.raises(corpus.CorpusError, match="f07.rst.txt"):
        mixed.build(tmp_path, **kw)


def test_domain_sources_resolve_and_unknown_names_fail_with_the_choices(tmp_path):
    dd = DomainData.of("prose")
    assert (dd.calib, dd.recover, dd.dev, dd.eval) == ("prose/calib", "prose/recover", "prose/dev", "prose/eval")
    assert load_text("c/dev") == load_text(str(shipped_file(DOMAINS_DIR / "c", "dev")))
    with pytest.raises(EdgekitError, match="python"):
        DomainData.of("rust")
    with pytest.raises(EdgekitError, match="DOMAIN/SPLIT"):
        load_text("c/train")
    assert DomainData.of("python", "train").recover == "python/train"
    with pytest.raises(EdgekitError, match="ships no 'train' split; use one of recover or pass --recover"):
        DomainData.of("c", "train")
    (tmp_path / "training.json").write_text(json.dumps({"domains": ["python", "c", "klingon"]}))
    assert model_domains(tmp_path) == ["python", "c"] and model_domains(tmp_path / "none") == []


def test_v3_mini_config_is_v3_shaped():
    c = MINI_CONFIG
    assert c["n_routed_experts"] >= 32 and 4 <= c["num_experts_per_tok"] <= 8 and c["n_shared_experts"] == 1
    assert c["n_group"] > 1 and c["topk_group"] < c["n_group"]
    assert (c["scoring_func"], c["topk_method"]) == ("sigmoid", "noaux_tc")
    mla = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_attention_heads")
    assert {k: c[k] for k in mla} == {k: SPECS["v3-nano"].config[k] for k in mla}


@pytest.mark.slow
def test_train_v3_mini_on_cpu_writes_a_loadable_bf16_sharded_checkpoint(tmp_path):
    text = shipped_file(DOMAINS_DIR / "c", "calib")
    out = tmp_path / "ck"
    train_main(["--model", "v3-mini", "--out", str(out), "--steps", "2", "--batch", "1", "--seq", "16",
                "--warmup", "1", "--eval-every", "2", "--eval-max-rows", "1", "--device", "cpu",
                "--max-shard-mb", "14", "--train-text", str(text)])
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and all(p.stat().st_size < 16_000_000 for p in shards)
    from safetensors import safe_open

    dtypes = {}
    for f in shards:
        with safe_open(str(f), framework="pt") as st:
            dtypes.update({k: st.get_tensor(k).dtype for k in st.keys()})
    assert {v for k, v in dtypes.items() if ".gate." in k} == {torch.float32}, "router stays fp32"
    assert {v for k, v in dtypes.items() if ".gate." not in k} == {torch.bfloat16}
    m = load(out)
    assert m.args.n_routed_experts == MINI_CONFIG["n_routed_experts"]
    rec = json.loads((out / "training.json").read_text())
    assert rec["model"] == "v3-mini" and rec["domains"] == ["python", "c", "prose"] and rec["steps_done"] == 2
    assert set(rec["final_eval_loss_by_domain"]) == {"python", "c", "prose"}
    assert model_domains(out) == ["python", "c", "prose"]


def test_prepared_tokens_round_trip_and_a_stale_file_is_refused(tmp_path):
    from edgekit.nano.train import load_train_tokens

    spec = SPECS["v3-mini"]
    texts = [shipped_file(DOMAINS_DIR / d, "calib") for d in ("python", "c")]
    d = prepare_tokens(spec, spec.tokenizer, texts, tmp_path / "tok")
    ids, meta = load_train_tokens(spec, spec.tokenizer, d)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(spec.tokenizer))
    want = np.concatenate([load_tokens(str(p), tok) for p in texts])
    assert np.array_equal(ids.numpy(), want), "token file == tokenizer.encode of each text"
    assert meta["spans"]["c/calib"][1] == len(want)
    with pytest.raises(SystemExit, match="another tokenizer"):
        load_train_tokens(spec, SPECS["v3-nano"].tokenizer, d)


def test_large_text_is_tokenized_per_document_to_the_same_ids(monkeypatch):
    """load_tokens splits a long text after each separator (the tokenizer splits there anyway):
    the ids must equal one call over the whole text, and max_tokens still cuts exactly."""
    import edgekit.data as data
    from edgekit.checkpoint import load_tokenizer, resolve

    tok = load_tokenizer(resolve("v3-mini"))
    whole = data.load_tokens("python/eval", tok)
    monkeypatch.setattr(data, "CHUNK_CHARS", 1000)
    chunked = data.load_tokens("python/eval", tok)
    if not np.array_equal(whole, chunked):
        i = int(np.argmax(whole[:len(chunked)] != chunked[:len(whole)]))
        raise AssertionError(f"{len(whole)} vs {len(chunked)} ids; first difference at {i}: "
                             f"{whole[i:i + 8]} vs {chunked[i:i + 8]}")
    assert np.array_equal(data.load_tokens("python/eval", tok, 5000), whole[:5000])


def test_xz_text_reads_and_a_truncated_one_names_the_fix(tmp_path):
    import lzma

    good = tmp_path / "t.txt.xz"
    good.write_bytes(lzma.compress(b"def f():\n    return 1\n"))
    assert load_text(str(good)) == "def f():\n    return 1\n"
    bad = tmp_path / "bad.txt.xz"
    bad.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(EdgekitError, match="not a complete xz file; pass it uncompressed or re-compress it"):
        load_text(str(bad))
