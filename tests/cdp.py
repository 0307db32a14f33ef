"""A minimal Chrome DevTools Protocol client: headless Chromium driven over one websocket (``websocket-client``).

Just what the browser test needs: start Chromium, open a page, evaluate JavaScript, dispatch mouse and key events,
take a screenshot. No driver binary, no network.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
HOW_TO_GET_CHROMIUM = ("no Chromium found; install it (Debian/Ubuntu: `sudo apt-get install chromium`, macOS: "
                       "`brew install --cask chromium`) or point DIFFGR2_CHROMIUM at a Chrome/Chromium binary")


def find_chromium() -> str | None:
    env = os.environ.get("DIFFGR2_CHROMIUM")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a process started with ``start_new_session=True`` and every process of its group."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # helpers (zygote, renderers) that outlived the main process
    except ProcessLookupError:
        pass
    proc.wait()


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium with one page target. Use as a context manager."""

    def __init__(self, binary: str, profile_dir: Path, width: int = 1400, height: int = 1000, log=None):
        self.binary, self.profile_dir = binary, Path(profile_dir)
        self.width, self.height = width, height
        self.log = log
        self.proc = None
        self.ws = None
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self):
        import websocket  # websocket-client, installed with the Jupyter stack

        self.profile_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)          # a stale one from an earlier run names a closed port
        args = [self.binary, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-port=0",
                "--remote-allow-origins=*", f"--user-data-dir={self.profile_dir}",
                f"--window-size={self.width},{self.height}", "about:blank"]
        # Chromium's sandbox refuses root and often lacks user namespaces in containers; this browser only ever
        # loads the test's own JupyterLab on 127.0.0.1
        args.insert(1, "--no-sandbox")
        tmp = self.profile_dir / "tmp"              # its singleton socket dir lands here, not in /tmp
        tmp.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log or subprocess.DEVNULL,
                                     env=dict(os.environ, TMPDIR=str(tmp)),
                                     start_new_session=True)   # its own process group: closed as one below
        deadline = time.time() + 60
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            if self.proc.poll() is not None:
                raise CDPError(f"Chromium exited with code {self.proc.returncode}")
            if time.time() > deadline:
                raise CDPError("Chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        return self

    def __exit__(self, *exc):
        try:
            if self.ws is not None:
                self.ws.close()
        finally:
            if self.proc is not None:
                _stop_group(self.proc)

    # --------------------------------------------------------------------------------------- protocol
    def call(self, method: str, **params):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
                del self.events[:-500]

    def js(self, expression: str, await_promise: bool = True):
        """Evaluate ``expression`` in the page; returns its value (JSON-serialisable results only)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise,
                        userGesture=True)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CDPError(f"JavaScript error: {d.get('exception', {}).get('description') or d.get('text')}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str | None = None, poll: float = 0.25):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.time() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what or expression}")
            time.sleep(poll)

    def console_errors(self) -> list[str]:
        return [json.dumps(e["params"])[:300] for e in self.events if e["method"] == "Runtime.exceptionThrown"]

    # --------------------------------------------------------------------------------------- actions
    def goto(self, url: str):
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def drag(self, x0: float, y0: float, x1: float, y1: float, steps: int = 8):
        """Press the left button at (x0, y0), move to (x1, y1) in steps, release (a real pointer drag)."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x0, y=y0)
        self.call("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", buttons=1, clickCount=1)
        for i in range(1, steps + 1):
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        self.call("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y1, button="left", buttons=0,
                  clickCount=1)
