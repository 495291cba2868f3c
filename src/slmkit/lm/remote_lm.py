"""`RemoteLM`: any OpenAI-compatible HTTP endpoint as an `LM` (llama.cpp, vLLM, OpenAI, slmkit's own server).

    lm = RemoteLM("http://localhost:8000")              # model: the first one GET /v1/models lists
    lm.generate(["Once upon a time"], SamplingParams(max_new_tokens=32, temperature=0))
    for piece in lm.stream("def fib(n):"):
        print(piece, end="")
    lm.score("The capital of France is", " Paris")       # needs a server that echoes prompt log-probs

Standard library only (urllib + json). Seen from here a remote model is text only: `tokenizer` is None, and
`logprobs(ids)` and token healing are not available.

Requests go to `{root}/v1/completions`; `base_url` may be given with or without the `/v1`. `SamplingParams` map
onto the request as max_new_tokens -> max_tokens, temperature, top_p, stop, seed, plus extensions that vLLM and
llama.cpp accept but OpenAI itself refuses, so they are sent only when they change something: top_k (when > 0),
min_p (when > 0), the repetition penalty (when not 1: vLLM's `repetition_penalty`, llama.cpp's `repeat_penalty`
and `repeat_last_n`) and ignore_eos (when stop_at_eos is False). Stop strings are applied here as well, so a
server that ignores some of them still stops. `extra` is merged into every request for server-specific options,
e.g. `{"repeat_penalty": 1.0}` for llama.cpp, whose default of 1.1 otherwise changes even greedy output.

With `chat=True`, `stream` and `generate` send each prompt to `/v1/chat/completions` as one user message, so the
server applies the model's chat template (for instruction-tuned models behind OpenAI-style chat APIs);
`generate_chat` / `stream_chat` take a whole message list. `score` always uses `/v1/completions`.

The API key (sent as `Authorization: Bearer`) defaults to $SLMKIT_API_KEY, else $OPENAI_API_KEY.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from slmkit import __version__
from slmkit.lm.base import LM, LogProbs, Score
from slmkit.sampling import SamplingParams

_BODY_CHARS = 500  # how much of a server's error body goes into an exception message


class RemoteError(RuntimeError):
    """The server answered with an HTTP error (or an error event in a stream)."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


