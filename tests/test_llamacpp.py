"""benchmarks/llamacpp.py: the llama-bench JSON parser, the converter's arguments and environment, the
routing check and the server command (fast, no build); plus one end-to-end check (v3-nano -> Q8_0 GGUF ->
llama-bench) that runs only where llama.cpp has been built (``python -m benchmarks.llamacpp build``)."""

import json
import os
from pathlib import Path

import pytest

from benchmarks import llamacpp

NANO = Path(__file__).resolve().parent.parent / "edgekit" / "data" / "v3-nano"


def _test(n_prompt, n_gen, depth, samples_ns, fa=-1):
    """One test object as llama-bench -o json prints it (the fields parse_bench reads, plus a few)."""
    return {"build_commit": "0c1e57098", "build_number": 0, "cpu_info": "AMD EPYC", "model_type": "deepseek2 ?B Q8_0",
            "model_size": 9_856_000, "model_n_params": 8_808_640, "n_threads": 2, "type_k": "f16", "type_v": "f16",
            "flash_attn": fa, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": depth,
            "avg_ns": int(sum(samples_ns) / len(samples_ns)), "samples_ns": samples_ns, "samples_ts": []}


def test_parse_bench_prefill_and_decode_per_token():
    text = json.dumps([
        _test(128, 0, 0, [10e6, 12e6, 11e6, 30e6, 11e6]),      # prefill 128 at depth 0: ms samples 10,12,11,30,11
        _test(0, 32, 0, [32e6, 34e6]),                         # 32 tokens in 32 / 34 ms -> 1.03125 ms/token
        _test(128, 0, 1024, [50e6]),                           # prefill at depth: not the prefill-128 figure
        _test(0, 32, 128, [64e6, 64e6]),
        _test(0, 32, 1024, [96e6, 128e6]),
    ])
    r = llamacpp.parse_bench(text)
    assert r["prefill_tokens"] == 128 and r["prefill_samples"] == 5
    assert r["prefill_p50_ms"] == pytest.approx(11.0)
    assert r["prefill_p95_ms"] == pytest.approx(26.4)          # numpy's linear percentile of the 5 samples
    assert r["decode_ms_ctx0"] == pytest.approx(33 / 32)
    assert r["decode_ms_ctx128"] == pytest.approx(2.0)
    assert r["decode_ms_ctx1024"] == pytest.approx(3.5)
    assert r["flash_attn_setting"] == "auto" and r["build_commit"] == "0c1e57098" and r["type_k"] == "f16"
    assert r["model_size_mb"] == pytest.approx(9.856)


def test_parse_bench_rejects_empty_output():
    with pytest.raises(llamacpp.LlamaCppError):
        llamacpp.parse_bench("[]")


def test_flash_attention_resolution_from_the_log():
    assert llamacpp.flash_attn_resolved("llama_context: resolving fused ops\nfoo: Flash Attention enabled\n") == "on"
    assert llamacpp.flash_attn_resolved("x: Flash Attention not supported, set to disabled") == "off"
    assert llamacpp.flash_attn_resolved("nothing about it") is None


def test_bench_command_leaves_flash_attention_at_its_default():
    cmd = llamacpp.bench_command(Path("/b"), Path("m.gguf"), threads=4, reps=5)
    assert cmd[0] == "/b/llama-bench" and not {"-fa", "--flash-attn"} & set(cmd)
    assert cmd[cmd.index("-p") + 1] == "128" and cmd[cmd.index("-n") + 1] == "32"
    assert cmd[cmd.index("-d") + 1] == "0,128,1024" and cmd[cmd.index("-t") + 1] == "4"
    assert cmd[cmd.index("-o") + 1] == "json"


def test_convert_arguments_and_environment(tmp_path):
    args = llamacpp.convert_args(NANO, tmp_path / "x.gguf")
    assert args == [str(NANO.resolve()), "--outfile", str((tmp_path / "x.gguf").resolve()), "--outtype", "q8_0"]
    assert llamacpp.convert_args(NANO, tmp_path / "x.gguf", "f32")[-1] == "f32"
    env = llamacpp.convert_env(Path("/src"), {"PYTHONPATH": "/mine", "NO_LOCAL_GGUF": "1", "HOME": "/h"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/src/gguf-py", "/mine"]   # the tree's gguf first
    assert "NO_LOCAL_GGUF" not in env and env["HOME"] == "/h"


def test_routing_config_check():
    cfg = json.loads((NANO / "config.json").read_text())
    llamacpp.check_routing_config(cfg)   # edgekit's checkpoints spell out their routing
    assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc"
    with pytest.raises(llamacpp.LlamaCppError, match="per-layer"):
        llamacpp.check_routing_config({**cfg, "layer_overrides": {"3": {"n_group": 2}}})
    del cfg["topk_method"]
    with pytest.raises(llamacpp.LlamaCppError, match="topk_method"):
        llamacpp.check_routing_config(cfg)


def test_server_command_is_loopback_with_parallel_slots():
    cmd = llamacpp.server_command(Path("/b"), Path("m.gguf"), port=8099, threads=4, parallel=16, ctx_per_slot=512)
    assert cmd[0] == "/b/llama-server"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8099"
    assert cmd[cmd.index("--parallel") + 1] == "16" and "-cb" in cmd
    assert cmd[cmd.index("-c") + 1] == str(16 * 512) and cmd[cmd.index("-t") + 1] == "4"


def test_cmake_options_are_offline_and_native():
    opts = set(llamacpp.CMAKE_OPTIONS)
    assert {"-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"} <= opts
    assert "-DCMAKE_BUILD_TYPE=Release" in opts
    assert llamacpp.CMAKE_OPTIONS[:2] == ("-G", "Ninja")


@pytest.mark.slow
def test_nano_gguf_runs_in_llama_bench(tmp_path):
    info = llamacpp.built()
    if info is None:
        pytest.skip("llama.cpp is not built here (python -m benchmarks.llamacpp build: minutes)")
    gguf = llamacpp.convert(NANO, tmp_path / "nano.gguf", Path(info["src"]))
    r = llamacpp.bench(gguf, Path(info["bin"]), threads=1, reps=1)
    print({k: r.get(k) for k in ("prefill_p50_ms", "decode_ms_ctx0", "decode_ms_ctx1024", "flash_attn", "peak_rss_mb")})
    assert r["build_commit"].startswith(llamacpp.LLAMA_COMMIT[:7])
    assert r["prefill_p50_ms"] > 0 and r["decode_ms_ctx0"] > 0 and r["decode_ms_ctx1024"] > 0
    assert 8_000_000 < r["model_n_params"] < 9_500_000   # v3-nano: 8.8M


def test_failure_line_names_the_assert_not_the_backtrace():
    crash = ("/src/llama.cpp/src/llama-model.cpp:1365: GGML_ASSERT(hparams.n_expert_groups < hparams.n_expert) failed\n"
             "[Thread debugging using libthread_db enabled]\n#9  __libc_start_main_impl () at ../csu/libc-start.c:360\n"
             "360\t../csu/libc-start.c: No such file or directory.\n")
    assert llamacpp.failure_line(crash) == "GGML_ASSERT(hparams.n_expert_groups < hparams.n_expert) failed"
    assert llamacpp.failure_line("load ok\nerror: unknown model architecture: 'x'\nbye\n") == \
        "error: unknown model architecture: 'x'"
    assert llamacpp.failure_line("a\nlast words\n") == "last words" and llamacpp.failure_line("") == "no output"
