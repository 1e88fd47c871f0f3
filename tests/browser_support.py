"""Headless Chromium driven over the DevTools protocol, for browser tests of the tab.

Needs Debian's `chromium` (or any Chromium/Chrome on PATH) and `websockets` >= 11 (Gradio depends
on it, so every stack with Gradio has it). Input goes through the protocol as a user's would
(mouse events at an element's centre, typed text, Tab), and every wait is for a state the page
shows, with a deadline, never a fixed delay.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Gradio 3 renders inside <gradio-app>'s shadow root when it has one; Gradio 4 in the document.
ROOT_JS = "(document.querySelector('gradio-app') && document.querySelector('gradio-app').shadowRoot || document)"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One browser tab."""

    def __init__(self, ws_url: str, *, timeout: float = 120.0, size: tuple[int, int] = (1400, 1000)) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=256 * 1024 * 1024, open_timeout=30)
        self.timeout = timeout
        self._n = 0
        self.console: list[str] = []  # console errors and uncaught exceptions, for test messages
        self.size = size
        self.call("Page.enable")
        self.call("Runtime.enable")
        self._viewport(*size)

    def _viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, **params):
        self._n += 1
        self.ws.send(json.dumps({"id": self._n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=self.timeout))
            if msg.get("id") == self._n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method = msg.get("method")
        if method == "Runtime.exceptionThrown":
            self.console.append(str(msg["params"]["exceptionDetails"].get("text")))
        elif method == "Runtime.consoleAPICalled" and msg["params"].get("type") == "error":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in msg["params"]["args"]))

    def eval(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr[:80]}: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    def front(self) -> None:
        """Make this the visible tab (a background tab is throttled and not laid out, like a real one)."""
        self.call("Page.bringToFront")

    def close(self) -> None:
        """Close the tab itself (its page stops polling), not only our connection to it."""
        with contextlib.suppress(Exception):  # already gone
            self.call("Page.close")
        self.ws.close()

    # ------------------------------------------------------------------ reading the page
    def q(self, selector: str) -> str:
        """JS for the first element matching `selector` inside the Gradio root."""
        return f"{ROOT_JS}.querySelector({json.dumps(selector)})"

    def text(self, selector: str) -> str:
        return self.eval(f"(() => {{ const e = {self.q(selector)}; return e ? e.innerText : ''; }})()") or ""

    def value(self, elem_id: str) -> str:
        sel = f"#{elem_id} textarea, #{elem_id} input"
        return self.eval(f"(() => {{ const e = {self.q(sel)}; return e ? e.value : null; }})()")

    def visible(self, selector: str) -> bool:
        return bool(self.eval(f"(() => {{ const e = {self.q(selector)}; if (!e) return false;"
                              " const r = e.getBoundingClientRect(); const s = getComputedStyle(e);"
                              " return r.width > 0 && r.height > 0 && s.visibility !== 'hidden'; })()"))

    def wait(self, expr: str, *, timeout: float | None = None, what: str = ""):
        """Until the JS expression is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.eval(expr)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what or expr[:120]}; console: {self.console[-5:]}")
            time.sleep(0.1)

    def wait_text(self, selector: str, needle: str, *, timeout: float | None = None) -> str:
        """Until the element's text contains `needle` (case-sensitive); returns the text."""
        js = f"(() => {{ const e = {self.q(selector)}; const t = e ? e.innerText : '';" \
             f" return t.includes({json.dumps(needle)}) ? t : ''; }})()"
        return self.wait(js, timeout=timeout, what=f"{needle!r} in {selector} (now: {self.text(selector)[:300]!r})")

    def wait_value(self, elem_id: str, needle: str, *, timeout: float | None = None) -> str:
        """Until the component's input/textarea value contains `needle`; returns the value."""
        sel = json.dumps(f"#{elem_id} textarea, #{elem_id} input")
        js = (f"(() => {{ const e = {ROOT_JS}.querySelector({sel}); const v = e ? e.value : '';"
              f" return v.includes({json.dumps(needle)}) ? v : ''; }})()")
        return self.wait(js, timeout=timeout, what=f"{needle!r} in the value of #{elem_id}")

    # ------------------------------------------------------------------ acting like a user
    def _centre(self, selector: str) -> tuple[float, float]:
        js = (f"(() => {{ const e = {self.q(selector)}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
              " const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        xy = self.wait(js, what=f"element {selector}")
        return xy[0], xy[1]

    def click(self, selector: str, *, retries: int = 2) -> None:
        """A mouse click at the element's centre, once nothing else (a menu, an overlay) covers it there."""
        hit = (f"(x, y) => {{ const e = {self.q(selector)}; const h = document.elementFromPoint(x, y);"
               " return !!e && !!h && (e === h || e.contains(h) || (h.shadowRoot && h.shadowRoot.contains(e))); }")
        deadline = time.monotonic() + 10
        while True:  # like a person: wait until it stops moving (the page updates itself every second)
            x, y = self._centre(selector)
            time.sleep(0.05)
            still = (x, y) == self._centre(selector)
            if (still and self.eval(f"({hit})({x}, {y})")) or time.monotonic() > deadline:
                break
            if still:
                self.key("Escape", "Escape", 27)  # close an open dropdown list that covers it
            time.sleep(0.1)
        # the press must reach the element: a page that re-renders itself (a run's last updates arriving a
        # tick after its result) can move it between measuring and pressing; then, as a person would, once more
        self._presses = getattr(self, "_presses", 0) + 1
        flag = f"window.__lt_press_{self._presses}"
        self.eval(f"(() => {{ {flag} = false; const e = {self.q(selector)};"
                  f" if (e) e.addEventListener('mousedown', () => {{ {flag} = true; }}, {{capture: true, once: true}});"
                  " })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        if not self.eval(flag) and retries > 0:
            self.click(selector, retries=retries - 1)

    def key(self, key: str, code: str | None = None, keycode: int = 0) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code or key, windowsVirtualKeyCode=keycode)

    def fill(self, elem_id: str, value: object, *, commit: str = "Tab") -> None:
        """Type `value` into the component's input (replacing what is there), then Tab (or Enter) out."""
        sel = f"#{elem_id} textarea, #{elem_id} input"
        self.click(sel)
        self.eval(f"(() => {{ const e = {self.q(sel)}; e.focus(); e.select(); }})()")
        self.call("Input.dispatchKeyEvent", type="keyDown", key="Delete", code="Delete", windowsVirtualKeyCode=46)
        self.call("Input.dispatchKeyEvent", type="keyUp", key="Delete", code="Delete", windowsVirtualKeyCode=46)
        if str(value):
            self.call("Input.insertText", text=str(value))
        if commit == "Enter":
            self.key("Enter", "Enter", 13)
        elif commit == "Tab":
            self.key("Tab", "Tab", 9)

    def choose(self, elem_id: str, label: str) -> None:
        """Pick a radio option by its label."""
        self.click_text(f"#{elem_id} label", label)

    def click_text(self, selector: str, text: str) -> None:
        """Click the first element matching `selector` whose text contains `text`."""
        js = (f"(() => {{ const all = [...{ROOT_JS}.querySelectorAll({json.dumps(selector)})];"
              f" const i = all.findIndex(e => e.innerText.includes({json.dumps(text)}));"
              " if (i < 0) return null; all.forEach(e => e.removeAttribute('data-lt-pick'));"
              " all[i].setAttribute('data-lt-pick', '1'); return true; })()")
        self.wait(js, what=f"{text!r} in {selector}")
        self.click(f"{selector}[data-lt-pick='1']")

    def click_nth(self, selector: str, n: int) -> None:
        """Click the n-th (0-based) element matching `selector`."""
        js = (f"(() => {{ const all = [...{ROOT_JS}.querySelectorAll({json.dumps(selector)})];"
              f" if (all.length <= {n}) return null; all.forEach(e => e.removeAttribute('data-lt-pick'));"
              f" all[{n}].setAttribute('data-lt-pick', '1'); return true; }})()")
        self.wait(js, what=f"{n + 1} of {selector}")
        self.click(f"{selector}[data-lt-pick='1']")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'", what="page load")

    def reload(self) -> None:
        self.call("Page.reload", ignoreCache=True)
        self.wait("document.readyState === 'complete'", what="page reload")

    def screenshot(self, path: str | Path, *, full_page: bool = True) -> Path:
        if full_page:
            height = int(self.eval("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"))
            self._viewport(self.size[0], min(height, 16000))
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        if full_page:
            self._viewport(*self.size)
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def clip_screenshot(self, path: str | Path, selector: str, *, pad: int = 8) -> Path:
        """A picture of one part of the page (a tutorial step)."""
        js = (f"(() => {{ const e = {self.q(selector)}; e.scrollIntoView(); const r = e.getBoundingClientRect();"
              " return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]; })()")
        box = None
        for _ in range(50):  # until the layout has settled (pictures loading, a poll's update)
            now = self.wait(js, what=f"element {selector}")
            if now == box:
                break
            box = now
            time.sleep(0.2)
        x, y, w, h = box
        clip = {"x": max(0, x - pad), "y": max(0, y - pad), "width": w + 2 * pad, "height": h + 2 * pad, "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)


class Browser:
    def __init__(self, port: int, width: int, height: int) -> None:
        self.port, self.width, self.height = port, width, height

    def _json(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def new_page(self, url: str | None = None) -> Page:
        target = self._json("/json/new?about:blank", method="PUT")
        page = Page(target["webSocketDebuggerUrl"], size=(self.width, self.height))
        if url:
            page.goto(url)
        return page


@contextmanager
def chromium(*, width: int = 1400, height: int = 1000, timeout: float = 60.0) -> Iterator[Browser]:
    """A headless Chromium with its own throw-away profile; stopped (only this process) at the end."""
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("no chromium found; apt-get install chromium")
    profile = Path(tempfile.mkdtemp(prefix="lora-trainer-chromium-"))
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not start (no DevToolsActivePort)")
            time.sleep(0.1)
        yield Browser(int(port_file.read_text().split()[0]), width, height)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        shutil.rmtree(profile, ignore_errors=True)


def websockets_ok() -> bool:
    try:
        from websockets.sync.client import connect  # noqa: F401
    except ImportError:
        return False
    return True


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")
