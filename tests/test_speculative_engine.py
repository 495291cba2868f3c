"""Speculative decoding in the batched engine (`slm serve MODEL --draft ngram|DRAFT`): every row drafts by prompt
lookup or with a draft model (its rows beside the target's), one (n, k + 1) forward through the slot cache
verifies all rows' drafts, each row's caches roll back past the ones it rejected. Greedy output is token for
token the engine's own without a draft, whatever mix of rows shares a step; sampled output has the target's
distribution; a draft model's rows hold exactly each row's context."""

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import tiny_model_dir
from test_speculative import chi_square_p
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.lm import load_lm
from slmkit.lm.speculative import SpeculativeLM, prompt_lookup
from slmkit.sampling import SamplingParams, token_probs
from slmkit.serve import engine as engine_module
from slmkit.serve.batch_torch import DraftedBatch, TorchBatch
from slmkit.serve.engine import Engine, GenerationRequest
from slmkit.tokenizer import train_tokenizer

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"
CONTEXT = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    return tiny_model_dir(tmp_path_factory.mktemp("spec-engine") / "m", tok, train_on=TEXT, max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_lm(str(model_dir))


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A draft model with the target's tokenizer, trained for fewer steps: it agrees with the target on some
    tokens and not others."""
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    torch.manual_seed(1)
    return tiny_model_dir(tmp_path_factory.mktemp("spec-draft") / "d", tok, train_on=TEXT, steps=25,
                          max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def draft_lm(draft_dir):
    return load_lm(str(draft_dir))


@pytest.fixture(params=["ngram", "model"])
def draft(request, draft_lm):
    return "ngram" if request.param == "ngram" else draft_lm


async def collect(engine, request):
    """Per choice: the text, the finish reason, the token ids and every event's log-prob."""
    texts, finish, ids, logprobs = {}, {}, {}, {}
    async for ev in engine.generate(request):
        texts[ev.index] = texts.get(ev.index, "") + ev.text
        if ev.token_id is not None:
            ids.setdefault(ev.index, []).append(ev.token_id)
            logprobs.setdefault(ev.index, []).append(ev.logprob)
        if ev.finish_reason:
            finish[ev.index] = ev.finish_reason
    return texts, finish, ids, logprobs


def run_together(engine, requests):
    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    try:
        return asyncio.run(main())
    finally:
        engine.close()


def greedy_requests(lm):
    """Prompts that copy (the training text), that don't (random ids), one that ends at the context's last
    position, stop strings, eos, the repetition penalty, n = 2."""
    ids = lm.tokenizer.encode(TEXT * 4)
    rng = random.Random(0)
    reqs = []
    for i in range(10):
        start = rng.randrange(0, 40)
        prompt = ids[start:start + rng.randrange(3, 30)] if i % 3 else [rng.randrange(3, 300) for _ in range(12)]
        params = SamplingParams(max_new_tokens=10 + 7 * i, temperature=0, stop_at_eos=i % 2 == 0,
                                stop=["area(r))\n"] if i == 4 else [], repetition_penalty=1.3 if i == 5 else 1.0)
        reqs.append(GenerationRequest(prompt, params, n=2 if i == 7 else 1))
    # prompt + max_tokens fill the context exactly: its drafts are cut at the cache's end, and bound the others'
    reqs.append(GenerationRequest(ids[:CONTEXT - 40], SamplingParams(max_new_tokens=40, temperature=0,
                                                                     stop_at_eos=False)))
    return reqs


def test_blocks_and_rollback_give_the_logits_of_plain_decoding(lm):
    """TorchBatch.decode_many: each row's block at its own positions (padding ignored); after a rollback the
    next tokens see only what was kept."""
    batch = TorchBatch(lm, max_batch=3)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    for row, p in enumerate(prompts):
        batch.prefill(row, p)
    blocks = [[20, 21, 22, 23], [30], [40, 41]]
    logits = batch.decode_many(blocks)

    def reference(ids):
        with torch.no_grad():
            return lm.model(torch.tensor([ids]))[0].float()

    for p, b, got in zip(prompts, blocks, logits, strict=True):
        torch.testing.assert_close(got[:len(b)], reference(p + b)[-len(b):], atol=1e-4, rtol=1e-4)
    kept = [2, 1, 1]  # row 0 keeps 20, 21 (22 and 23 rejected); the others their one token
    batch.rollback([4 - n for n in kept])
    after = [[50, 51], [60, 61], [70, 71]]
    logits = batch.decode_many(after)
    for p, b, n, nxt, got in zip(prompts, blocks, kept, after, logits, strict=True):
        torch.testing.assert_close(got, reference(p + b[:n] + nxt)[-2:], atol=1e-4, rtol=1e-4)
    batch.rollback([1, 1, 1])
    one = batch.decode([80, 81, 82])  # plain steps after blocks: the (n, 1) path
    for p, b, n, nxt, t, got in zip(prompts, blocks, kept, after, [80, 81, 82], one, strict=True):
        torch.testing.assert_close(got, reference(p + b[:n] + nxt[:1] + [t])[-1], atol=1e-4, rtol=1e-4)


def test_greedy_output_of_concurrent_requests_is_the_engines_own(lm):
    plain = run_together(Engine(lm, max_batch=4), greedy_requests(lm))
    spec = SpeculativeLM(lm, "ngram", max_draft=4)
    engine = Engine(spec, max_batch=4)
    drafted = run_together(engine, greedy_requests(lm))
    assert drafted == plain
    stats = engine.stats
    assert 0 < stats.extra["accepted_tokens"] < stats.extra["drafted_tokens"], stats.extra
    assert stats.completion_tokens_total == sum(len(ids) for _, _, by_choice, _ in plain for ids in by_choice.values())
    assert any(f == "stop" for _, finish, _, _ in plain for f in finish.values())  # eos and the stop string ended some


def test_drafts_rejected_most_of_the_time_roll_back_cleanly(lm, monkeypatch):
    """Prompt lookup replaced by drafts that are mostly wrong: every step rolls rows back; the text is the same."""
    real = engine_module.prompt_lookup
    rng = random.Random(1)

    def mostly_wrong(ids, k):
        found = real(ids, k)
        return found if rng.random() < 0.3 else [rng.randrange(3, 300) for _ in range(k)]

    plain = run_together(Engine(lm, max_batch=5), greedy_requests(lm))
    monkeypatch.setattr(engine_module, "prompt_lookup", mostly_wrong)
    engine = Engine(SpeculativeLM(lm, "ngram", max_draft=3), max_batch=5)
    assert run_together(engine, greedy_requests(lm)) == plain
    extra = engine.stats.extra
    assert 0 < extra["accepted_tokens"] < extra["drafted_tokens"] / 2, extra


def test_rows_with_a_grammar_or_log_probs_share_steps_with_speculating_rows(lm, draft):
    pytest.importorskip("llguidance")
    from slmkit.lm.constraints import compile_grammar
    grammar = compile_grammar(lm.tokenizer, regex="(def|for) [a-z]{1,6}")
    prompt = lm.encode_prompt("for r in")

    def requests():
        return [GenerationRequest(prompt, SamplingParams(max_new_tokens=12, temperature=0), grammar=grammar),
                GenerationRequest(prompt, SamplingParams(max_new_tokens=30, temperature=0), logprobs=2),
                *greedy_requests(lm)[:4]]

    plain = run_together(Engine(lm, max_batch=6), requests())
    engine = Engine(SpeculativeLM(lm, draft), max_batch=6)
    drafted = run_together(engine, requests())
    assert engine.stats.extra["drafted_tokens"] > 0
    for (texts, finish, ids, logprobs), (want_texts, want_finish, want_ids, want_logprobs) in zip(
            drafted, plain, strict=True):
        assert (texts, finish, ids) == (want_texts, want_finish, want_ids)
        for got, want in zip(logprobs.values(), want_logprobs.values(), strict=True):  # block rows: same to 1e-4
            assert got == pytest.approx(want, abs=1e-4) if want[0] is not None else got == want


def test_sampled_output_has_the_targets_distribution(lm, draft):
    """2000 seeded choices of 3 tokens: (first, second) against the target's exact probabilities. The second
    token is the speculative step's: drafts kept (min(1, p(x) / q(x))), or rejected and redrawn from the
    residual max(0, p - q)."""
    text = lm.tokenizer.encode(TEXT)
    prompt = text + text[:12]  # what follows is in the prompt: lookup drafts it; the hot temperature rejects some
    params = SamplingParams(max_new_tokens=3, temperature=2.0, top_k=4, stop_at_eos=False, seed=0)
    n = 2000
    engine = Engine(SpeculativeLM(lm, draft, max_draft=2), max_batch=16, max_queue=1)
    (_, _, ids, _), = run_together(engine, [GenerationRequest(prompt, params, n=n)])
    extra = engine.stats.extra
    assert 0 < extra["accepted_tokens"] < extra["drafted_tokens"], extra

    def probs(seq):
        with torch.no_grad():
            return token_probs(lm.model(torch.tensor([seq]))[0, -1:].float(), params)[0].double().numpy()

    first = probs(prompt)
    support = np.flatnonzero(first)
    exact = np.stack([first[a] * probs(prompt + [int(a)]) for a in support])  # (|support|, vocab)
    counts = np.zeros_like(exact)
    index = {int(a): i for i, a in enumerate(support)}
    for seq in ids.values():
        counts[index[seq[0]], seq[1]] += 1
    assert chi_square_p(counts.sum(1), exact.sum(1)) > 1e-3
    assert chi_square_p(counts.ravel(), exact.ravel()) > 1e-3
    if draft != "ngram":
        return
    # the test has the power to see a wrong rule: the same counts fail "every draft kept"
    always_kept = exact.copy()
    for a, i in index.items():
        if drafted := prompt_lookup(prompt + [a], 1):
            always_kept[i] = 0
            always_kept[i, drafted[0]] = first[a]
    assert chi_square_p(counts.ravel(), always_kept.ravel()) < 1e-6


@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_slm_serve_draft_batches_and_answers_the_openai_client_with_the_plain_text(lm, model_dir, draft_dir, kind,
                                                                                   monkeypatch):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    import urllib.request

    from conftest import live_server

    prompts = ["def area(r):\n", "for r in range(5):\n", "    print(r,", "café ✓"]
    plain = run_together(Engine(lm, max_batch=4), [
        GenerationRequest(lm.encode_prompt(p), SamplingParams(max_new_tokens=40, temperature=0)) for p in prompts])
    want = {p: (texts[0], len(ids[0])) for p, (texts, _, ids, _) in zip(prompts, plain, strict=True)}
    answers, metrics = {}, []

    def serve_and_ask(served, **_):  # stands in for uvicorn.run: slm serve has built the app and the engine
        with live_server(served) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

            def ask(job):
                prompt, stream = job
                if not stream:
                    out = c.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0)
                    return out.choices[0].text, out.usage.completion_tokens
                chunks = list(c.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
                return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens

            jobs = [(p, s) for p in prompts for s in (False, True)]
            with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share the batch
                answers.update(zip(jobs, pool.map(ask, jobs), strict=True))
            metrics.append(urllib.request.urlopen(url + "/metrics").read().decode())

    monkeypatch.setattr(uvicorn, "run", serve_and_ask)
    draft = "ngram" if kind == "ngram" else str(draft_dir)
    result = CliRunner().invoke(app, ["serve", str(model_dir), "--draft", draft, "--draft-k", "3",
                                      "--backend", "torch", "--max-batch", "8"])
    assert result.exit_code == 0, result.output
    assert answers == {(p, s): want[p] for p in prompts for s in (False, True)}
    drafted = [line for line in metrics[0].splitlines() if line.startswith("slmkit_speculative_drafted_tokens_total")]
    assert drafted and int(drafted[0].split()[-1]) > 0


def test_a_draft_model_in_the_batch_gives_the_engines_own_greedy_output(lm, draft_lm, monkeypatch):
    """Concurrent greedy requests drafted by a model inside the batch: the text is the engine's own without a
    draft, and every draft distribution came from logits equal to the draft model's over the row's whole context
    (its cache row holds exactly that context, whatever was rolled back, padded or fed late)."""
    plain = run_together(Engine(lm, max_batch=4), greedy_requests(lm))
    checked = []
    real = Engine._draw_draft

    def check_context(self, c, logits, drafted, vocab):
        ids = c.request.request.prompt_ids + c.generated + drafted
        with torch.no_grad():
            want = draft_lm.model(torch.tensor([ids]))[0, -1].float()
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
        checked.append(len(drafted))
        return real(self, c, logits, drafted, vocab)

    monkeypatch.setattr(Engine, "_draw_draft", check_context)
    engine = Engine(SpeculativeLM(lm, draft_lm, max_draft=4), max_batch=4)
    assert isinstance(engine._batch, DraftedBatch) and engine.max_batch == 4
    assert run_together(engine, greedy_requests(lm)) == plain
    extra = engine.stats.extra
    assert 0 < extra["accepted_tokens"] < extra["drafted_tokens"], extra
    assert len(checked) == extra["drafted_tokens"] and max(checked) == 3  # first drafts and later ones


def test_a_draft_model_with_a_shorter_context_is_served_one_request_at_a_time(lm, tmp_path):
    tok = lm.tokenizer
    short = load_lm(str(tiny_model_dir(tmp_path / "short", tok, max_seq_len=CONTEXT // 2)))
    engine = Engine(SpeculativeLM(lm, short), max_batch=4)
    try:
        assert engine.max_batch == 1 and not engine.speculative  # its rows could not hold the target's
    finally:
        engine.close()
