"""Sample apps end to end on a tiny random bundle: the terminal REPL driven through stdin, the HTTP
server (streaming, dynamic batching = unbatched results, 4xx/503 errors), and the web page in
headless Chromium (skipped with the reason when chromium or sample_apps/web/node_modules is missing)."""

import http.client
import importlib.util
import json
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.test_runtime_engine import PROMPTS, build_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "sample_apps"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("apps") / "bundle")


@pytest.fixture(scope="module")
def engine(bundle):
    from edgekit.runtime import Engine
    return Engine.from_bundle(bundle)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- terminal ------------------------------------------------------------------------------------
def test_terminal_app_streams_completions_and_reports_bad_settings(bundle, engine):
    stdin = "def fibonacci(n):\\n\n/set temperature -1\n/set max_new_tokens 4\nimport os\n/quit\n"
    p = subprocess.run([sys.executable, str(APPS / "terminal" / "app.py"), "--bundle", str(bundle),
                        "--max-new-tokens", "6"], input=stdin, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    first = engine.generate(PROMPTS[0], max_new_tokens=6)
    second = engine.generate("import os", max_new_tokens=4)
    assert first in p.stdout and second in p.stdout, (p.stdout, first, second)
    assert "error: temperature=-1.0" in p.stdout and "[max_new_tokens = 4]" in p.stdout, p.stdout


# -- HTTP server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(engine):
    app = _load("edgekit_sample_server", APPS / "server" / "app.py")
    httpd, batcher = app.serve(engine, port=0, max_batch=4, batch_wait_ms=30, queue_size=8, body_bytes=4096,
                               max_tokens=32)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd.server_address[1], batcher
    httpd.shutdown()
    httpd.server_close()
    batcher.stop()


def _post(port, body, path="/v1/completions", method="POST", headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request(method, path, body=data if method == "POST" else None,
              headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r.status, r.read().decode(), dict(r.getheaders())


def test_server_completion_and_streaming_match_the_engine(server, engine):
    port, _ = server
    status, body, _ = _post(port, {"prompt": PROMPTS[0], "max_tokens": 8})
    want = engine.generate(PROMPTS[0], max_new_tokens=8)
    assert status == 200, body
    out = json.loads(body)
    assert out["choices"][0]["text"] == want, (out, want)
    assert out["usage"]["prompt_tokens"] == len(engine.encode(PROMPTS[0]))
    status, body, headers = _post(port, {"prompt": PROMPTS[0], "max_tokens": 8, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream", (status, headers)
    events = [ln[6:] for ln in body.split("\n\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want, chunks
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop") and len(chunks) >= 2, chunks


MIXED = ["x = 1\n", "def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\n",
         "class Config:\n    def __init__(self, path, mode='r', encoding=None):\n", "for i in range(10):\n"]


def test_concurrent_requests_of_any_length_are_batched_and_exact(server, engine):
    """Prompts of 5 lengths with different max_tokens arrive together (max batch 4): decode calls carry several
    rows, and every greedy answer is the one the engine gives the request alone."""
    port, batcher = server
    reqs = [(MIXED[i % len(MIXED)], 6 + 3 * (i % 4)) for i in range(8)]         # queue_size 8: no 503
    want = [engine.generate(p, max_new_tokens=n) for p, n in reqs]
    before = dict(batcher.stats)
    with ThreadPoolExecutor(len(reqs)) as ex:
        res = list(ex.map(lambda r: _post(port, {"prompt": r[0], "max_tokens": r[1]}), reqs))
    texts = [json.loads(b)["choices"][0]["text"] if s == 200 else (s, b) for s, b, _ in res]
    assert texts == want, (texts, want)
    rows = batcher.stats["rows_decoded"] - before["rows_decoded"]
    calls = batcher.stats["decode_calls"] - before["decode_calls"]
    assert rows > calls, (rows, calls, batcher.stats)


def _app():
    return _load("edgekit_sample_server", APPS / "server" / "app.py")


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("apps8") / "bundle", int8=True)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])     # int8: per-token activation scales
def test_continuous_batching_answers_equal_each_request_alone(dtype, bundle, int8_bundle):
    """Driven step by step: two prompts of different lengths prefill in one call, three more join
    the running batch later (one waits for a free row), one is cancelled mid-way. Every other
    request's greedy token ids equal the same request run alone, bit for bit."""
    from edgekit.runtime import Engine, GenerationConfig
    eng = Engine.from_bundle(int8_bundle if dtype == "int8" else bundle)
    app = _app()
    bat = app.Batcher(eng, max_batch=4, queue_size=8)            # not started: stepped by the test
    jobs = []

    def submit(i):
        cfg = GenerationConfig(max_new_tokens=8 + 5 * (i % 3), stop_at_eos=False)
        jobs.append(bat.submit(app.Job(eng.fit(eng.encode(MIXED[i % len(MIXED)]), cfg), cfg)))

    submit(0), submit(1)
    bat.step()
    assert bat.stats["prefill_calls"] == 1 and len(bat.rows) == 2
    bat.step()
    for i in (2, 3, 4):
        submit(i)
    lengths, widest = set(), 0
    for step in range(100):
        if step == 3:
            jobs[3].cancelled = True                             # its client went away
        bat.step()
        if bat.lanes[0].cache is not None:
            lengths.add(len(set(bat.lanes[0].cache.row_lengths().tolist())))
            widest = max(widest, len(bat.rows))
        if all(j.done for j in jobs):
            break
    assert all(j.done for j in jobs) and bat.lanes[0].cache is None and not bat.rows
    assert widest == 4 and max(lengths) > 1, (widest, lengths)   # full batch, rows of different lengths
    ends = [list(j.out.queue)[-1] for j in jobs]
    assert [e["finish_reason"] for e in ends] == ["length", "length", "length", "cancelled", "length"], ends
    for i, j in enumerate(jobs):
        if i == 3:
            continue
        alone = list(eng.stream_ids(j.ids, j.cfg))
        assert j.text.ids == alone, f"{dtype} request {i}: batched {j.text.ids} vs alone {alone}"
        assert "".join(x for x in j.out.queue if isinstance(x, str)) == eng.tokenizer.decode(alone)
    text = bat.metrics.render()
    assert 'edgekit_requests_total{reason="cancelled"} 1' in text and "edgekit_decode_batch_rows_count" in text


@pytest.fixture(scope="module")
def long_bundles(tmp_path_factory):
    """fp32 and int8 tiny bundles with room for caches of several hundred tokens (onnxruntime splits a
    single row's long key-axis MatMul across threads; one-thread lanes must not)."""
    d = tmp_path_factory.mktemp("long")
    return {"fp32": build_tiny_bundle(d / "fp32", max_positions=512),
            "int8": build_tiny_bundle(d / "int8", max_positions=512, int8=True)}


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_worker_lanes_answer_every_request_as_served_alone(dtype, long_bundles):
    """Two worker lanes (one-thread sessions) serve 8 requests of 1-400 prompt tokens at once, 4 rows at
    most: both lanes batch rows of different lengths, and every greedy answer equals the same request
    served alone on a one-thread session, token for token."""
    from edgekit.runtime import Engine, GenerationConfig, OrtModel
    eng = Engine.from_bundle(long_bundles[dtype], threads=2)
    app = _app()
    bat = app.Batcher(eng, max_batch=4, queue_size=16, workers=2)
    assert [lane.model.threads for lane in bat.lanes] == [1, 1] and bat.inexact == ""
    g = np.random.default_rng(3)
    jobs = []
    for i, n in enumerate((5, 380, 40, 1, 250, 17, 400, 90)):
        cfg = GenerationConfig(max_new_tokens=6 + 4 * (i % 4), stop_at_eos=False)
        jobs.append(bat.submit(app.Job(g.integers(0, eng.model.vocab_size, n).tolist(), cfg)))
    bat.start()
    deadline = time.monotonic() + 120
    while not all(j.done for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.02)
    bat.stop()
    assert all(j.done for j in jobs), bat.health()
    assert all(lane.rows_decoded > lane.decode_calls > 0 for lane in bat.lanes), \
        [(lane.rows_decoded, lane.decode_calls) for lane in bat.lanes]
    alone = Engine(OrtModel(long_bundles[dtype], threads=1), eng.tokenizer)
    for i, j in enumerate(jobs):
        want = list(alone.stream_ids(j.ids, j.cfg))
        assert j.text.ids == want, f"{dtype} request {i} ({len(j.ids)} tokens): batched {j.text.ids} vs alone {want}"
    h = bat.health()
    assert h["exact_batching"] and h["workers"] == 2 and h["decode_s"] > 0 and h["prefill_s"] > 0


def test_inexact_batching_names_its_causes(bundle):
    """A QMoE bundle or multi-thread sessions: the server says why a batched answer may differ."""
    from types import SimpleNamespace

    from edgekit.runtime import Engine
    app = _app()
    two = app.Batcher(Engine.from_bundle(bundle, threads=2), max_batch=4, workers=1)
    assert "threads" in two.inexact and two.health()["exact_batching"] is False
    assert app.Batcher(Engine.from_bundle(bundle, threads=2), max_batch=1).inexact == ""   # one row: nothing to mix
    qmoe = SimpleNamespace(spec={"quantization": {"moe": {"model.layers.1.mlp.experts": "row"}}}, threads=1)
    assert "QMoE" in sys.modules["batcher"].inexact_batching(qmoe, 4)
    nbits = SimpleNamespace(spec={"quantization": {"moe": {"model.layers.1.mlp.experts": "grouped"},
                                                   "int4": {"block": 32, "linears": ["lm_head"], "moe": []}}},
                            threads=1)
    assert "4-bit" in sys.modules["batcher"].inexact_batching(nbits, 4)
    grouped8 = SimpleNamespace(spec={"quantization": {"moe": {"model.layers.1.mlp.experts": "grouped"}}}, threads=1)
    assert sys.modules["batcher"].inexact_batching(grouped8, 4) == ""


def test_prefill_groups_minimise_padding_plus_calls():
    """Against brute force over every partition of random prompt lengths (n <= 6)."""
    import itertools
    _app()                                                      # puts sample_apps/server on sys.path
    groups_of = sys.modules["batcher"].prefill_groups

    def cost(groups, lens, c):
        return sum(len(g) * max(lens[i] for i in g) + c for g in groups)

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            yield [[first], *p]
            for k in range(len(p)):
                yield p[:k] + [[first, *p[k]]] + p[k + 1:]

    rng = np.random.default_rng(0)
    for n, c in itertools.product(range(1, 7), (0, 16, 64, 1000)):
        lens = rng.integers(1, 300, n).tolist()
        got = groups_of(lens, c)
        assert sorted(i for g in got for i in g) == list(range(n))
        best = min(cost(p, lens, c) for p in partitions(list(range(n))))
        assert cost(got, lens, c) == best, (lens, c, got)
    assert groups_of([7] * 16, 64) == [list(range(16))]          # equal lengths: one call
    assert len(groups_of([10, 12, 500], 64)) == 2                 # a long prompt does not pad the short ones


def test_int8_rows_batched_equal_rows_alone_bit_for_bit(int8_bundle):
    """int8 graph (per-token activation scales, grouped int8 experts): a row's logits do not depend
    on the rows it is batched with, padded or not, prefill and decode."""
    from edgekit.runtime import OrtModel
    from tests.test_export import _rows_vs_alone
    om = OrtModel(int8_bundle, spinning=False)
    g = np.random.default_rng(7)
    rows = [g.integers(0, om.vocab_size, n).tolist() for n in (3, 40, 1, 17, 60)]
    worst = _rows_vs_alone(om, rows)
    assert worst == 0.0, f"int8 batched vs alone max abs {worst:.3e}"


def test_client_gone_detects_a_closed_peer():
    app = _app()
    a, b = socket.socketpair()
    try:
        assert not app.client_gone(a)
        b.sendall(b"x")                                          # pipelined bytes: still there
        assert not app.client_gone(a)
        b.close()
        a.recv(1)
        assert app.client_gone(a)
    finally:
        a.close()


@pytest.fixture
def slow_server(bundle):
    """A server whose decode calls take >= 20 ms, so a request is still running when its client leaves."""
    from edgekit.runtime import Engine
    eng = Engine.from_bundle(bundle)
    decode = eng.model.decode

    def slow(tokens, cache):
        time.sleep(0.02)
        return decode(tokens, cache)

    eng.model.decode = slow
    httpd, batcher = _app().serve(eng, port=0, max_batch=2, queue_size=4, max_tokens=80)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], batcher
    httpd.shutdown()
    httpd.server_close()
    batcher.stop()


def _metric(port, name):
    status, body, headers = _post(port, None, path="/metrics", method="GET")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4"), (status, headers)
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in body.splitlines() if ln and not ln.startswith("#")
            }.get(name)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnected_client_cancels_its_request(slow_server, stream):
    port, batcher = slow_server
    body = json.dumps({"prompt": MIXED[1], "max_tokens": 60, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    if stream:
        head = b""
        while b"data: " not in head:                             # the first event arrived
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    else:
        time.sleep(0.3)                                          # generation under way
    sock.close()
    deadline = time.monotonic() + 20
    while _metric(port, 'edgekit_requests_total{reason="cancelled"}') != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(port, 'edgekit_requests_total{reason="cancelled"}') == 1
    assert _metric(port, "edgekit_generated_tokens_total") < 60, "the cancelled request ran to its end"
    assert _metric(port, "edgekit_active_rows") == 0


def test_health_and_prometheus_metrics(server, engine):
    port, batcher = server
    status, body, _ = _post(port, {"prompt": MIXED[0], "max_tokens": 5})
    assert status == 200
    status, body, _ = _post(port, None, path="/health", method="GET")
    h = json.loads(body)
    assert h["status"] == "ok" and {"queued", "active", "max_batch", "decode_calls"} <= set(h), h
    status, text, headers = _post(port, None, path="/metrics", method="GET")
    lines = text.splitlines()
    types = {ln.split()[2]: ln.split()[3] for ln in lines if ln.startswith("# TYPE")}
    assert types["edgekit_queue_depth"] == "gauge" and types["edgekit_decode_batch_rows"] == "histogram", types
    assert {"edgekit_tokens_per_second", "edgekit_requests_total", "edgekit_generated_tokens_total",
            "edgekit_time_to_first_token_seconds", "edgekit_active_rows"} <= set(types), types
    samples = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}
    buckets = [v for k, v in samples.items() if k.startswith("edgekit_decode_batch_rows_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == samples["edgekit_decode_batch_rows_count"] > 0, samples
    assert samples['edgekit_requests_total{reason="length"}'] >= 1
    assert samples["edgekit_generated_tokens_total"] >= 5 and samples["edgekit_tokens_per_second"] > 0


@pytest.mark.parametrize("body, code, words", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"max_tokens": 4}, 400, "'prompt' is required"),
    ({"prompt": "x", "max_tokens": 1000}, 400, "max_tokens=1000"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "stream": "yes"}, 400, "'stream'"),
    ({"prompt": "x", "max_tokens": True}, 400, "'max_tokens'"),
    ({"prompt": "x", "colour": 1}, 400, "unknown field"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "word " * 35, "max_tokens": 30}, 400, "context"),
    ({"prompt": "word " * 90, "max_tokens": 4}, 413, "shorten it"),
    ({"prompt": "x" * 5000}, 413, "limit is 4096"),
])
def test_bad_requests_get_clear_4xx(server, body, code, words):
    status, text, _ = _post(server[0], body)
    assert status == code and words in json.loads(text)["error"]["message"], (status, text)


