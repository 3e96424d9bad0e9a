"""Drive the web sample in headless Chromium as a person would: type a prompt, press Generate, read
the streamed answer, take a screenshot. Speaks the DevTools protocol over ``--remote-debugging-pipe``
(stdlib only: no puppeteer/selenium needed).

    python sample_apps/web/browser.py --bundle BUNDLE --prompt "def fibonacci(n):" [--n 32] [--screenshot page.png]

prints the answer's JSON (text, ids, the partial texts seen while streaming, timings). The test
(tests/test_sample_apps.py) uses ``type_and_generate``.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One Chromium tab over the DevTools pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, exe: str, profile: Path, width: int = 1000, height: int = 900):
        hi = lambda fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)  # noqa: E731 (above 3/4 before the dup2)
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        self._child = (hi(cmd_r), hi(out_w))
        for fd in (cmd_r, out_w):
            os.close(fd)
        self._w, self._r = cmd_w, out_r

        def fds():
            os.dup2(self._child[0], 3)
            os.dup2(self._child[1], 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-pipe", f"--window-size={width},{height}", f"--user-data-dir={profile}",
                 "about:blank"]
        self.proc = subprocess.Popen([exe, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=fds, pass_fds=(3, 4))
        for fd in self._child:
            os.close(fd)
        self._buf, self._id, self._lock = b"", 0, threading.Lock()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: bool = False, timeout: float = 60, **params) -> dict:
        with self._lock:
            self._id += 1
            msg = {"id": self._id, "method": method, "params": params}
            if session:
                msg["sessionId"] = self.session
            os.write(self._w, json.dumps(msg).encode() + b"\0")
            end = time.monotonic() + timeout
            while True:
                while b"\0" not in self._buf:
                    if time.monotonic() > end or self.proc.poll() is not None:
                        raise RuntimeError(f"chromium did not answer {method} (exit {self.proc.poll()})")
                    chunk = os.read(self._r, 1 << 20)
                    if not chunk:
                        raise RuntimeError(f"chromium closed the pipe during {method}")
                    self._buf += chunk
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", session=True, expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error in {expr!r}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float, every: float = 0.05):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = self.js(expr)
            if v:
                return v
            time.sleep(every)
        raise TimeoutError(f"page: {expr!r} still false after {timeout} s")

    def click(self, element_id: str) -> None:
        box = self.js(f"(() => {{ const r = document.getElementById({element_id!r}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            os.close(fd)


def type_and_generate(url: str, prompt: str, n: int = 32, timeout: float = 180, screenshot: Path | None = None,
                      exe: str | None = None) -> dict:
    """Open ``url`` (the sample page), type ``prompt``, set greedy with ``n`` new tokens, press Generate,
    wait for the end; returns the page's result plus ``partials`` (the answer texts seen while streaming)."""
    with tempfile.TemporaryDirectory(prefix="edgekit-chromium-") as profile:
        page = Page(exe or chromium(), Path(profile))
        try:
            page.call("Page.navigate", session=True, url=url)
            status = page.wait("(() => { const s = document.getElementById('status');"
                               " return s && /^(ready|failed)/.test(s.textContent) && s.textContent; })()", timeout)
            if status.startswith("failed"):
                raise RuntimeError(f"the page failed to load: {status}")
            page.js(f"document.getElementById('n').value = {int(n)}; document.getElementById('temperature').value = 0;"
                    " window.__partials = []; new MutationObserver(() => {"
                    " const g = document.querySelector('#out .gen'); if (g) window.__partials.push(g.textContent);"
                    " }).observe(document.getElementById('out'), {childList: true, subtree: true,"
                    " characterData: true});"
                    " true")
            page.js("document.getElementById('prompt').focus(); true")
            page.call("Input.insertText", session=True, text=prompt)           # typed into the focused box
            page.click("go")
            page.wait("document.getElementById('status').textContent.startsWith('done')"
                      " || document.getElementById('status').textContent.startsWith('failed')", timeout)
            result = json.loads(page.js("document.getElementById('result').textContent"))
            result["partials"] = page.js("window.__partials")
            result["typed_prompt"] = page.js("document.getElementById('prompt').value")
            if screenshot:
                page.screenshot(screenshot)
            return result
        finally:
            page.close()


def main(argv=None):
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--screenshot", default=None)
    a = ap.parse_args(argv)
    if chromium() is None:
        raise SystemExit("chromium not installed (Debian: apt-get install -y chromium)")
    spec = importlib.util.spec_from_file_location("edgekit_sample_web", HERE / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    httpd = serve.make_server(a.bundle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = type_and_generate(f"http://127.0.0.1:{httpd.server_address[1]}/index.html", a.prompt.replace("\\n", "\n"),
                              a.n, screenshot=a.screenshot)
    finally:
        httpd.shutdown()
        httpd.server_close()
    print(json.dumps({k: r.get(k) for k in ("ok", "text", "ids", "stop", "prefill_ms", "decode_ms_per_token",
                                            "ort_version", "error")} | {"partials_seen": len(r["partials"])}))


if __name__ == "__main__":
    main()
