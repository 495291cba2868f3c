"""Several LoRA adapters on one model, chosen per batch row: `slm serve MODEL --adapter NAME=DIR`, MODEL:NAME."""

import asyncio

import pytest
import torch
from conftest import PAIRS, adapter_with_random_b, live_server, tiny_model_dir, translation_tokenizer

from slmkit.formats.hf_dir import load_model_dir, save_model_dir
from slmkit.lm import load_lm
from slmkit.model.lora import LoRAConfig, merge_lora, save_adapter
from slmkit.model.multi_lora import add_adapters
from slmkit.sampling import SamplingParams

openai = pytest.importorskip("openai")

PROMPTS = ["Translate red:", "Translate blue:", "Translate green:"]
# (rank, targets): different ranks and different layers, so padding and missing layers are exercised
ADAPTERS = {"alpha": (4, "q_proj,v_proj"), "beta": (2, "all-linear")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base, two adapters for it (saved as PEFT directories) and each adapter's merged model."""
    tmp = tmp_path_factory.mktemp("multi_lora")
    tok = translation_tokenizer()
    base = tiny_model_dir(tmp / "base", tok, train_on=" ".join(f"Translate {a}: {b}." for a, b in PAIRS))
    dirs, merged = {}, {}
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        cfg = LoRAConfig(r=r, alpha=2 * r + seed, target_modules=targets)
        model = adapter_with_random_b(base, cfg, seed)
        dirs[name] = save_adapter(model, cfg, tmp / name, base)
        merged[name] = save_model_dir(merge_lora(model.eval()), tmp / f"{name}-merged", tok)
    return base, dirs, merged


def greedy(model_dir, prompt):
    return load_lm(str(model_dir), backend="torch").generate(
        prompt, SamplingParams(max_new_tokens=8, temperature=0))[0]


def test_each_row_of_a_mixed_batch_gets_its_own_adapter(models):
    base, dirs, merged = models
    model = load_model_dir(base).eval()
    bank = add_adapters(model, dirs)
    assert bank.names == ["alpha", "beta"]
    x = torch.randint(0, model.cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    want = [load_model_dir(base).eval()(x[:1]), load_model_dir(merged["alpha"]).eval()(x[1:2]),
            load_model_dir(merged["beta"]).eval()(x[2:])]
    with torch.no_grad():
        bank.rows = torch.tensor([0, 1, 2])
        mixed = model(x)
        bank.rows = None
        plain = model(x)
        with bank.use("beta"):
            beta = model(x[2:])
    for row, expected in enumerate(want):
        assert torch.allclose(mixed[row:row + 1], expected, atol=1e-4)
    assert torch.allclose(plain[:1], want[0], atol=1e-5)  # no rows set: the base alone
    assert (plain[2:] - want[2]).abs().max() > 1e-3  # and the adapter did change the logits
    assert torch.allclose(beta, want[2], atol=1e-4)
    with pytest.raises(ValueError, match="no adapter named 'gamma'; loaded: alpha, beta"):
        bank.slot("gamma")


def test_served_adapters_answer_like_their_merged_models_in_one_batch(models):
    """Requests for the base and two adapters, concurrently (one batch), streamed and not, through the official
    openai client: each answers what its merged model answers alone."""
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    base, dirs, merged = models
    want = {m: [greedy(d, p) for p in PROMPTS] for m, d in [("tiny", base), *[(f"tiny:{n}", merged[n]) for n in dirs]]}
    assert want["tiny"] != want["tiny:alpha"] != want["tiny:beta"]  # the adapters change the answers
    lm = load_lm(str(base), adapters=dirs)
    engine = Engine(lm, max_batch=16)
    try:
        with live_server(create_app(engine, "tiny")) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

            async def ask(model, prompt, stream):
                kw = dict(model=model, prompt=prompt, max_tokens=8, temperature=0)
                if not stream:
                    r = await client.completions.create(**kw)
                    assert r.model == model
                    return r.choices[0].text
                return "".join([c.choices[0].text async for c in await client.completions.create(stream=True, **kw)
                                if c.choices])

            async def everyone():
                jobs = [(m, i, s) for m in want for i in range(len(PROMPTS)) for s in (False, True)]
                answers = await asyncio.gather(*(ask(m, PROMPTS[i], s) for m, i, s in jobs))
                models_listed = [m.id async for m in client.models.list()]
                return jobs, answers, models_listed

            jobs, answers, listed = asyncio.run(everyone())
            for (m, i, _), answer in zip(jobs, answers, strict=True):
                assert answer == want[m][i], (m, PROMPTS[i])
            assert listed == ["tiny", "tiny:alpha", "tiny:beta"]
            # the adapter's own name works too (as vLLM's --lora-modules); an unknown MODEL:NAME is a 404
            sync = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            r = sync.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=8, temperature=0)
            assert r.choices[0].text == want["tiny:beta"][0]
            with pytest.raises(openai.NotFoundError, match="tiny:alpha, tiny:beta"):
                sync.completions.create(model="tiny:gamma", prompt=PROMPTS[0], max_tokens=2)
    finally:
        engine.close()


def test_prefix_cache_keeps_adapters_apart(models):
    """The same prompt through two adapters has different keys and values: a cached prefix of one must not
    serve the other."""
    from slmkit.serve.batch_torch import TorchBatch
    base, dirs, merged = models
    lm = load_lm(str(base), adapters=dirs)
    batch = TorchBatch(lm, max_batch=2, prefix_cache_mb=64)
    batch.prefixes.min_tokens = 2
    ids = lm.tokenizer.encode("Translate red: rouge. Translate blue:")
    first = batch.prefill(0, ids, adapter=1)
    second = batch.prefill(1, ids, adapter=2)
    assert batch.prefixes.hits == 0
    again = batch.prefill(0, ids, adapter=2)
    assert batch.prefixes.hits == 1 and torch.allclose(again, second, atol=1e-5)
    beta = load_lm(str(merged["beta"]), backend="torch")
    assert torch.allclose(second, beta.model(torch.tensor([ids]))[0, -1].float(), atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-3)


def test_adapter_options_refuse_what_they_cannot_serve(models, tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from slmkit.cli import app
    from slmkit.serve.app import split_adapters
    base, dirs, _ = models
    assert split_adapters(["a=x", "b=y/z"]) == (None, {"a": "x", "b": "y/z"})
    assert split_adapters([str(dirs["alpha"])]) == (str(dirs["alpha"]), {})
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    ok = CliRunner().invoke(app, ["serve", str(base), "--adapter", f"alpha={dirs['alpha']}",
                                  "--adapter", f"beta={dirs['beta']}"])
    assert ok.exit_code == 0, ok.output and len(served) == 1
    cases = [
        (["--adapter", f"a={dirs['alpha']}", "--adapter", f"a={dirs['beta']}"], "the name 'a' is given twice"),
        (["--adapter", f"a={dirs['alpha']}", "--adapter", str(dirs["beta"])], "give each adapter a name"),
        (["--adapter", f"a b={dirs['alpha']}"], "adapter name 'a b'"),
        (["--adapter", f"a={tmp_path}"], "no adapter_config.json"),
        (["--adapter", f"a={dirs['alpha']}", "--weights", "int8"], "needs float weights"),
        (["--adapter", f"a={dirs['alpha']}", "--draft", "ngram"], "neither a single --adapter DIR nor --draft"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["serve", str(base), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output