def test_wrong_routes_and_methods(server):
    assert _post(server[0], {"prompt": "x"}, path="/v2/nothing")[0] == 404
    assert _post(server[0], None, method="GET")[0] == 405
    assert _post(server[0], None, method="DELETE")[0] == 405
    status, body, _ = _post(server[0], None, path="/health", method="GET")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_full_queue_answers_503(engine):
    app = _load("edgekit_sample_server_q", APPS / "server" / "app.py")
    httpd, batcher = app.serve(engine, port=0, max_batch=1, queue_size=1, max_tokens=64)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        with ThreadPoolExecutor(8) as ex:
            res = list(ex.map(lambda _: _post(port, {"prompt": PROMPTS[0], "max_tokens": 60,
                                                      "stop": ["never-seen"]}), range(8)))
        assert 503 in [r[0] for r in res] and 200 in [r[0] for r in res], res
        assert {r[0] for r in res} <= {200, 503}, res
        assert all(int(h["Retry-After"]) >= 1 for s_, _, h in res if s_ == 503), res
    finally:
        httpd.shutdown()
        httpd.server_close()
        batcher.stop()


# -- web (headless Chromium + onnxruntime-web) -----------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ORT_WEB = APPS / "web" / "node_modules" / "onnxruntime-web" / "dist"
HF_TOK = APPS / "web" / "node_modules" / "@huggingface" / "tokenizers" / "dist"
needs_browser = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)"),
    pytest.mark.skipif(not (ORT_WEB.is_dir() and HF_TOK.is_dir()),
                       reason="onnxruntime-web / @huggingface/tokenizers missing: run `npm ci` in sample_apps/web"),
]


