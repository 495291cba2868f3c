"""The chat page (serve/chat.html) in a real headless Chromium (tests/browser.py), against a real server over a
tiny fitted model. The screenshot goes to $SLMKIT_TEST_ARTIFACTS (default: the test's tmp_path) as chat_page.png.
"""

import json
import urllib.error
import urllib.request

import pytest
import torch
from browser import page_errors, save_screenshot
from conftest import live_server, tiny_model_dir

pytestmark = pytest.mark.slow

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"
MODEL = "tiny-chat"
API_KEY = "test-key-123"


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

    save_screenshot(page, "chat_page.png", tmp_path)

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

    assert not page_errors(page)