class RemoteLM(LM):
    """An OpenAI-compatible server (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) as an `LM`.

    `timeout` (seconds) bounds connecting and each wait for data, not a whole streamed answer. `concurrency`
    > 1 sends the prompts of one `generate` call in parallel (servers such as vLLM batch them).
    """

    tokenizer = None

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60, chat: bool = False, extra: dict | None = None, concurrency: int = 1):
        self.root = _normalise_url(base_url)
        if api_key is None:
            api_key = os.environ.get("SLMKIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.api_key = api_key or None
        self.timeout = timeout
        self.chat = chat
        self.extra = dict(extra or {})
        self.concurrency = max(1, int(concurrency))
        self._opener = urllib.request.build_opener()
        self.model = model if model is not None else self._first_model()
        self.name = self.model

    # --- models -----------------------------------------------------------------------------------------

    def _first_model(self) -> str:
        data = self._json("GET", "/v1/models")
        models = (data.get("data") or data.get("models")) if isinstance(data, dict) else data
        if not isinstance(models, list) or not models or not isinstance(models[0], dict):
            raise RuntimeError(f"{self.root}/v1/models lists no models; pass model= explicitly")
        first = models[0]
        model = first.get("id") or first.get("model") or first.get("name")
        if not model:
            raise RuntimeError(f"{self.root}/v1/models: the first entry has no id: {str(first)[:_BODY_CHARS]}")
        # vLLM reports the context length as max_model_len, llama.cpp's server as meta.n_ctx_train.
        ctx = first.get("max_model_len") or (first.get("meta") or {}).get("n_ctx_train")
        if isinstance(ctx, int) and ctx > 0:
            self.max_length = ctx
        return str(model)

    # --- generation -------------------------------------------------------------------------------------

    def stream(self, prompt: str, params: SamplingParams | None = None, heal: bool = False) -> Iterator[str]:
        """The completion of `prompt` as text pieces while the server sends them (server-sent events)."""
        _refuse_heal(heal)
        if self.chat:
            return self.stream_chat([{"role": "user", "content": prompt}], params)
        params = params or SamplingParams()
        if params.max_new_tokens == 0:  # llama.cpp reads max_tokens=0 as "no limit"
            return iter(())
        body = {**self._sampling(params), "prompt": prompt, "stream": True}
        return _apply_stops(self._stream("/v1/completions", body, chat=False), params.stop)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]) as text pieces."""
        params = params or SamplingParams()
        if params.max_new_tokens == 0:
            return iter(())
        body = {**self._sampling(params), "messages": list(messages), "stream": True}
        return _apply_stops(self._stream("/v1/chat/completions", body, chat=True), params.stop)

    def generate(self, prompts: list[str] | str, params: SamplingParams | None = None,
                 heal: bool = False) -> list[str]:
        """One completion per prompt, one (non-streaming) request each; `concurrency` of them at a time."""
        _refuse_heal(heal)
        params = params or SamplingParams()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._map(lambda prompt: self._complete(prompt, params), prompts)

    def _map(self, fn, items: list) -> list:
        """fn over items, `concurrency` at a time, results in order."""
        if self.concurrency > 1 and len(items) > 1:
            with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
                return list(pool.map(fn, items))
        return [fn(x) for x in items]

    def generate_chat(self, messages: list[dict], params: SamplingParams | None = None) -> str:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]), whatever `chat` is."""
        params = params or SamplingParams()
        if params.max_new_tokens == 0:
            return ""
        data = self._json("POST", "/v1/chat/completions", {**self._sampling(params), "messages": list(messages)})
        return _cut_at_stops(_choice_text(data, chat=True), params.stop)

    def _complete(self, prompt: str, params: SamplingParams) -> str:
        if self.chat:
            return self.generate_chat([{"role": "user", "content": prompt}], params)
        if params.max_new_tokens == 0:
            return ""
        data = self._json("POST", "/v1/completions", {**self._sampling(params), "prompt": prompt})
        return _cut_at_stops(_choice_text(data, chat=False), params.stop)

    def _sampling(self, p: SamplingParams) -> dict:
        body = {"model": self.model, "max_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p}
        if p.top_k > 0:
            body["top_k"] = p.top_k
        if p.min_p > 0:
            body["min_p"] = p.min_p
        if p.repetition_penalty != 1.0:  # vLLM's name, then llama.cpp's (each server ignores the other's)
            body.update(repetition_penalty=p.repetition_penalty, repeat_penalty=p.repetition_penalty,
                        repeat_last_n=p.repeat_last_n)
        if stops := [s for s in p.stop if s]:
            body["stop"] = stops
        if p.seed is not None:
            body["seed"] = p.seed
        if not p.stop_at_eos:
            body["ignore_eos"] = True
        return {**body, **self.extra}

    # --- scoring ----------------------------------------------------------------------------------------

    def score(self, context: str, continuation: str) -> Score:
        """log p(continuation | context) from the prompt log-probs the server echoes, and whether it is greedy.

        One request: prompt=context+continuation, echo=true, logprobs=1, max_tokens=1 (llama.cpp reads 0 as
        "no limit"; the one generated token is ignored). The continuation's tokens are those whose text spans
        (from `text_offset`) start at or after len(context), plus one that straddles the boundary when the
        server's tokenizer merged across it (that token carries the continuation's first characters).
        """
        if not continuation:
            return Score(0.0, True, 0)
        prompt = context + continuation
        body = {**self.extra, "model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                "echo": True, "logprobs": 1}
        unsupported = (f"{self.root} does not return prompt log-probs (echo + logprobs); scoring needs a server "
                       "that does, e.g. vLLM or llama-cpp-python's server (python -m llama_cpp.server)")
        try:
            data = self._json("POST", "/v1/completions", body)
        except RemoteError as e:
            if e.status in (400, 404, 422, 501) and re.search(r"echo|logprob", e.body, re.IGNORECASE):
                raise NotImplementedError(f"{unsupported}; it answered: {e.body[:_BODY_CHARS]}") from e
            raise
        choice = _first_choice(data, f"{self.root}/v1/completions")
        lp = choice.get("logprobs")
        if not isinstance(lp, dict):
            raise NotImplementedError(unsupported)
        offsets, token_lps, tops = lp.get("text_offset"), lp.get("token_logprobs"), lp.get("top_logprobs")
        if not offsets or not token_lps or len(offsets) != len(token_lps):
            raise NotImplementedError(unsupported)
        shift = _offset_shift(lp.get("tokens"), choice.get("text"))
        bounds = [o - shift for o in offsets] + [math.inf]
        start, end = len(context), len(prompt)
        total, greedy, n = 0.0, True, 0
        for i, token_lp in enumerate(token_lps):
            lo, hi = bounds[i], bounds[i + 1]
            if lo >= end:  # the generated token
                break
            if lo < start and hi <= start:  # context
                continue
            if token_lp is None:
                raise ValueError(f"{self.root} gives no log-prob for the first token of a prompt, so the "
                                 "continuation of an empty context cannot be scored remotely")
            top = tops[i] if isinstance(tops, list) and i < len(tops) else None
            best = _best_logprob(top)
            if best is None:
                raise NotImplementedError(f"{self.root} returns no top_logprobs; is_greedy cannot be decided")
            total += float(token_lp)
            greedy = greedy and float(token_lp) >= best - 1e-5
            n += 1
        if n == 0:
            raise RuntimeError(f"{self.root}: no token of the echoed prompt covers the continuation "
                               f"(text_offset {offsets[:8]}..., context {start} chars, prompt {end} chars)")
        return Score(total, greedy, n)

    def score_many(self, requests: Sequence[tuple[str, str]]) -> list[Score]:
        """`score` of each pair, `concurrency` requests in flight at a time."""
        return self._map(lambda pair: self.score(*pair), list(requests))

    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        raise NotImplementedError(f"{self!r} is text only: the server's token ids are unknown here, so it cannot "
                                  "score token ids; use score(context, continuation)")

    def encode_prompt(self, prompt: str) -> list[int]:
        raise NotImplementedError(f"{self!r} is text only: it has no tokenizer")

    # --- HTTP -------------------------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: dict | None = None, stream: bool = False):
        url = self.root + path
        headers = {"Accept": "text/event-stream" if stream else "application/json",
                   "User-Agent": f"slmkit/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _http_error(url, e) from None
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
            raise _connection_error(url, e, self.timeout) from e

    def _json(self, method: str, path: str, body: dict | None = None):
        url = self.root + path
        with self._open(method, path, body) as resp:
            return _parse_json(_read(resp, url, self.timeout), url)

    def _stream(self, path: str, body: dict, chat: bool) -> Iterator[str]:
        url = self.root + path
        with self._open("POST", path, body, stream=True) as resp:
            if resp.headers.get_content_type() != "text/event-stream":  # the server ignored stream=true
                text = _choice_text(_parse_json(_read(resp, url, self.timeout), url), chat)
                if text:
                    yield text
                return
            for event in _server_sent_events(resp, url, self.timeout):
                if "error" in event:
                    raise _error_event(url, event)
                choices = event.get("choices") or []
                if not choices:  # e.g. a final usage-only chunk
                    continue
                piece = (choices[0].get("delta") or {}).get("content") if chat else choices[0].get("text")
                if piece:
                    yield piece

    def __repr__(self) -> str:
        return f"RemoteLM({self.model!r} @ {self.root})"


# --- helpers ----------------------------------------------------------------------------------------------


def _normalise_url(base_url: str) -> str:
    """`http://host:port`, `http://host:port/v1/` or `host:port` -> `http://host:port` (requests add /v1/...)."""
    url = base_url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{base_url!r}: RemoteLM speaks http:// or https:// only")
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def _refuse_heal(heal: bool) -> None:
    if heal:
        raise ValueError("token healing (heal=True) needs the model's tokenizer and cannot be done through a "
                         "remote OpenAI-compatible endpoint; use heal=False")


def _read(resp, url: str, timeout: float) -> bytes:
    try:
        return resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise _connection_error(url, e, timeout) from e


def _parse_json(raw: bytes, url: str):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RuntimeError(f"{url} answered with something that is not JSON: {raw[:_BODY_CHARS]!r}") from None


def _first_choice(data, where: str) -> dict:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise RuntimeError(f"{where}: the answer has no choices: {str(data)[:_BODY_CHARS]}")
    return choices[0]


def _choice_text(data, chat: bool) -> str:
    choice = _first_choice(data, "the chat completion" if chat else "the completion")
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    return text or ""


def _server_sent_events(resp, url: str, timeout: float) -> Iterator[dict]:
    """The JSON payloads of a text/event-stream body, up to `data: [DONE]`."""
    data: list[str] = []

    def dispatch():
        payload = "\n".join(data)
        data.clear()
        return payload

    try:
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line:
                if line.startswith(":"):  # a comment (keep-alive)
                    continue
                field, _, value = line.partition(":")
                if field == "data":
                    data.append(value[1:] if value.startswith(" ") else value)
                continue
            if not data:
                continue
            payload = dispatch()
            if payload.strip() == "[DONE]":
                return
            yield _parse_json(payload.encode(), url)
    except (OSError, http.client.HTTPException) as e:
        raise _connection_error(url, e, timeout) from e
    if data and (payload := dispatch()).strip() != "[DONE]":
        yield _parse_json(payload.encode(), url)


def _apply_stops(pieces: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """Cut a stream of text pieces before the first stop string, holding back only what could still become one."""
    stops = [s for s in stops if s]
    try:
        if not stops:
            yield from pieces
            return
        hold = max(len(s) for s in stops) - 1
        pending = ""
        for piece in pieces:
            pending += piece
            cuts = [i for i in (pending.find(s) for s in stops) if i != -1]
            if cuts:
                if min(cuts):
                    yield pending[:min(cuts)]
                return
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
        if pending:
            yield pending
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:  # stop reading the response (and close the connection) as soon as we are done
            close()


def _cut_at_stops(text: str, stops: Iterable[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return text[:min(cuts)] if cuts else text


def _offset_shift(tokens, text) -> int:
    """How far the server's text offsets run ahead of the echoed text.

    vLLM counts a leading special token (`<s>`) in its offsets although the echoed text does not contain it.
    """
    if not tokens or not isinstance(text, str) or not all(isinstance(t, str) for t in tokens):
        return 0
    joined = "".join(tokens)
    if len(joined) > len(text) and joined.endswith(text):
        return len(joined) - len(text)
    return 0


def _best_logprob(top) -> float | None:
    """The highest log-prob among a position's top alternatives ({token: logprob} or [{"logprob": ...}])."""
    if isinstance(top, dict):
        values = list(top.values())
    elif isinstance(top, list):
        values = [t.get("logprob") for t in top if isinstance(t, dict)]
    else:
        return None
    values = [float(v) for v in values if isinstance(v, int | float)]
    return max(values) if values else None


def _error_message(body: str) -> str:
    """The server's own error message out of an OpenAI-style JSON error body, else the body itself."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return body.strip()
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err
        if err:
            return err if isinstance(err, str) else json.dumps(err)
    return body.strip()


def _http_error(url: str, e: urllib.error.HTTPError) -> RemoteError:
    try:
        body = e.read(64 * 1024).decode("utf-8", errors="replace")
    except Exception:  # the body only decorates the message
        body = ""
    finally:
        e.close()
    message = _error_message(body)
    if len(message) > _BODY_CHARS:
        message = message[:_BODY_CHARS] + "..."
    hint = ""
    if e.code in (401, 403):
        hint = " (check api_key, or $SLMKIT_API_KEY / $OPENAI_API_KEY)"
    return RemoteError(f"{url}: HTTP {e.code} {e.reason}{hint}: {message or '(empty body)'}", e.code, body)


def _error_event(url: str, event: dict) -> RemoteError:
    message = _error_message(json.dumps(event))
    return RemoteError(f"{url}: the server reported an error mid-stream: {message[:_BODY_CHARS]}", None, message)


def _connection_error(url: str, e: BaseException, timeout: float) -> ConnectionError:
    reason = getattr(e, "reason", None) or e
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return ConnectionError(f"{url} did not answer within {timeout:g} s: is the server overloaded or still "
                               "loading the model? (raise RemoteLM(timeout=...))")
    return ConnectionError(f"cannot reach {url} ({reason}): is the server running, and are the host, port and "
                           "http/https scheme right? (proxies from $HTTP_PROXY/$HTTPS_PROXY are used if set)")
