"""A local HTTP completion server on an edgekit bundle (stdlib only: http.server + threads).

    python sample_apps/server/app.py --bundle DIR [--port 8000] [--max-batch 8]

API: ``POST /v1/completions`` with JSON ``{"prompt": str, "max_tokens": int, "temperature": float,
"top_p": float, "top_k": int, "stop": str | [str], "seed": int, "stream": bool}``.
- ``stream: false`` -> ``{"choices": [{"text", "finish_reason"}], "usage": {...}}``;
- ``stream: true``  -> Server-Sent Events: ``data: {"choices": [{"text": piece, ...}]}`` per piece,
  a last event carrying ``finish_reason`` and ``usage``, then ``data: [DONE]``.
``GET /health`` -> ``{"status": "ok", ...batcher stats}``; ``GET /metrics`` -> Prometheus text format.
Every request gets an answer; errors are JSON ``{"error": {"message", "code"}}``: 400 bad JSON,
fields or Content-Length, or a body shorter than announced, 404 unknown path, 405 any other method
(PATCH, HEAD, made-up ones), 408 a body not sent within ``--read-timeout`` seconds, 411 no
Content-Length, 413 body, prompt or request cost too large, 503 queue full (Retry-After), 500 a bug
of ours (logged with its traceback; the server keeps serving).

Limits (each a flag): body bytes, ``max_tokens``, prompt tokens, prompt + ``max_tokens`` per
request (the cost of one request: every token is one graph step), stop strings (count and length:
matching runs on every generated token), seconds to read a request.

Requests are batched continuously by ``batcher.Batcher`` (they join the running batch at every
step, whatever their length; a closed client cancels its request). Handler threads only parse,
validate and stream; one worker thread runs the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))              # batcher.py beside this file
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))          # the edgekit checkout

from batcher import Batcher, Job, client_gone  # noqa: E402
from metrics import CONTENT_TYPE  # noqa: E402

from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.runtime import Engine, GenerationConfig  # noqa: E402

FIELDS = {"prompt": str, "max_tokens": int, "temperature": (int, float), "top_p": (int, float),
          "top_k": int, "stop": (str, list), "seed": int, "stream": bool}
MAX_STOPS = 4
DIGITS = re.compile(r"[0-9]{1,12}")   # Content-Length: ASCII digits only (str.isdigit accepts "²" and "١٢")
# How long a thread may hold the GIL while another waits (CPython's default: 5 ms). A worker gives the
# GIL up in every onnxruntime call and numpy copy and must take it back from the HTTP threads that
# stream its tokens; at 5 ms those waits cost it 1.5 s of numpy copies per 96 requests, at 0.5 ms
# 0.7 s (loaded 2-core dev VM, 16 concurrent streams, profiled in the worker thread).
SWITCH_INTERVAL_S = 0.0005


class HTTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def parse_request(body: bytes, engine: Engine, limits: dict) -> tuple[Job, bool]:
    """Request body -> (job, stream?) or HTTPError naming the bad field."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise HTTPError(400, "body JSON is nested too deeply; send a flat JSON object") from None
    if not isinstance(req, dict):
        raise HTTPError(400, "body must be a JSON object with at least a 'prompt' field")
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
        raise HTTPError(400, f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
    for k, t in FIELDS.items():
        # bool is an int in Python: reject true/false where a number is expected
        if k in req and (not isinstance(req[k], t) or (t is not bool and isinstance(req[k], bool))):
            raise HTTPError(400, f"field '{k}' has the wrong type ({type(req[k]).__name__})")
    if "prompt" not in req:
        raise HTTPError(400, "field 'prompt' is required")
    stop = req.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > limits["max_stops"] or not all(isinstance(s, str) for s in stop):
        raise HTTPError(400, f"'stop' must be a string or a list of at most {limits['max_stops']} strings")
    if any(len(s) > limits["stop_chars"] for s in stop):
        raise HTTPError(400, f"a stop string has {max(len(s) for s in stop)} characters; this server accepts at "
                             f"most {limits['stop_chars']}")
    max_tokens = req.get("max_tokens", min(64, limits["max_tokens"]))
    if not 1 <= max_tokens <= limits["max_tokens"]:
        raise HTTPError(400, f"max_tokens={max_tokens}: use 1..{limits['max_tokens']} on this server")
    try:
        cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=req.get("temperature", 0.0),
                               top_k=req.get("top_k", 0), top_p=req.get("top_p", 1.0), stop=tuple(stop),
                               seed=req.get("seed"))
        ids = engine.encode(req["prompt"])
        if len(ids) > limits["prompt_tokens"]:
            raise HTTPError(413, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                 f"{limits['prompt_tokens']}: shorten it")
        ids = engine.fit(ids, cfg)
        if len(ids) + max_tokens > limits["request_tokens"]:
            raise HTTPError(413, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed this server's "
                                 f"{limits['request_tokens']} tokens per request: shorten the prompt or lower "
                                 "max_tokens")
    except EdgekitError as e:
        raise HTTPError(400, str(e)) from None
    return Job(ids, cfg), bool(req.get("stream", False))


