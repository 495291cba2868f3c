"""Structured output in `slm serve`: replies decoded under a JSON schema or grammar are valid by construction,
even from a random model, checked with the official OpenAI client's own parsing."""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest
import torch
from conftest import live_server, pulled, tiny_model_dir

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

from pydantic import BaseModel, Field  # noqa: E402

from slmkit.lm import load_lm  # noqa: E402
from slmkit.lm.constraints import Matcher, compile_grammar  # noqa: E402
from slmkit.serve.app import create_app  # noqa: E402
from slmkit.serve.engine import Engine  # noqa: E402
from slmkit.tokenizer import train_tokenizer  # noqa: E402

TEXT = "def area(r):\n    return 3.14159 * r * r\n\nfor r in range(5):\n    print(r, area(r))\n"
MODEL = "tiny"
# Bounded everywhere (a short string, an integer range, an enum, a bool), so the reply has a length limit that
# max_tokens covers: every token is at least one byte, and the reply is at most ~150 bytes of JSON (8 characters
# of name escaped as \\uXXXX pairs) plus 16 gaps of at most 12 whitespace characters (lm/constraints.py).
MAX_TOKENS = 360


class Pet(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    kind: Literal["cat", "dog", "fish"]
    friendly: bool


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A random (untrained) tiny model: left to itself it would never write JSON."""
    tok = train_tokenizer([TEXT, "café ✓ naïve"] * 30, vocab_size=300)
    return load_lm(str(tiny_model_dir(tmp_path_factory.mktemp("structured") / "m", tok, max_seq_len=512)))


@pytest.fixture(scope="module")
def url(lm):
    # A core left to the HTTP event loop, as `slm serve` leaves it: with every core in torch's pool, its spinning
    # workers starve the server (this test: 55 s with 2 threads on 2 cores, 6 s with 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    engine = Engine(lm, max_batch=8, max_queue=128)
    try:
        with live_server(create_app(engine, MODEL)) as url:
            yield url
    finally:
        engine.close()
        torch.set_num_threads(threads)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "a pet, please"}]


def parse_once(url, i: int) -> Pet:
    """One request, streamed for odd i; the client parses and validates the reply into a Pet."""
    c = client(url)
    kw = dict(model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=MAX_TOKENS, temperature=1.0, seed=i)
    if i % 2:
        with c.chat.completions.stream(**kw) as stream:
            for _ in stream:
                pass
            out = stream.get_final_completion()
    else:
        out = c.chat.completions.parse(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    return choice.message.parsed


def test_hundred_parsed_replies_from_a_random_model(url):
    with ThreadPoolExecutor(8) as pool:  # concurrent, so they share decode batches (one matcher per row)
        pets = list(pool.map(lambda i: parse_once(url, i), range(100)))
    assert all(isinstance(p, Pet) for p in pets)
    assert len({p.model_dump_json() for p in pets}) > 50  # sampled, not one forced reply


def test_n_choices_each_follow_the_schema(url):
    out = client(url).chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Pet, n=3,
                                             max_tokens=MAX_TOKENS, temperature=1.0, seed=7)
    assert len(out.choices) == 3 and all(isinstance(c.message.parsed, Pet) for c in out.choices)


def test_completions_grammar_and_json_schema_fields(url):
    c = client(url)
    for seed in range(5):
        out = c.completions.create(model=MODEL, prompt="def", max_tokens=20, seed=seed,
                                   extra_body={"grammar": 'root ::= "yes" | "no" | [0-9]{3} "-" [a-z]{2}'})
        assert re.fullmatch(r"yes|no|[0-9]{3}-[a-z]{2}", out.choices[0].text)
        assert out.choices[0].finish_reason == "stop"
    schema = {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 2}
    out = c.completions.create(model=MODEL, prompt="def", max_tokens=64, seed=0, extra_body={"json_schema": schema})
    assert out.choices[0].finish_reason == "stop"  # 5 characters and 4 gaps of at most 12 whitespace ones
    value = json.loads(out.choices[0].text)
    assert len(value) == 2 and set(value) <= {1, 2, 3}


def test_bad_schema_or_grammar_is_a_400_naming_the_field(url):
    c = client(url)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=bad)
    assert e.value.body["param"] == "response_format.json_schema.schema" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=MESSAGES,
                                  response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="def", extra_body={"grammar": "root ::= undefined_rule"})
    assert e.value.body["param"] == "grammar"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                  extra_body={"grammar": 'root ::= "a"'})
    assert e.value.body["param"] == "grammar"


def test_matcher_masks_all_but_the_grammar(lm):
    """The mask alone, without a server: only the grammar's tokens survive, and it is done when complete."""
    tok = lm.tokenizer
    m = Matcher(tok, compile_grammar(tok, regex="ab"))
    masked = m.mask(torch.zeros(tok.vocab_size + 4))  # a padded embedding: the extra rows are never allowed
    allowed = [i for i in range(len(masked)) if masked[i] > float("-inf")]
    assert allowed and all(tok.decode([i]) in ("a", "ab") for i in allowed)
    for t in tok.encode("ab"):
        assert not m.done
        m.advance(t)
    assert m.done
    with pytest.raises(ValueError, match="one of json_schema, grammar or regex"):
        compile_grammar(tok, regex="a", grammar='root ::= "a"')


@pytest.fixture(scope="module")
def smollm2():
    return pulled("smollm2-135m-instruct")


@pytest.mark.download
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_json_object_and_schema_from_smollm2_on_both_batched_backends(smollm2, backend):
    """A real instruct model, through slmkit's torch model and llama.cpp's (the shipped Q4_1 GGUF): both
    batched decoders hand their logits to the engine's sampler, so the one mask constrains both."""
    if backend == "torch":
        lm = load_lm(str(smollm2))
    else:
        pytest.importorskip("llama_cpp")
        from slmkit.lm.llamacpp_lm import LlamaCppLM
        lm = LlamaCppLM(next(smollm2.glob("*Q4_1.gguf")), n_ctx=512)
    engine = Engine(lm, max_batch=4)
    ask = [{"role": "user", "content": "Describe a pet called Rex, a 3 year old friendly dog, as JSON."}]
    try:
        with live_server(create_app(engine, MODEL)) as url:
            c = client(url)
            out = c.chat.completions.create(model=MODEL, messages=ask, response_format={"type": "json_object"},
                                            max_tokens=100, temperature=0)
            text = out.choices[0].message.content
            if out.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
            else:  # greedy, the Q4_1 model rambles past 100 tokens on some CPUs (AVX2: nested objects, on and on):
                # cut at max_tokens, the reply is still a prefix the JSON-object grammar accepts, token by token
                assert out.choices[0].finish_reason == "length" and text.lstrip().startswith("{")
                matcher = Matcher(lm.tokenizer, compile_grammar(lm.tokenizer, json_schema={"type": "object"}))
                for t in lm.tokenizer.encode(text):
                    assert matcher.mask(torch.zeros(lm.tokenizer.vocab_size))[t] > float("-inf"), text
                    matcher.advance(t)
            pet = c.chat.completions.parse(model=MODEL, messages=ask, response_format=Pet, max_tokens=MAX_TOKENS,
                                           temperature=0).choices[0].message.parsed
            assert isinstance(pet, Pet)
    finally:
        engine.close()
        lm.close()


def test_a_backend_that_samples_inside_itself_refuses_a_grammar(lm):
    """`hf` and `remote` sample in their own token stream, where the engine's mask cannot reach: a clear 400."""
    from slmkit.lm.base import LM
    from slmkit.sampling import SamplingParams
    from slmkit.serve.engine import GenerationRequest

    class OwnSampler(LM):
        tokenizer, max_length = lm.tokenizer, 64

    engine = Engine(OwnSampler())
    try:
        grammar = compile_grammar(lm.tokenizer, regex="a")
        with pytest.raises(ValueError, match="needs the torch or llama.cpp backend"):
            engine.submit(GenerationRequest([1, 2], SamplingParams(max_new_tokens=4), grammar=grammar))
    finally:
        engine.close()


def test_log_probs_under_a_grammar_are_the_models_own(url):
    """Fewer tokens are allowed than top_logprobs asks for: the alternatives are still finite numbers."""
    out = client(url).completions.create(model=MODEL, prompt="def", max_tokens=5, logprobs=5, temperature=0,
                                         extra_body={"grammar": 'root ::= "yes" | "no"'})
    lp = out.choices[0].logprobs
    assert out.choices[0].text in ("yes", "no") and all(top for top in lp.top_logprobs)
    assert all(v > float("-inf") for top in lp.top_logprobs for v in top.values())


def test_slm_generate_json_schema_grammar_and_regex(lm, tmp_path):
    """`slm generate --json-schema/--grammar/--regex`: the same constrained path as the server, from the CLI."""
    from typer.testing import CliRunner

    from slmkit.cli import app
    model = str(tiny_model_dir(tmp_path / "m", lm.tokenizer, max_seq_len=512))
    run = CliRunner().invoke
    schema = tmp_path / "pet.json"  # closed, as the openai client's strict schemas are: else any extra keys may follow
    schema.write_text(json.dumps({**Pet.model_json_schema(), "additionalProperties": False}))
    common = ["--backend", "torch", "--no-chat", "--max-new-tokens", str(MAX_TOKENS), "--seed", "1"]
    for i in range(4):  # a random model: valid only by construction
        r = run(app, ["generate", model, "pet:", "--json-schema", str(schema), *common[:-1], str(i)])
        assert r.exit_code == 0, r.output
        Pet.model_validate_json(r.stdout.strip().removeprefix("pet:"))
    r = run(app, ["generate", model, "x", "--json-schema", '{"type": "integer", "maximum": 99}', *common])
    assert r.exit_code == 0 and 0 <= int(r.stdout.strip().removeprefix("x")) <= 99, r.output
    r = run(app, ["generate", model, "x", "--regex", "(yes|no)!", *common])
    assert r.exit_code == 0 and r.stdout.strip().removeprefix("x") in ("yes!", "no!"), r.output
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= "a" [0-9] [0-9]\n')
    r = run(app, ["generate", model, "x", "--grammar", str(gbnf), *common])
    assert r.exit_code == 0 and re.fullmatch(r"xa\d\d", r.stdout.strip()), r.output
    for bad, message in [(["--json-schema", "{not json"], "--json-schema:1: not JSON"),
                         (["--json-schema", "missing.json"], "neither an inline JSON schema nor a file"),
                         (["--regex", "a", "--json-schema", "{}"], "cannot be combined")]:
        r = run(app, ["generate", model, "x", *bad, *common])
        assert r.exit_code == 2 and message in r.output, r.output
