"""Bad requests to the HTTP sample (and the web sample's server), as one table (issue "Trust
boundaries", item 5): every request gets an answer (JSON 4xx for what the client got wrong, 500 JSON
for a bug of ours, never a closed socket), the server keeps serving, and the bundle is untouched.

Requests are written byte by byte on a raw socket, so malformed framing (Content-Length "²",
bodies cut short or stalled, unknown methods, garbage request lines) reaches the server as sent.
"""

import http.client
import importlib.util
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from .test_bad_input import snapshot
from .test_runtime_engine import PROMPTS, build_tiny_bundle

APPS = Path(__file__).resolve().parents[1] / "sample_apps"
READ_TIMEOUT_S = 1.0


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("srv-bad") / "bundle")


@pytest.fixture(scope="module")
def server(bundle):
    from edgekit.runtime import Engine

    app = _load("edgekit_sample_server_bad", APPS / "server" / "app.py")
    before = snapshot(bundle)
    httpd, batcher = app.serve(Engine.from_bundle(bundle), port=0, max_batch=4, queue_size=8, body_bytes=65536,
                               max_tokens=32, request_tokens=60, read_timeout_s=READ_TIMEOUT_S)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield app, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    batcher.stop()
    assert snapshot(bundle) == before, "serving must not change the bundle"


def exchange(port: int, data: bytes, close_write: bool = False, timeout: float = 60) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one HTTP response (status, headers, body); status 0 = no response at all."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        r = http.client.HTTPResponse(s, method="HEAD" if data.startswith(b"HEAD") else None)
        try:
            r.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return 0, {}, b""
        return r.status, dict(r.getheaders()), r.read()
    finally:
        s.close()


def post(body: bytes, length: str | None = "auto", path: str = "/v1/completions", extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    if length is not None:
        head += f"Content-Length: {len(body) if length == 'auto' else length}\r\n".encode()
    return head + extra + b"\r\n" + body


def js(obj) -> bytes:
    return json.dumps(obj).encode()


# (id, raw request, status, words in the JSON error message, send only part then wait / close)
CASES = [
    ("seed -1", post(js({"prompt": "a", "seed": -1})), 400, "seed=-1"),
    ("lone surrogate prompt", post(b'{"prompt": "\\ud800"}'), 400, "surrogate"),
    ("Content-Length superscript two", post(b'{"prompt": "a"}', length="\u00b2"), 400, "Content-Length"),
    ("Content-Length Arabic-Indic digits", post(b'{"prompt": "a"}', length="\u0661\u0662"), 400, "Content-Length"),
    ("Content-Length negative", post(b'{"prompt": "a"}', length="-5"), 400, "Content-Length"),
    ("Content-Length not a number", post(b'{"prompt": "a"}', length="abc"), 400, "Content-Length"),
    ("Content-Length 40 digits", post(b'{"prompt": "a"}', length="9" * 40), 400, "Content-Length"),
    ("no Content-Length", post(b'{"prompt": "a"}', length=None), 411, "Content-Length"),
    ("body over the limit", post(b"{}", length="9999999"), 413, "limit"),
    ("five stop strings", post(js({"prompt": "a", "stop": ["x", "y", "z", "w", "v"]})), 400, "at most 4"),
    ("a 16,000-character stop string", post(js({"prompt": "a", "stop": ["s" * 16000] * 4})), 400, "characters"),
    ("prompt + max_tokens over the per-request budget", post(js({"prompt": "word " * 30, "max_tokens": 32})), 413,
     "per request"),
    ("stop is a number", post(js({"prompt": "a", "stop": 5})), 400, "'stop'"),
    ("seed is a float", post(js({"prompt": "a", "seed": 1.5})), 400, "'seed'"),
    ("not UTF-8", post(b'{"prompt": "\xff\xfe"}'), 400, "not valid JSON"),
    ("deeply nested JSON", post(b"[" * 30000 + b"]" * 30000), 400, "JSON"),
    ("PATCH", b"PATCH /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "not allowed"),
    ("OPTIONS", b"OPTIONS /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    ("made-up method", b"FROB /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    ("garbage request line", b"GARBAGE\r\n\r\n", 400, ""),
    ("GET unknown path", b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no route"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_requests_get_a_json_answer(case, server):
    _, port = server
    name, data, code, words = case
    status, headers, body = exchange(port, data)
    assert status == code, (status, body[:300])
    err = json.loads(body)["error"]
    assert err["code"] == code and words in err["message"] and "Traceback" not in err["message"], err
    assert headers["Content-Type"] == "application/json"


def test_head_gets_405_without_hanging(server):
    status, headers, _ = exchange(server[1], b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers["Content-Type"] == "application/json"


def test_body_cut_short_gets_400(server):
    data = post(b'{"prompt": "abc"}', length="100")
    status, _, body = exchange(server[1], data, close_write=True)
    assert status == 400 and "ended after" in json.loads(body)["error"]["message"], body


def test_stalled_body_gets_408_and_frees_the_thread(server):
    t = time.perf_counter()
    status, _, body = exchange(server[1], post(b'{"prompt": "ab', length="100"), timeout=30)
    assert status == 408 and "not received" in json.loads(body)["error"]["message"], body
    assert time.perf_counter() - t < 20, "the read timeout must end a stalled request"


def test_a_bug_of_ours_is_a_500_json_and_the_server_keeps_serving(server, monkeypatch, capsys):
    app, port = server

    def boom(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(app, "parse_request", boom)
    status, _, body = exchange(port, post(js({"prompt": "a"})))
    assert status == 500 and "internal error" in json.loads(body)["error"]["message"], body
    monkeypatch.undo()
    status, _, body = exchange(port, post(js({"prompt": PROMPTS[0], "max_tokens": 4})))
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("length", "stop"), body


def test_still_serving_after_every_bad_request(server):
    _, port = server
    status, _, body = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"
    ok = post(js({"prompt": PROMPTS[1], "max_tokens": 6, "stop": ["q" * 64] * 4}))
    status, _, body = exchange(port, ok)
    assert status == 200, body


# -- the web sample's server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def web(bundle):
    serve = _load("edgekit_sample_web_bad", APPS / "web" / "serve.py")
    results = []
    httpd = serve.make_server(bundle, on_result=results.append)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], results
    httpd.shutdown()
    httpd.server_close()


WEB_CASES = [
    ("result: Content-Length not a number", post(b'{"ok": true}', length="abc", path="/result"), 400),
    ("result: no Content-Length", post(b'{"ok": true}', length=None, path="/result"), 411),
    ("result: body over 1 MB", post(b"{}", length=str(1 << 24), path="/result"), 413),
    ("result: not JSON", post(b"{not json", path="/result"), 400),
    ("bundle directory listing", b"GET /bundle/ HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("page directory listing", b"GET /ort/ HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("path traversal", b"GET /bundle/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
]


@pytest.mark.parametrize("case", WEB_CASES, ids=[c[0] for c in WEB_CASES])
def test_web_server_bad_requests(case, web):
    port, results = web
    _, data, code = case
    n = len(results)
    status, _, body = exchange(port, data)
    assert status == code, (status, body[:300])
    assert b"model.onnx" not in body and b"root:" not in body and len(results) == n
    status, _, _ = exchange(port, post(b'{"ok": true}', path="/result"))
    assert status == 204 and results[-1] == {"ok": True}, "the web server keeps working"
