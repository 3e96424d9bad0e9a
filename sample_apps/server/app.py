"""A local HTTP completion server on an edgekit bundle (stdlib only: http.server + threads).

    python sample_apps/server/app.py --bundle DIR [--port 8000] [--max-batch 8]

API: ``POST /v1/completions`` with JSON ``{"prompt": str, "max_tokens": int, "temperature": float,
"top_p": float, "top_k": int, "stop": str | [str], "seed": int, "stream": bool}``.
- ``stream: false`` -> ``{"choices": [{"text", "finish_reason"}], "usage": {...}}``;
- ``stream: true``  -> Server-Sent Events: ``data: {"choices": [{"text": piece, ...}]}`` per piece,
  a last event carrying ``finish_reason`` and ``usage``, then ``data: [DONE]``.
``GET /health`` -> ``{"status": "ok", ...batcher stats}``; ``GET /metrics`` -> Prometheus text format.
Errors are JSON ``{"error": {"message", "code"}}``: 400 bad JSON or fields, 404 unknown path, 405
wrong method, 411 no Content-Length, 413 body or prompt too large, 503 queue full (Retry-After).

Requests are batched continuously by ``batcher.Batcher`` (they join the running batch at every
step, whatever their length; a closed client cancels its request). Handler threads only parse,
validate and stream; one worker thread runs the graph.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
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
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise HTTPError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings")
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
    except EdgekitError as e:
        raise HTTPError(400, str(e)) from None
    return Job(ids, cfg), bool(req.get("stream", False))


def make_handler(engine: Engine, batcher: Batcher, limits: dict):
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgekit-sample/0.1"

        def log_message(self, fmt, *args):     # quiet: one line per request only with --verbose
            if limits.get("verbose"):
                super().log_message(fmt, *args)

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

        def do_PUT(self):
            self.do_DELETE()

        def do_DELETE(self):
            if self.path in ("/v1/completions", "/health"):
                return self._error(405, f"{self.command} is not allowed on {self.path}")
            self._error(404, f"no route {self.path}; use POST /v1/completions or GET /health")

        def do_POST(self):
            if self.path != "/v1/completions":
                return self._error(404 if self.path != "/health" else 405,
                                   f"no POST route {self.path}; use POST /v1/completions")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._error(411, "send a Content-Length header with the JSON body")
            if int(length) > limits["body_bytes"]:
                self.close_connection = True
                return self._error(413, f"body is {length} bytes; the limit is {limits['body_bytes']}")
            try:
                job, stream = parse_request(self.rfile.read(int(length)), engine, limits)
                batcher.submit(job)
            except HTTPError as e:
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
          timeout_s: float = 300, verbose: bool = False) -> tuple[ThreadingHTTPServer, Batcher]:
    """Start the batcher and bind the server (call ``serve_forever`` on it); port 0 = a free port."""
    limits = {"body_bytes": body_bytes, "max_tokens": max_tokens, "timeout_s": timeout_s, "verbose": verbose,
              "prompt_tokens": prompt_tokens or engine.max_positions - 1}
    batcher = Batcher(engine, max_batch, batch_wait_ms, queue_size).start()
    httpd = Server((host, port), make_handler(engine, batcher, limits))
    return httpd, batcher


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="an `edgekit compress` output directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the bundle's target)")
    ap.add_argument("--max-batch", type=int, default=16, help="rows stepped together; 1 = no batching")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long an idle worker waits to fill a batch")
    ap.add_argument("--queue-size", type=int, default=64, help="waiting requests beyond this get 503")
    ap.add_argument("--max-body-bytes", type=int, default=65536)
    ap.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context - 1")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.max_batch < 1 or a.queue_size < 1:
        ap.error("--max-batch and --queue-size must be >= 1")
    try:
        engine = Engine.from_bundle(a.bundle, threads=a.threads)
    except EdgekitError as e:
        sys.exit(f"error: {e}")
    httpd, batcher = serve(engine, a.host, a.port, a.max_batch, a.batch_wait_ms, a.queue_size, a.max_body_bytes,
                           a.max_tokens, a.max_prompt_tokens, verbose=a.verbose)
    print(f"listening on http://{a.host}:{httpd.server_address[1]} (max batch {a.max_batch})", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        batcher.stop()


if __name__ == "__main__":
    main()