def make_handler(engine: Engine, batcher: Batcher, limits: dict):
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgekit-sample/0.1"
        default_request_version = "HTTP/1.0"    # answers to unparsable request lines carry a status line
        timeout = limits["read_timeout_s"]      # socket timeout: a stalled client frees its thread
        started = False                         # response headers sent (then a 500 can no longer be)

        def log_message(self, fmt, *args):     # quiet: one line per request only with --verbose
            if limits.get("verbose"):
                super().log_message(fmt, *args)

        def send_response(self, code, message=None):
            self.started = True
            super().send_response(code, message)

        def send_error(self, code, message=None, explain=None):
            """http.server's own errors (bad request line, oversized headers, unknown method) as JSON."""
            self.close_connection = True
            if code == 501:      # no do_<METHOD>
                return self._error(405, f"method {self.command!r} is not allowed; use POST /v1/completions or "
                                        "GET /health", {"Allow": "GET, POST"})
            self._error(code, message or "bad request")

        def _guard(self, fn):
            """Run a route; any exception of ours becomes a 500 JSON answer, never a dropped socket."""
            self.started = False
            try:
                fn()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except TimeoutError:
                self.close_connection = True
                if not self.started:
                    self._error(408, f"the request was not received within {limits['read_timeout_s']} s; "
                                     "send the whole body promptly")
            except Exception as e:  # a bug of ours: answer, log, keep serving
                traceback.print_exc(file=sys.stderr)
                self.close_connection = True
                if not self.started:
                    self._error(500, f"internal error ({type(e).__name__}); the server logged it")

        def _json(self, code: int, obj: dict, headers: dict | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str, headers: dict | None = None) -> None:
            self._json(code, {"error": {"message": message, "code": code}}, headers)

        def do_GET(self):
            self._guard(self._get)

        def do_POST(self):
            self._guard(self._post)

        def _not_allowed(self):
            self.close_connection = True         # a HEAD client would not read the JSON body
            self._guard(lambda: self._error(405, f"{self.command} is not allowed on {self.path}; use POST "
                                                 "/v1/completions or GET /health", {"Allow": "GET, POST"}))

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

        def _get(self):
            if self.path == "/health":
                return self._json(200, batcher.health())
            if self.path == "/metrics":
                data = batcher.metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return self.wfile.write(data)
            if self.path == "/v1/completions":
                return self._error(405, "use POST for /v1/completions", {"Allow": "POST"})
            self._error(404, f"no route {self.path}; use POST /v1/completions or GET /health")

        def _body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                raise HTTPError(411, "send a Content-Length header with the JSON body")
            if not DIGITS.fullmatch(length.strip()):
                raise HTTPError(400, f"Content-Length {length[:40]!r} is not a number of bytes")
            n = int(length)
            if n > limits["body_bytes"]:
                raise HTTPError(413, f"body is {n} bytes; the limit is {limits['body_bytes']}")
            body = self.rfile.read(n)
            if len(body) < n:
                raise HTTPError(400, f"the body ended after {len(body)} of {n} bytes; send the whole body")
            return body

        def _post(self):
            if self.path != "/v1/completions":
                return self._error(404 if self.path != "/health" else 405,
                                   f"no POST route {self.path}; use POST /v1/completions")
            try:
                job, stream = parse_request(self._body(), engine, limits)
                batcher.submit(job)
            except HTTPError as e:
                if e.code in (400, 411, 413):
                    self.close_connection = True     # the unread rest of the body must not be parsed as a request
                return self._error(e.code, str(e))
            except queue.Full:
                return self._error(503, "server busy: the request queue is full; retry later",
                                   {"Retry-After": str(batcher.retry_after_s())})
            (self._stream if stream else self._whole)(job)

        def _results(self, job: Job):
            return job.results(limits["timeout_s"], gone=lambda: client_gone(self.connection))

        def _whole(self, job: Job) -> None:
            try:
                parts = list(self._results(job))
            except queue.Empty:
                job.cancelled = True
                return self._error(504, "generation timed out; lower max_tokens or retry")
            if not parts or not isinstance(parts[-1], dict):
                return                                      # the client went away: nobody to answer
            end = parts[-1]
            if end["finish_reason"] == "error":
                return self._error(500, f"generation failed: {end['error']}")
            self._json(200, {"object": "text_completion", "choices": [
                {"index": 0, "text": "".join(parts[:-1]), "finish_reason": end["finish_reason"]}],
                "usage": _usage(end)})

        def _stream(self, job: Job) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                for item in self._results(job):
                    if isinstance(item, dict):
                        ev = {"choices": [{"index": 0, "text": "", "finish_reason": item["finish_reason"]}],
                              "usage": _usage(item), **({"error": item["error"]} if "error" in item else {})}
                    else:
                        ev = {"choices": [{"index": 0, "text": item, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError, queue.Empty):
                job.cancelled = True

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128   # listen backlog; the stdlib's 5 resets connections of a burst of clients


def _usage(end: dict) -> dict:
    p, c = end["prompt_tokens"], end["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16, batch_wait_ms: float = 5,
          queue_size: int = 64, body_bytes: int = 65536, max_tokens: int = 256, prompt_tokens: int | None = None,
          timeout_s: float = 300, verbose: bool = False, request_tokens: int | None = None, max_stops: int = MAX_STOPS,
          stop_chars: int = 64, read_timeout_s: float = 10.0, workers: int = 1) -> tuple[ThreadingHTTPServer, Batcher]:
    """Start the batcher and bind the server (call ``serve_forever`` on it); port 0 = a free port."""
    limits = {"body_bytes": body_bytes, "max_tokens": max_tokens, "timeout_s": timeout_s, "verbose": verbose,
              "prompt_tokens": prompt_tokens or engine.max_positions - 1,
              "request_tokens": request_tokens or engine.max_positions, "max_stops": max_stops,
              "stop_chars": stop_chars, "read_timeout_s": read_timeout_s}
    batcher = Batcher(engine, max_batch, batch_wait_ms, queue_size, workers=workers).start()
    httpd = Server((host, port), make_handler(engine, batcher, limits))
    return httpd, batcher


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="an `edgekit compress` output directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the bundle's target)")
    ap.add_argument("--max-batch", type=int, default=16, help="rows stepped together; 1 = no batching")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker threads, each with its own session on threads/workers threads and its share of "
                         "the batch, run at once (default: one per thread, up to --max-batch)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long an idle worker waits to fill a batch")
    ap.add_argument("--queue-size", type=int, default=64, help="waiting requests beyond this get 503")
    ap.add_argument("--max-body-bytes", type=int, default=65536)
    ap.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context - 1")
    ap.add_argument("--max-request-tokens", type=int, default=None,
                    help="prompt + max_tokens per request (default: the model's context)")
    ap.add_argument("--max-stops", type=int, default=MAX_STOPS, help="stop strings per request")
    ap.add_argument("--max-stop-chars", type=int, default=64, help="characters per stop string")
    ap.add_argument("--read-timeout", type=float, default=10.0, help="seconds to receive a request before 408")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if min(a.max_batch, a.queue_size, a.max_stops + 1, a.max_stop_chars, a.max_body_bytes, a.max_tokens,
           a.workers or 1) < 1 or not a.read_timeout > 0:
        ap.error("--max-batch, --workers, --queue-size, --max-stop-chars, --max-body-bytes, --max-tokens and "
                 "--read-timeout must be positive (--max-stops >= 0)")
    if (a.workers or 1) > a.max_batch:
        ap.error(f"--workers {a.workers} > --max-batch {a.max_batch}: each worker needs at least one row")
    try:
        engine = Engine.from_bundle(a.bundle, threads=a.threads)
    except EdgekitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    a.workers = a.workers or min(engine.threads or os.cpu_count() or 1, a.max_batch)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    httpd, batcher = serve(engine, a.host, a.port, a.max_batch, a.batch_wait_ms, a.queue_size, a.max_body_bytes,
                           a.max_tokens, a.max_prompt_tokens, verbose=a.verbose, request_tokens=a.max_request_tokens,
                           max_stops=a.max_stops, stop_chars=a.max_stop_chars, read_timeout_s=a.read_timeout,
                           workers=a.workers)
    print(f"listening on http://{a.host}:{httpd.server_address[1]} (max batch {a.max_batch}, {a.workers} worker(s) of "
          f"{batcher.stats['threads_per_worker'] or 'all'} thread(s))", flush=True)
    if batcher.inexact:
        print(f"note: a batched answer may differ in the last bits from the request served alone: {batcher.inexact}",
              flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        batcher.stop()


if __name__ == "__main__":
    main()
