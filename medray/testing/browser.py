"""Headless Chromium as a person's browser, driven over the DevTools protocol on a pipe.

:func:`open_page` starts Debian's ``chromium`` (``make system-deps``) with
``--remote-debugging-pipe`` (no port, nothing listening), opens a URL, waits for
the load event and returns a :class:`PageVisit`: every request the page made
(from the ``Network`` domain, the browser's own record), a full-page PNG
screenshot and each ``<figure>``'s box and the number of drawn SVG elements in
it (and how many of the groups a report marks as drawn from data have a
non-empty box). Host names resolve to nothing (``--host-resolver-rules``), so a page that
tries to fetch from the web fails to, and the attempt still shows in
``requests``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["chromium_path", "open_page", "PageVisit"]

#: What counts as drawn inside an SVG (matplotlib draws with path/use; others use the rest).
_DRAWN = "path,use,line,polyline,polygon,rect,circle,ellipse,image,text"

_FIGURES_JS = f"""
JSON.stringify(Array.from(document.querySelectorAll('figure')).map(f => {{
  const r = f.getBoundingClientRect();
  const svg = f.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : null;
  return {{
    name: f.dataset.figure || f.id,
    x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height,
    svg: box ? {{x: box.left + window.scrollX, y: box.top + window.scrollY,
                 width: box.width, height: box.height}} : null,
    drawn: svg ? svg.querySelectorAll('{_DRAWN}').length : 0,
    data: svg ? Array.from(svg.querySelectorAll('[id^="data-"]')).filter(g => {{
      const b = g.getBBox(); return b.width + b.height > 0; }}).length : 0,
  }};
}}))
"""


@dataclass
class PageVisit:
    """What the browser saw.

    Attributes:
        requests: URL of every request the page made (the page itself included).
        failed: URL of every request that failed.
        figures: per ``<figure>``: name, box (page coordinates, CSS pixels), ``svg`` box, ``drawn``
            SVG elements and ``data``: groups drawn from data (``id="data-N"``, see
            :mod:`medray.platform.report`) with a non-empty bounding box.
        screenshot: the full page as PNG bytes.
        scale: device pixels per CSS pixel in ``screenshot``.
    """

    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    screenshot: bytes = b""
    scale: float = 1.0


def chromium_path() -> str | None:
    """The Chromium binary (Debian's ``chromium`` first), or None when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Pipe:
    """DevTools messages over fds 3 (to the browser) and 4 (from it), NUL-terminated JSON."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self._w, self._r = write_fd, read_fd
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._next(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._next(max(0.1, deadline - time.monotonic()))
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def _next(self, timeout: float) -> dict:
        import select

        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium over the DevTools pipe")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)


def open_page(url: str, *, width: int = 1280, height: int = 900, timeout: float = 60) -> PageVisit:
    """Open ``url`` in headless Chromium and report its requests, figures and a full-page screenshot.

    Raises:
        FileNotFoundError: no Chromium installed (``apt-get install chromium``, or ``make system-deps``).
    """
    binary = chromium_path()
    if binary is None:
        raise FileNotFoundError("chromium is not installed: `apt-get install -y chromium` (make system-deps)")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    profile = tempfile.mkdtemp(prefix="medray-chromium-")
    args = [
        binary,
        "--headless",
        "--remote-debugging-pipe",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    # The browser reads commands on fd 3 and writes replies on fd 4: bash moves the pipe ends there
    # (subprocess closes every fd it was not told to keep after a preexec_fn would have run).
    # (above 9 first, so that moving one end onto 3 or 4 cannot close the other)
    r, w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
    proc = subprocess.Popen(
        ["bash", "-c", f'exec 3<&{r} 4>&{w} {r}<&- {w}>&-; exec "$@"', "bash", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(r, w),
    )
    for fd in (r, w, to_browser_r, from_browser_w):
        os.close(fd)
    pipe = _Pipe(to_browser_w, from_browser_r)
    visit = PageVisit()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout)
        time.sleep(0.3)  # late requests (none expected) still reach the event list
        figures = pipe.send("Runtime.evaluate", {"expression": _FIGURES_JS, "returnByValue": True}, session=session)
        visit.figures = json.loads(figures["result"]["value"])
        shot = pipe.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session, timeout=timeout
        )
        visit.screenshot = base64.b64decode(shot["data"])
        pipe.send("Browser.close")
    finally:
        urls: dict[str, str] = {}
        for ev in pipe.events:
            params = ev.get("params", {})
            if ev.get("method") == "Network.requestWillBeSent":
                urls[params.get("requestId", "")] = params.get("request", {}).get("url", "")
                visit.requests.append(urls[params.get("requestId", "")])
            elif ev.get("method") == "Network.loadingFailed":
                visit.failed.append(urls.get(params.get("requestId", ""), "?"))
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_browser_w)
        os.close(from_browser_r)
        shutil.rmtree(profile, ignore_errors=True)
    return visit