@needs_browser[0]
@needs_browser[1]
@pytest.mark.parametrize("moe", ["portable", "contrib"])
def test_web_page_greedy_matches_reference_in_headless_chromium(tmp_path, moe):
    b = build_tiny_bundle(tmp_path / f"web-{moe}", moe=moe)
    ref = json.loads((b / "reference.json").read_text())
    serve = _load("edgekit_sample_web", APPS / "web" / "serve.py")
    results: queue.Queue = queue.Queue()
    httpd = serve.make_server(b, on_result=results.put)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html?case=0&report=/result"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    browser = subprocess.Popen([CHROMIUM, *flags, url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        r = results.get(timeout=120)
    except queue.Empty:
        browser.kill()
        pytest.fail(f"the page reported nothing in 120 s; chromium stderr: {browser.communicate()[1][-2000:]}")
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        httpd.shutdown()
        httpd.server_close()
    assert r["ok"], r.get("error")
    want = ref["cases"][0]["greedy_ids"]
    assert r["greedy_ids"] == want, f"browser {r['greedy_ids']} vs reference {want}"
    from edgekit.runtime import Engine
    assert r["text"] == Engine.from_bundle(b).tokenizer.decode(want), r["text"]


@needs_browser[0]
@needs_browser[1]
def test_web_page_typed_prompt_streams_the_python_runtimes_greedy_answer(tmp_path):
    """A person's path: type a prompt into the box, press Generate, watch tokens stream; the answer
    (tokenized in the browser by @huggingface/tokenizers) equals edgekit.runtime's greedy answer."""
    from edgekit.runtime import Engine

    b = build_tiny_bundle(tmp_path / "web-typed", moe="portable")
    serve = _load("edgekit_sample_web", APPS / "web" / "serve.py")
    browser = _load("edgekit_sample_browser", APPS / "web" / "browser.py")
    httpd = serve.make_server(b)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    prompt, n = "def add(a, b):\n    return", 12
    try:
        r = browser.type_and_generate(f"http://127.0.0.1:{httpd.server_address[1]}/index.html", prompt, n,
                                      timeout=120, exe=CHROMIUM)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert r["ok"], r.get("error")
    e = Engine.from_bundle(b)
    assert r["typed_prompt"] == prompt and r["prompt_ids"] == e.encode(prompt), (r["prompt_ids"], e.encode(prompt))
    want = e.generate(prompt, max_new_tokens=n, temperature=0)
    assert r["text"] == want, f"browser {r['text']!r} vs python {want!r}"
    assert len(set(r["partials"])) >= 2 and r["partials"][-1] == r["text"], \
        f"not streamed: partial answers seen {r['partials']!r}"
