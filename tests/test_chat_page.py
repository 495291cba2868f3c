"""The chat page (serve/chat.html) in a real headless Chromium, against a real server over a tiny fitted model.

The browser is driven over the Chrome DevTools Protocol with a few lines of stdlib websocket code, so the test
needs no browser-automation package. Without a Chromium binary the test is skipped, except in CI (CI set), where
it must run. The screenshot goes to $SLMKIT_TEST_ARTIFACTS (default: the test's tmp_path) as chat_page.png.
"""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import live_server, stop_process, tiny_model_dir

pytestmark = pytest.mark.slow

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"
MODEL = "tiny-chat"
API_KEY = "test-key-123"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


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


# --- fixtures: the browser, the server ----------------------------------------------------------------------


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
                             "--window-size=1100,760", "about:blank"], stdout=log, stderr=subprocess.STDOUT)
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
        cdp.call("Emulation.setDeviceMetricsOverride", width=1100, height=760, deviceScaleFactor=1, mobile=False)
        yield cdp
        cdp.ws.close()
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from slmkit.lm import load_lm
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([TEXT] * 30, vocab_size=300)
    # 160 positions hold the longest conversation below (~100 tokens) + 24 new ones; 60 steps give readable text.
    lm = load_lm(str(tiny_model_dir(tmp_path_factory.mktemp("chat") / "m", tok, train_on=TEXT, steps=60,
                                    max_seq_len=160)))
    engine = Engine(lm, max_batch=4, max_queue=8)
    try:
        with live_server(create_app(engine, MODEL, api_key=API_KEY)) as base:
            yield base
    finally:
        engine.close()


