"""Screenshot of the "Train LoRA" tab in headless Chromium, driven over the DevTools protocol.

Run with a Python that has `websockets` >= 11 (every WebUI venv has it: gradio depends on it):
    python tests/webui/screenshot.py URL OUT.png [--chromium PATH] [--width 1400] [--height 2000]
Opens URL#lora_trainer (our JS opens the tab from that hash), waits until the tab is visible and the
page is idle, and writes a full-page PNG.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request


def _wait_devtools(port: int, deadline: float) -> str:
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("Chromium's DevTools endpoint did not come up")


class _Cdp:
    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=20)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return res.get("result", {}).get("value")


LAST: dict = {}  # facts read from the page by the last screenshot() call (for tests)

_ROOT_JS = "(document.querySelector('gradio-app') && document.querySelector('gradio-app').shadowRoot || document)"


_COUNT_REFRESHES_JS = """
window.__ltRefreshes = 0;
const __ltDispatch = EventTarget.prototype.dispatchEvent;
EventTarget.prototype.dispatchEvent = function (e) {
    if (e && e.type === "click" && this.id && this.id.endsWith("_lora_extra_refresh_internal")) window.__ltRefreshes++;
    return __ltDispatch.call(this, e);
};
"""


def _value_js(selector: str) -> str:
    return f"(() => {{ const e = {_ROOT_JS}.querySelector({json.dumps(selector)}); return e ? e.value : null; }})()"


def screenshot(url: str, out: str, *, chromium: str | None = None, width: int = 1400, height: int = 2000,
               timeout: float = 90.0, scroll_to: str | None = None, click: str | None = None,
               wait_for: str | None = None) -> str:
    """Screenshot of the tab. click: a selector clicked once the tab is open (e.g. the refresh
    button); wait_for: a selector whose value must become non-empty before the picture. Afterwards
    the "Send to txt2img" button is clicked and what it did is stored in LAST."""
    chromium = chromium or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        raise FileNotFoundError("no chromium found; apt-get install chromium")
    port = 9300 + os.getpid() % 500
    profile = tempfile.mkdtemp(prefix="lora-trainer-chromium-")
    proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                             f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        cdp = _Cdp(_wait_devtools(port, deadline))
        cdp.call("Page.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        # count, from the page's start, clicks sent to the WebUI's hidden Lora-cards refresh buttons
        cdp.call("Page.addScriptToEvaluateOnNewDocument", source=_COUNT_REFRESHES_JS)
        cdp.call("Page.navigate", url=url.split("#")[0].rstrip("/") + "/#lora_trainer")
        visible = "(() => { const t = document.querySelector('gradio-app') || document;" \
                  " const root = t.shadowRoot || t; const el = root.querySelector('#tab_lora_trainer');" \
                  " return !!el && getComputedStyle(el).display !== 'none'; })()"
        while time.time() < deadline and not cdp.eval(visible):
            time.sleep(0.5)
        if not cdp.eval(visible):
            raise TimeoutError("the Train LoRA tab did not open")
        time.sleep(3)  # let the tab's first refresh (job status, gallery) land
        if click:
            cdp.eval(f"{_ROOT_JS}.querySelector({json.dumps(click)}).click()")
        if wait_for:
            while time.time() < deadline and not cdp.eval(_value_js(wait_for)):
                time.sleep(0.5)
            time.sleep(2)
        if scroll_to:
            cdp.eval(f"(() => {{ const e = document.querySelector({json.dumps(scroll_to)});"
                     " if (e) e.scrollIntoView(); }})()")
        page_h = int(cdp.eval("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)") or height)
        cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=min(max(page_h, height), 6000),
                 deviceScaleFactor=1, mobile=False)
        time.sleep(1)
        data = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        with open(out, "wb") as f:
            f.write(base64.b64decode(data))
        LAST.clear()
        LAST["send_text"] = cdp.eval(_value_js("#lora_trainer_send_text textarea")) or ""
        LAST["lora_cards_refreshes"] = cdp.eval("window.__ltRefreshes || 0")
        cdp.eval(f"{_ROOT_JS}.querySelector('#lora_trainer_send_to_txt2img').click()")
        time.sleep(1.5)
        LAST["txt2img_prompt"] = cdp.eval(_value_js("#txt2img_prompt textarea")) or ""
        LAST["active_tab"] = cdp.eval(
            f"(() => {{ const b = {_ROOT_JS}.querySelector('#tabs > .tab-nav > button.selected');"
            " return b ? b.textContent.trim() : null; })()")
        cdp.ws.close()
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--chromium")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=2000)
    a = p.parse_args()
    print(screenshot(a.url, a.out, chromium=a.chromium, width=a.width, height=a.height))


if __name__ == "__main__":
    main()
