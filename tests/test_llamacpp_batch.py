"""Continuous batching over llama.cpp: many sequences of one llama.cpp context decode together in one llama_decode
per step, and give exactly what one-at-a-time decoding gives."""

import asyncio
import time

import pytest
from conftest import tiny_model_dir

from slmkit.formats.gguf import write_gguf
from slmkit.lm.llamacpp_lm import LlamaCppLM
from slmkit.lm.torch_lm import TorchLM
from slmkit.sampling import SamplingParams
from slmkit.serve.engine import Engine, GenerationRequest
from slmkit.tokenizer import train_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
from slmkit.serve.batch_llamacpp import LlamaCppBatch  # noqa: E402  (needs llama_cpp

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model fitted to TEXT (confident predictions), as a slmkit directory and as an f32 GGUF."""
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    root = tmp_path_factory.mktemp("llamacpp_batch")
    d = tiny_model_dir(root / "m", tok, tie=False, train_on=TEXT, max_seq_len=128)
    lm = LlamaCppLM(write_gguf(d, root / "m.gguf", quant="f32"))
    yield d, lm
    lm.close()


async def collect(engine, request):
    ids, finish, events = {}, {}, []
    async for ev in engine.generate(request):
        events.append(ev)
        if ev.token_id is not None:
            ids.setdefault(ev.index, []).append(ev.token_id)
        if ev.finish_reason:
            finish[ev.index] = ev.finish_reason
    return ids, finish, events


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False, **kw)


def test_concurrent_requests_decode_exactly_like_one_at_a_time(models):
    d, lm = models
    torch_lm = TorchLM.load(d)
    prompts = ["def area", "for r in", "print(", "    return 3", "d", "café ✓ naïve\ndef area(r):"]
    params = [greedy(8 + 5 * i) for i in range(6)]
    prompt_ids = [lm.encode_prompt(p) for p in prompts]
    expected = [list(lm.stream_ids(ids, sp, None)) for ids, sp in zip(prompt_ids, params, strict=True)]
    assert expected == [list(torch_lm.stream_ids(ids, sp, None)) for ids, sp in zip(prompt_ids, params, strict=True)]
    engine = Engine(lm, max_batch=4)  # fewer rows than requests: some wait, join as others leave
    assert isinstance(engine._batch, LlamaCppBatch) and engine.max_batch == 4
    assert engine._batch.n_ctx_seq >= lm.max_length  # every row holds the whole context

    async def main():
        reqs = [GenerationRequest(ids, sp) for ids, sp in zip(prompt_ids, params, strict=True)]
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    try:
        results = asyncio.run(main())
    finally:
        engine.close()
    assert engine._batch.ctx is None  # closing the engine frees its llama.cpp context
    for (ids, finish, _), want, sp in zip(results, expected, params, strict=True):
        assert ids[0] == want and finish[0] == "length" and len(want) == sp.max_new_tokens


def test_cancelled_requests_free_their_rows(models):
    _, lm = models
    engine = Engine(lm, max_batch=2)
    batch = engine._batch
    ids = lm.encode_prompt("def area")

    async def main():
        for _ in range(5):  # more abandoned requests than rows: each must leave its row and its sequence
            gen = engine.generate(GenerationRequest(ids, greedy(100)))
            async for _ev in gen:
                break
            await gen.aclose()
        return await collect(engine, GenerationRequest(ids, greedy(6)))

    try:
        got, _, _ = asyncio.run(main())
        assert got[0] == list(lm.stream_ids(ids, greedy(6), None))
        deadline = time.monotonic() + 5
        while batch.n_active and time.monotonic() < deadline:  # the last request leaves after its last event
            time.sleep(0.01)
        assert batch.n_active == 0 and sorted(batch.row_seq) == [0, 1]
        assert [llama_cpp.llama_memory_seq_pos_max(batch.mem, s) for s in range(2)] == [-1, -1]  # KV emptied
    finally:
        engine.close()


def test_logprobs_through_the_llamacpp_engine_match_the_lm(models):
    _, lm = models
    engine = Engine(lm, max_batch=4)
    prompts = [lm.encode_prompt(p) for p in ("for r in", "def area", "print(r")]

    async def main():
        reqs = [GenerationRequest(ids, greedy(6 + 2 * i), logprobs=3) for i, ids in enumerate(prompts)]
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    try:
        results = asyncio.run(main())  # three at once: logprobs of batched steps
    finally:
        engine.close()
    for ids, (_, _, events) in zip(prompts, results, strict=True):
        new = [e.token_id for e in events if e.token_id is not None]
        lp = lm.logprobs(ids + new, top_k=3)
        for i, ev in enumerate(e for e in events if e.token_id is not None):
            assert ev.logprob == pytest.approx(float(lp.token_logprobs[len(ids) - 1 + i]), abs=1e-3)
            top = lp.top_logprobs[len(ids) - 1 + i]  # keyed by text, the engine's top-3 can merge equal pieces
            assert 0 < len(ev.top_logprobs) <= 3 and max(ev.top_logprobs.values()) == pytest.approx(top[0], abs=1e-3)
            assert all(abs(top - v).min() <= 1e-3 for v in ev.top_logprobs.values())


def test_prompts_that_begin_alike_reuse_a_finished_sequences_cells(models):
    """Prefix reuse (llama.cpp's cache_prompt): a prompt extending a finished request's prompt decodes only its
    new tokens, and gives what decoding it from nothing gives; one that shares nothing starts over."""
    _, lm = models
    shared = "def area(r):\n    return 3.14159 * r * r\n\n"
    prompts = [lm.encode_prompt(shared + tail) for tail in ("for r in", "for r in range(5):", "print(")]
    prompts.append(lm.encode_prompt("café ✓"))
    expected = [list(lm.stream_ids(ids, greedy(8), None)) for ids in prompts]
    engine = Engine(lm, max_batch=2, prefix_cache_mb=1)
    batch = engine._batch
    assert batch.prefixes is not None

    async def one(ids):
        return (await collect(engine, GenerationRequest(ids, greedy(8))))[0][0]

    try:
        got = [asyncio.run(one(ids)) for ids in prompts]  # one after another: each finds the last one's cells
    finally:
        engine.close()
    assert got == expected

    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    shares = [min(common(prompts[i - 1], prompts[i]), len(prompts[i]) - 1) for i in range(1, len(prompts))]
    assert shares[0] > 10 and shares[1] > 10  # the shared function
    assert batch.prefixes.hits == sum(k > 0 for k in shares) == engine.stats.prefix_cache_hits
    assert batch.prefixes.tokens_reused >= sum(shares)
