"""Screenshot the chat page after a real streamed exchange, in headless Chromium (docs/serve_chat.png).

Drives Chromium over its DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by NUL on
file descriptors 3 and 4, no extra package): opens URL (give it `?prompt=...` so the page sends a message),
waits until the page marks the reply done (`document.body.dataset.done`), and saves a PNG. `chromium
--screenshot` alone shoots at the load event, before the streamed reply has arrived.

    python3 scripts/chat_screenshot.py "http://127.0.0.1:8000/?prompt=import%20os" docs/serve_chat.png
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time


class DevTools:
    def __init__(self, chromium: str, width: int, height: int):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        os.set_inheritable(to_chrome_r, True)
        os.set_inheritable(from_chrome_w, True)
        self._profile = tempfile.mkdtemp()
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "--remote-debugging-pipe"]

        def fds():  # the child's fd 3 reads our messages, its fd 4 writes its own (via high fds: no clobbering)
            r, w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 100), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 100)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(cmd, preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next, self._buf = 0, b""

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("out", help="PNG path")
    ap.add_argument("--chromium", default="chromium")
    ap.add_argument("--size", default="1000x700", help="WIDTHxHEIGHT")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the reply")
    a = ap.parse_args()
    width, height = (int(v) for v in a.size.split("x"))
    dt = DevTools(a.chromium, width, height)
    try:
        target = dt.call("Target.createTarget", url="about:blank")["targetId"]
        session = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        dt.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                mobile=False)
        dt.call("Page.navigate", session, url=a.url)
        deadline = time.monotonic() + a.timeout
        while True:
            done = dt.call("Runtime.evaluate", session, expression="document.body && document.body.dataset.done")
            if done["result"].get("value") == "1":
                break
            if time.monotonic() > deadline:
                print(f"chat_screenshot: no finished reply within {a.timeout:.0f} s; shooting anyway", file=sys.stderr)
                break
            time.sleep(0.25)
        png = dt.call("Page.captureScreenshot", session, format="png")["data"]
        with open(a.out, "wb") as f:
            f.write(base64.b64decode(png))
        print(f"wrote {a.out}")
    finally:
        dt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
