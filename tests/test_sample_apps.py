"""Sample apps end to end on a tiny random bundle: the terminal REPL driven through stdin, the HTTP
server (streaming, dynamic batching = unbatched results, 4xx/503 errors), and the web page in
headless Chromium (skipped with the reason when chromium or sample_apps/web/node_modules is missing)."""

import http.client
import importlib.util
import json
import queue
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def test_concurrent_requests_are_batched_and_exact(server, engine):
    """Equal-length prompts arrive together: fewer prefill calls than requests, same greedy text."""
    port, batcher = server
    prompts = [PROMPTS[0], PROMPTS[2]] * 3 + [PROMPTS[1]] * 2
    want = {p: engine.generate(p, max_new_tokens=10) for p in set(prompts)}
    before = dict(batcher.stats)
    with ThreadPoolExecutor(len(prompts)) as ex:
        res = list(ex.map(lambda p: _post(port, {"prompt": p, "max_tokens": 10}), prompts))
    texts = [json.loads(b)["choices"][0]["text"] if s == 200 else (s, b) for s, b, _ in res]
    assert texts == [want[p] for p in prompts], (texts, want)
    prefills = batcher.stats["prefill_calls"] - before["prefill_calls"]
    rows = batcher.stats["rows_decoded"] - before["rows_decoded"]
    calls = batcher.stats["decode_calls"] - before["decode_calls"]
    assert prefills < len(prompts) and rows > calls, (prefills, rows, calls, batcher.stats)


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
                                                      "stop": ["never-seen"]})[0], range(8)))
        assert 503 in res and 200 in res and set(res) <= {200, 503}, res
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