def api(base: str, path: str, body: dict | None = None, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# --- the test -----------------------------------------------------------------------------------------------

ASSISTANT = "document.querySelectorAll('#messages .msg.assistant')"
# The page's SSE reader on a stream cut every 3 bytes: mid-line, mid-character, CRLF endings, no final newline.
SPLIT_SSE = """(async () => {
  const bytes = new TextEncoder().encode('data: {"a":"é✓"}\\r\\n\\n: comment\\ndata: x\\ndata: y\\n\\ndata: [DONE]');
  const body = new ReadableStream({start(c) {
    for (let i = 0; i < bytes.length; i += 3) c.enqueue(bytes.slice(i, i + 3));
    c.close();
  }});
  const got = [];
  await readSSE(body, (data) => got.push(data));
  return got;
})()"""
RECORD = """(() => {
  window.__requests = [];
  const fetch0 = window.fetch;
  window.fetch = (url, opts) => {
    if (String(url).endsWith('/v1/chat/completions')) window.__requests.push(JSON.parse(opts.body));
    return fetch0(url, opts);
  };
  window.__updates = 0;  // how many times an assistant message's text changed: more than once when it streamed
  new MutationObserver((records) => {
    for (const r of records) if (r.target.matches && r.target.matches('.msg.assistant .content')) window.__updates++;
  }).observe(document.querySelector('#messages'), {childList: true, subtree: true});
})()"""


def wait_for_reply(page, n: int) -> str:
    """The text of the n-th assistant message, once it has streamed to the end."""
    page.wait_for(f"{ASSISTANT}.length >= {n} && {ASSISTANT}[{n - 1}].dataset.state === 'done'"
                  " && document.querySelector('#send').disabled === false", what=f"assistant reply #{n}")
    return page.js(f"{ASSISTANT}[{n - 1}].querySelector('.content').textContent")


def test_chat_page_streams_replies_and_keeps_the_conversation(browser, server, tmp_path):
    page = browser
    status, body = api(server, "/v1/models", key=None)
    assert status == 401 and body["error"]["message"]

    # Without the API key the page shows the server's error; entering the key loads the model name.
    page.call("Page.navigate", url=server + "/")
    page.wait_for(f"location.href.startsWith({json.dumps(server)}) && document.readyState === 'complete'"
                  " && document.querySelector('#model-name').textContent !== 'loading…'", what="the page to load")
    page.wait_for("document.querySelector('#error').textContent.length > 0", what="the 401 error shown")
    assert body["error"]["message"] in page.js("document.querySelector('#error').textContent")
    page.set_value("#api-key", API_KEY)
    page.wait_for(f"document.querySelector('#model-name').textContent === {json.dumps(MODEL)}", what="the model name")
    assert page.js("document.querySelector('#error').textContent") == ""
    assert page.js("localStorage.getItem('slmkit.apiKey')") == API_KEY

    assert page.js(SPLIT_SSE) == ['{"a":"é✓"}', "x\ny", "[DONE]"]

    # Greedy settings, then the first message (typed, sent with the Send button).
    page.js(RECORD)
    page.set_value("#temperature", "0")
    page.set_value("#max-tokens", "24")
    page.set_value("#system", "You write Python.")
    page.type_into("#prompt", "def area")
    page.js("document.querySelector('#send').click()")
    reply1 = wait_for_reply(page, 1)
    system = {"role": "system", "content": "You write Python."}
    history = [system, {"role": "user", "content": "def area"}]
    status, direct = api(server, "/v1/chat/completions", {"model": MODEL, "messages": history, "temperature": 0,
                                                         "max_tokens": 24})
    assert status == 200, direct
    assert reply1 and reply1 == direct["choices"][0]["message"]["content"]
    assert page.js("window.__updates") > 1
    assert page.js(f"{ASSISTANT}[0].querySelector('.content').children.length") == 0  # text, never HTML

    # Shift+Enter is a new line; Enter sends the second message, with the whole conversation.
    page.type_into("#prompt", "for r in")
    page.press_enter(shift=True)
    page.type_into("#prompt", "range(5):")
    assert page.js("document.querySelector('#prompt').value") == "for r in\nrange(5):"
    assert page.js("document.querySelectorAll('#messages .msg').length") == 2
    page.press_enter()
    reply2 = wait_for_reply(page, 2)
    history += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "for r in\nrange(5):"}]
    requests = page.js("window.__requests")
    assert [r["messages"] for r in requests] == [history[:2], history]
    assert all(r["stream"] is True and r["temperature"] == 0 and r["max_tokens"] == 24 for r in requests)
    status, direct = api(server, "/v1/chat/completions", {"model": MODEL, "messages": history, "temperature": 0,
                                                         "max_tokens": 24})
    assert status == 200 and reply2 == direct["choices"][0]["message"]["content"]
    roles = page.js("[...document.querySelectorAll('#messages .msg')].map(m => m.className)")
    assert roles == ["msg user", "msg assistant"] * 2
    assert page.js("document.querySelector('#prompt').value") == ""

    artifacts = Path(os.environ.get("SLMKIT_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    (artifacts / "chat_page.png").write_bytes(png)
    data = (artifacts / "chat_page.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1100, 760)

    # A server error (prompt + max_tokens beyond the context) is shown; the failed turn goes back to the prompt box.
    page.set_value("#max-tokens", "5000")
    page.type_into("#prompt", "print(")
    page.press_enter()
    page.wait_for("document.querySelector('#error').textContent.length > 0", what="the 400 error shown")
    too_long = history + [{"role": "assistant", "content": reply2}, {"role": "user", "content": "print("}]
    status, direct = api(server, "/v1/chat/completions", {"model": MODEL, "messages": too_long, "temperature": 0,
                                                         "max_tokens": 5000})
    assert status == 400 and page.js("document.querySelector('#error').textContent") == direct["error"]["message"]
    assert page.js("document.querySelectorAll('#messages .msg').length") == 4
    assert page.js("document.querySelector('#prompt').value") == "print("

    # New chat forgets the conversation: the same first message gets the same first reply.
    page.js("document.querySelector('#clear').click()")
    assert page.js("document.querySelectorAll('#messages .msg').length") == 0
    assert page.js("document.querySelector('#error').textContent") == ""
    page.set_value("#max-tokens", "24")
    page.set_value("#prompt", "def area")
    page.js("document.querySelector('#send').click()")
    assert wait_for_reply(page, 1) == reply1
    assert page.js("window.__requests.at(-1).messages") == history[:2]

    errors = [e["params"]["exceptionDetails"] for e in page.events if e["method"] == "Runtime.exceptionThrown"]
    assert not errors, errors
