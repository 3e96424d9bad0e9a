"""Serve the web sample: the page, onnxruntime-web from node_modules, and a bundle, on loopback.

    python sample_apps/web/serve.py --bundle WEB_BUNDLE [--port 8080]   # then open the printed URL

Routes: ``/`` the page, ``/ort/*`` node_modules/onnxruntime-web/dist, ``/hf/*``
node_modules/@huggingface/tokenizers/dist, ``/bundle/*`` the bundle's
files, ``POST /result`` (the page reports its result there when the URL has ``report=/result``;
``make_server(..., on_result=fn)`` receives it: the test uses this instead of a DevTools client).
Directories are never listed (404); a ``POST /result`` without a numeric Content-Length, with a
body over 1 MB, cut short, or not JSON gets a 4xx; a client that stalls is dropped after 10 s.
"""

from __future__ import annotations

import argparse
import json
import re
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORT_DIST = HERE / "node_modules" / "onnxruntime-web" / "dist"
HF_DIST = HERE / "node_modules" / "@huggingface" / "tokenizers" / "dist"
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".onnx": "application/octet-stream"}


MAX_RESULT_BYTES = 1 << 20
DIGITS = re.compile(r"[0-9]{1,12}")


class Handler(SimpleHTTPRequestHandler):
    timeout = 10

    def __init__(self, *a, bundle: Path, on_result=None, **kw):
        self.bundle, self.on_result = bundle, on_result
        super().__init__(*a, directory=str(HERE), **kw)

    def log_message(self, *a):
        pass

    def guess_type(self, path):
        return TYPES.get(Path(str(path)).suffix, None) or super().guess_type(path)

    def translate_path(self, path):
        path = path.split("?", 1)[0]
        for prefix, root in (("/ort/", ORT_DIST), ("/hf/", HF_DIST), ("/bundle/", self.bundle)):
            if path.startswith(prefix):
                p = (root / path[len(prefix):]).resolve()
                return str(p) if p.is_relative_to(root.resolve()) else str(root / "missing")
        return super().translate_path(path)

    def list_directory(self, path):
        self.send_error(404, "directory listing is disabled")
        return None

    def do_POST(self):
        if self.path != "/result":
            self.send_error(404)
            return
        length = self.headers.get("Content-Length", "")
        if not DIGITS.fullmatch(length.strip()):
            self.send_error(411 if not length else 400, "send a numeric Content-Length with the JSON body")
            return
        if int(length) > MAX_RESULT_BYTES:
            self.send_error(413, f"the result may be at most {MAX_RESULT_BYTES} bytes")
            return
        body = self.rfile.read(int(length))
        try:
            result = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self.send_error(400, "the body is not complete JSON")
            return
        if self.on_result:
            self.on_result(result)
        self.send_response(204)
        self.end_headers()


def make_server(bundle, host: str = "127.0.0.1", port: int = 0, on_result=None) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer((host, port), partial(Handler, bundle=Path(bundle), on_result=on_result))
    httpd.daemon_threads = True
    return httpd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args(argv)
    if not ORT_DIST.is_dir() or not HF_DIST.is_dir():
        raise SystemExit("onnxruntime-web or @huggingface/tokenizers is not installed: run `npm ci` in sample_apps/web")
    httpd = make_server(a.bundle, port=a.port)
    print(f"open http://127.0.0.1:{httpd.server_address[1]}/index.html?case=0", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
