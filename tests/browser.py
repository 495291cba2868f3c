"""Headless Chromium for the page tests (chat page, knowledge-base sources, agent page), driven over the Chrome
DevTools Protocol with a few lines of stdlib websocket code, so the tests need no browser-automation package.
Without a Chromium binary the tests are skipped, except in CI (CI set), where they must run. Screenshots go to
$SLMKIT_TEST_ARTIFACTS (default: the test's tmp_path): `save_screenshot`. The fixtures (`browser`, a page) are
conftest.py's, imported from here."""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH, HEIGHT = 1100, 760


# --- a minimal websocket client (RFC 6455, client side), enough for CDP ---------------------------------


class WebSocket:
    def __init__(self, url: str, timeout: float = 60):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        status = self.rfile.readline()
        if b" 101 " not in status:
            raise ConnectionError(f"websocket handshake failed: {status!r}")
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise ConnectionError("websocket closed")
        return data

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class CDP:
    """Chrome DevTools Protocol commands on one page; events are kept in `events`."""

    def __init__(self, ws_url: str):
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        state = self.js("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise AssertionError(f"timed out waiting for {what or expression}; the page shows:\n{state}")

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def press_enter(self, shift: bool = False) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      modifiers=8 if shift else 0, **({"text": "\r"} if kind == "keyDown" else {}))

    def set_value(self, selector: str, value: str) -> None:
        self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.value = {json.dumps(value)};"
                " el.dispatchEvent(new Event('input', {bubbles: true}));"
                " el.dispatchEvent(new Event('change', {bubbles: true})); })()")


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_binary():
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail(f"no Chromium found (looked for {', '.join(BROWSERS)}); CI must install it (.ci/run)")
    pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)}); install it, e.g. apt-get install chromium")


@pytest.fixture(scope="module")
def browser(chromium_binary, tmp_path_factory):
    home = tmp_path_factory.mktemp("chromium")
    profile, log = home / "profile", open(home / "chromium.log", "wb")
    proc = subprocess.Popen([chromium_binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             f"--window-size={WIDTH},{HEIGHT}", "about:blank"], stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"Chromium did not start:\n{(home / 'chromium.log').read_text()[-3000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        cdp.call("Runtime.enable")
        cdp.call("Page.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        yield cdp
        cdp.ws.close()
    finally:
        from conftest import stop_process
        stop_process(proc)
        log.close()


def save_screenshot(page: CDP, name: str, tmp_path: Path) -> Path:
    """A PNG of the page as `name` in $SLMKIT_TEST_ARTIFACTS (else `tmp_path`), checked to be one."""
    artifacts = Path(os.environ.get("SLMKIT_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / name
    path.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (WIDTH, HEIGHT)
    return path


def page_errors(page: CDP) -> list:
    """The JavaScript exceptions the page threw so far."""
    return [e["params"]["exceptionDetails"] for e in page.events if e["method"] == "Runtime.exceptionThrown"]
