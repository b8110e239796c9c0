"""Drive headless Chromium over the Chrome DevTools Protocol: the browser driver of the report's
tests (tests/test_report_interactive.py) and of benchmarks/report_load.py.

The protocol runs over a pipe (--remote-debugging-pipe: the browser reads commands on fd 3 and
writes replies and events on fd 4, each a JSON message ending in a NUL byte), so no port is opened
and no package beyond the browser is needed. Input goes through Input.dispatchMouseEvent: real
pointer events at screen positions, which the page handles exactly as a user's.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CALL_TIMEOUT_S = 120.0
"""How long one DevTools command may wait for its reply."""


def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with one page; `call` sends a command to the page and waits for its reply."""

    def __init__(self, chromium: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "about:blank"]
        # A tiny Python launcher puts the child's two ends at fds 3 and 4 (copies first, so that an
        # end that is itself 3 or 4 is not overwritten) and execs the browser.
        launcher = ("import os, sys; a, b = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
                    "os.dup2(a, 3); os.dup2(b, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
                    "os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", launcher, str(to_browser_r), str(from_browser_w), chromium,
                                      *args], pass_fds=(to_browser_r, from_browser_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next, self._buffer, self.events = 0, b"", []
        self.page: str | None = None  # the attached page's channel id, which page commands carry
        self._channel_field = ""  # the protocol's name for that id, as the attach reply spells it
        target = self.call("Target.createTarget", url="about:blank", to_page=False)["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True, to_page=False)
        ((self._channel_field, self.page),) = attached.items()  # flatten mode: its one field is the channel id
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _read(self, deadline: float) -> dict[str, Any]:
        """The next message, or TimeoutError at `deadline` (time.monotonic()): a page that never loads
        (a file the browser downloads instead) sent nothing more, and the read waited for good."""
        while b"\0" not in self._buffer:
            if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("the browser sent nothing in time (the page did not load, or is not a page)")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def call(self, method: str, to_page: bool = True, **params: Any) -> dict[str, Any]:
        """Send one command (to the page unless to_page=False) and return its result."""
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if to_page and self.page:
            msg[self._channel_field] = self.page
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def open(self, url: str, timeout: float = 60) -> float:
        """Navigate and wait for the load event; returns the seconds it took."""
        self.events.clear()
        t0 = time.perf_counter()
        self.call("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            try:
                self.events.append(self._read(end))
            except TimeoutError:
                raise TimeoutError(f"{url} did not load in {timeout} s") from None
        return time.perf_counter() - t0

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def centre(self, selector: str, dx: float = 0.5, dy: float = 0.5) -> tuple[float, float]:
        """Scroll the element into view; the viewport position at fraction (dx, dy) of its box."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                      "{block: 'center'}); const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
        return box[0] + dx * box[2], box[1] + dy * box[3]

    def hover(self, x: float, y: float) -> None:
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, x: float, y: float) -> None:
        self.hover(x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path, selector: str | None = None) -> Path:
        """A PNG of the viewport, or of one element (scrolled into view)."""
        params: dict[str, Any] = {"format": "png"}
        if selector is not None:
            box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
                          "const r = e.getBoundingClientRect(); return [r.x + scrollX, r.y + scrollY, r.width, "
                          "r.height]; })()")
            params.update(clip={"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1},
                          captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def console(self) -> list[str]:
        """Console messages and log entries the page produced so far."""
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
            elif e.get("method") == "Log.entryAdded":
                out.append(e["params"]["entry"]["text"])
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(str(e["params"]["exceptionDetails"]))
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", to_page=False)
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)
