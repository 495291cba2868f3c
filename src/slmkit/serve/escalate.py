"""`slm serve SMALL --escalate-to LARGE|URL|queue:FILE --calibration CAL --target-error 0.05`: a cascade in the
server.

Every chat completion is first answered by the served (small) model through the engine, with its token log-probs;
the reply's confidence (`lm.cascade.confidence`, the feature the calibration file was fitted on) is mapped to
P(correct) by the calibration, and when it is below the threshold chosen for the target error, the request is
answered by the escalation target instead: any LM `load_lm` opens (a bigger local model, an OpenAI-compatible
URL) or a hand-off queue for people (`queue:FILE.jsonl`, `lm.handoff.HandoffQueue`). The response says which:

    body     "slmkit": {"answered_by": "small" | "large", "confidence": P, "threshold": T, "escalate_to": NAME}
    headers  X-Slmkit-Answered-By: small | large,  X-Slmkit-Confidence: P
    metrics  slmkit_cascade_answers_total{answered_by="small" | "large"}

A streamed request gets the chosen reply once decided (the small model's reply must be complete before the
decision), with the "slmkit" field in its first chunk. One choice per request (n=1) and free text or tool calls:
a request for n > 1 or structured output is a 400 (the target cannot be held to a grammar). With `tools`, the
small model's calls are constrained to the tools' schemas as without a cascade, and its confidence is that of
its call; an escalated request's messages carry the tools as the small model saw them (serve/tools.py's system
message), and a `<tool_call>` in the target's reply becomes a tool call (one that does not parse stays text).
/v1/completions is answered by the small model alone. The
small model's log-probs come from the engine's batched decoders: serve it with the torch or llama.cpp backend.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from slmkit.lm.base import LM
from slmkit.lm.calibration import Calibration, load_calibration
from slmkit.lm.cascade import TOP_K, confidence
from slmkit.sampling import SamplingParams
from slmkit.serve import guard, protocol, stream
from slmkit.serve.engine import Engine, GenerationRequest
from slmkit.serve.protocol import APIError, ChatBody

FEATURES = ("mean_logprob", "neg_entropy")  # what one engine generation's log-probs give


@dataclass
class Escalation:
    large: LM
    calibration: Calibration
    threshold: float
    target_error: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one escalated reply at a time: an LM is not
    # safe to call from several threads at once

    def info(self, answered_by: str, p: float) -> dict:
        # an infinite threshold (nothing on dev reached the target: everything escalates) is null in JSON
        threshold = self.threshold if math.isfinite(self.threshold) else None
        return {"answered_by": answered_by, "confidence": round(p, 6), "threshold": threshold,
                "escalate_to": self.large.name}


def load_escalation(target: str, calibration: str, target_error: float = 0.05, device: str = "cpu") -> Escalation:
    """The escalation target (`queue:FILE` for people, else anything `load_lm` opens) and the threshold for
    `target_error` from the calibration file."""
    from slmkit.lm import load_lm
    from slmkit.lm.handoff import HandoffQueue
    cal = load_calibration(calibration)
    if cal.feature not in FEATURES:
        raise ValueError(f"{calibration}: feature {cal.feature!r} cannot be served; slm serve scores "
                         f"{' or '.join(FEATURES)} (calibrate with --feature mean_logprob)")
    threshold = cal.threshold(target_error)
    large = HandoffQueue(target[len("queue:"):]) if target.startswith("queue:") else load_lm(target, device=device)
    return Escalation(large, cal, threshold, target_error)


async def chat(engine: Engine, escalation: Escalation, metrics, request: Request, body: ChatBody,
               messages: list[dict], ids: list[int], params: SamplingParams, n: int, logprobs: int | None,
               model_name: str, timeout_s: float, grammar: str | None = None) -> Response:
    """Answer one chat completion through the cascade (see the module docstring); `grammar`: the tools' (the
    request's other structured output is refused here)."""
    if n != 1:
        raise APIError(400, "with --escalate-to each request gets one choice; send n=1", param="n")
    if body.response_format is not None or body.json_schema is not None or body.grammar is not None:
        raise APIError(400, "structured output is not served with --escalate-to (the escalation target cannot "
                            "be held to the grammar)", param="response_format")
    feature = escalation.calibration.feature
    top = max(TOP_K if feature == "neg_entropy" else 0, logprobs or 0)
    asked = GenerationRequest(ids, params, n=1, logprobs=top, grammar=grammar)
    pendings = guard.submit_all(engine, [asked], "messages")
    deadline = asyncio.get_running_loop().time() + timeout_s
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    tools = bool(body.tools) and body.tool_choice != "none"
    choices = protocol.Choices(engine.tokenizer, model_name, True, 1, 1, True, len(ids), include_usage, tools=tools)
    try:
        finished = await stream.collect(request, choices, pendings, deadline)
    except TimeoutError:
        raise guard.timeout_error(timeout_s) from None
    if not finished:
        return Response(status_code=499)
    # Score the reply's own tokens as calibration did (`Cascade.score_answer` re-scores the reply's text): the end
    # token and a held-back stop string are generated but are not part of the text.
    score = await _score_reply(engine, escalation, feature, ids, choices)
    p = float(escalation.calibration(score))
    who = "small" if p >= escalation.threshold else "large"
    if who == "large":
        def ask_large() -> str:
            with escalation.lock:
                return "".join(escalation.large.stream_chat(messages, params))
        try:
            async with asyncio.timeout(max(0.0, deadline - asyncio.get_running_loop().time())):
                text = await asyncio.to_thread(ask_large)
        except TimeoutError:
            raise guard.timeout_error(timeout_s) from None
        except Exception as e:
            raise APIError(502, f"the escalation target {escalation.large.name} failed: {e}",
                           type="server_error") from e
        choices.texts[0], choices.tokens[0], choices.finish[0] = text, [], "stop"
        tok = escalation.large.tokenizer or engine.tokenizer
        choices.completion_tokens = len(tok.encode(text))
    choices.logprobs = logprobs is not None
    if logprobs is not None:  # the engine was asked for as many alternatives as the confidence needed
        choices.tokens[0] = [(t, lp, dict(list(alts.items())[:logprobs])) for t, lp, alts in choices.tokens[0]]
    metrics.observe_answer(who)
    info = escalation.info(who, p)
    headers = {"X-Slmkit-Answered-By": who, "X-Slmkit-Confidence": f"{p:.6f}"}
    choices.annotate = lambda text: info
    if body.stream:
        return stream.whole_reply(choices, headers)
    return JSONResponse(choices.response(), headers=headers)


async def _score_reply(engine: Engine, escalation: Escalation, feature: str, prompt_ids: list[int],
                       choices: protocol.Choices) -> float:
    """The reply's confidence as calibration computes it (`Cascade.score_answer`: the log-probs of the reply's
    text, re-encoded), from the generation's own log-probs when its tokens are that encoding, else by scoring
    the text again (a model may generate a word in pieces its tokenizer would not split it into)."""
    tok = engine.tokenizer
    answer_ids = tok.encode(choices.texts[0])
    tokens = choices.tokens[0][:len(answer_ids)]
    if [t for t, _, _ in tokens] == [tok.decode([i]) for i in answer_ids]:
        return confidence(feature, [lp for _, lp, _ in tokens], [list(top.values()) for _, _, top in tokens])

    def rescore() -> float:
        with escalation.lock:  # off the engine thread: the model's forward pass keeps no state between calls
            lp = engine.lm.logprobs((prompt_ids + answer_ids)[-engine.max_length:], top_k=TOP_K)
        n = len(answer_ids)
        return confidence(feature, lp.token_logprobs[-n:], lp.top_logprobs[-n:])
    return await asyncio.to_thread(rescore)
