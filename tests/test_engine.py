"""The serving engine: continuous batching gives exactly what one-at-a-time decoding gives."""

import asyncio

import pytest
from conftest import tiny_model_dir

from slmkit.lm import load_lm
from slmkit.sampling import SamplingParams
from slmkit.serve.engine import Engine, GenerationRequest, PromptTooLong, QueueFull
from slmkit.tokenizer import train_tokenizer

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    d = tiny_model_dir(tmp_path_factory.mktemp("engine") / "m", tok, train_on=TEXT, max_seq_len=128)
    return load_lm(str(d))


async def collect(engine, request):
    texts, finish, ids = {}, {}, {}
    async for ev in engine.generate(request):
        texts[ev.index] = texts.get(ev.index, "") + ev.text
        if ev.token_id is not None:
            ids.setdefault(ev.index, []).append(ev.token_id)
        if ev.finish_reason:
            finish[ev.index] = ev.finish_reason
    return texts, finish, ids


def run(coro):
    return asyncio.run(coro)


def run_together(engine, lm, prompts, params):
    """Submit one request per (prompt, params) at once; each one's (texts, finish reasons, ids) by choice."""
    async def main():
        reqs = [GenerationRequest(lm.encode_prompt(p), sp) for p, sp in zip(prompts, params, strict=True)]
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    try:
        return run(main())
    finally:
        engine.close()


def test_concurrent_requests_decode_exactly_like_one_at_a_time(lm):
    prompts = ["def area", "for r in", "print(", "    return 3", "d", "café ✓"]
    params = [SamplingParams(max_new_tokens=8 + 5 * i, temperature=0, stop_at_eos=False) for i in range(6)]
    expected = [lm.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    # fewer rows than requests: some wait, join as others leave
    results = run_together(Engine(lm, max_batch=4), lm, prompts, params)
    for (texts, finish, ids), want, sp in zip(results, expected, params, strict=True):
        assert texts[0] == want and finish[0] == "length" and len(ids[0]) == sp.max_new_tokens


def test_n_choices_seeds_stop_strings_and_logprobs(lm):
    engine = Engine(lm, max_batch=8)
    ids = lm.encode_prompt("for r in")
    try:
        sampled = GenerationRequest(ids, SamplingParams(max_new_tokens=20, temperature=1.5, seed=3), n=3)
        a, b = run(collect(engine, sampled)), run(collect(engine, sampled))
        assert a == b and len(a[0]) == 3 and len(set(a[0].values())) > 1  # reproducible, choices differ
        greedy = lm.generate("for r in", SamplingParams(max_new_tokens=30, temperature=0))[0]
        stop = greedy[5:7]
        texts, finish, _ = run(collect(engine, GenerationRequest(
            ids, SamplingParams(max_new_tokens=30, temperature=0, stop=[stop]))))
        assert texts[0] == greedy[:greedy.find(stop)] and finish[0] == "stop"

        async def with_logprobs():
            events = []
            async for ev in engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=5, temperature=0),
                                                              logprobs=3)):
                events.append(ev)
            return events

        events = run(with_logprobs())
        lp = lm.logprobs(ids + [e.token_id for e in events], top_k=3)
        for i, ev in enumerate(events):
            assert ev.logprob == pytest.approx(float(lp.token_logprobs[len(ids) - 1 + i]), abs=1e-4)
            assert len(ev.top_logprobs) <= 3 and max(ev.top_logprobs.values()) == pytest.approx(ev.logprob, abs=1e-4)
    finally:
        engine.close()


def test_cancelled_requests_free_their_rows(lm):
    engine = Engine(lm, max_batch=2)
    ids = lm.encode_prompt("def area")

    async def main():
        for _ in range(5):  # more abandoned requests than rows: each must leave its row
            gen = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=100, temperature=0,
                                                                        stop_at_eos=False)))
            async for _ev in gen:
                break
            await gen.aclose()
        return await collect(engine, GenerationRequest(ids, SamplingParams(max_new_tokens=6, temperature=0)))

    try:
        texts, _, _ = run(main())
        assert texts[0] == lm.generate("def area", SamplingParams(max_new_tokens=6, temperature=0))[0]
    finally:
        engine.close()


def test_a_request_whose_event_loop_closed_is_dropped_and_the_engine_serves_on(lm):
    """A loop that closes under a running request cancels it (its row freed): its events would pile up
    undelivered."""
    engine = Engine(lm, max_batch=2)
    long = SamplingParams(max_new_tokens=100, temperature=0, stop_at_eos=False)
    ids = lm.encode_prompt("def area")

    listeners = []  # kept alive: only the closed loop can tell the engine that nobody listens

    async def abandon():
        listeners.append(engine.generate(GenerationRequest(ids, long)))
        await listeners[-1].__anext__()  # running; the loop closes with it unfinished and never reads again

    try:
        for _ in range(3):  # more abandoned requests than rows
            loop = asyncio.new_event_loop()
            loop.run_until_complete(abandon())
            loop.close()
        texts, finish, _ = run(collect(engine, GenerationRequest(ids, SamplingParams(max_new_tokens=6,
                                                                                         temperature=0))))
        assert texts[0] == lm.generate("def area", SamplingParams(max_new_tokens=6, temperature=0))[0]
        assert engine.stats.completion_tokens_total < 3 * 100  # the abandoned ones stopped early
    finally:
        engine.close()


def test_limits(lm, monkeypatch):
    engine = Engine(lm, max_batch=1, max_queue=1)
    monkeypatch.setattr(engine._queue, "qsize", lambda: 1)  # the queue is full
    try:
        async def submit(req):
            return engine.submit(req)

        with pytest.raises(PromptTooLong, match="context of 128"):
            run(submit(GenerationRequest(list(range(1, 100)), SamplingParams(max_new_tokens=64))))
        with pytest.raises(QueueFull):
            run(submit(GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=4))))
    finally:
        engine.close()
    for bad in ({"max_batch": 0}, {"max_queue": 0}, {"max_batch": -3}, {"max_events": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} is"):
            Engine(lm, **bad)


def test_other_backends_run_one_request_at_a_time(lm, tmp_path):
    pytest.importorskip("transformers")
    hf = load_lm(lm.name, backend="hf")
    engine = Engine(hf)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    try:
        texts, finish, _ = run(collect(engine, GenerationRequest(hf.encode_prompt("def area"), params, n=2)))
        assert texts[0] == texts[1] == lm.generate("def area", params)[0]
    finally:
        engine.close()


def test_repetition_penalty_and_the_end_tokens_match_one_at_a_time(lm):
    """The engine samples with the LM's own sampler: a repetition penalty reads the same recent ids, and a
    completion ends at eos or bos as `lm.generate` ends it."""
    prompts = ["for r in", "def area", "print("]
    params = [SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=10.0),
              SamplingParams(max_new_tokens=40, temperature=0.9, seed=4, repetition_penalty=1.3, repeat_last_n=8),
              SamplingParams(max_new_tokens=40, temperature=0)]
    expected = [lm.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert expected[0] != lm.generate(prompts[0], SamplingParams(max_new_tokens=40, temperature=0))[0]
    results = run_together(Engine(lm, max_batch=2), lm, prompts, params)
    assert [texts[0] for texts, _, _ in results] == expected
    ends = {lm.eos_id, lm.bos_id}
    for _, finish, ids in results:
        assert finish[0] == ("stop" if ids[0][-1] in ends else "length")
