"""Prefix caching: a prompt that begins like a recent one starts from its keys and values, and gives exactly what a
full prefill gives (logits, greedy text), with LRU eviction under a memory cap."""

import pytest
import torch
from conftest import tiny_model_dir, translation_tokenizer
from test_engine import run_together

from slmkit.lm import load_lm
from slmkit.model.decode import KVCache, PrefixCache
from slmkit.sampling import SamplingParams
from slmkit.serve.batch_torch import TorchBatch
from slmkit.serve.engine import Engine


@pytest.fixture(scope="module")
def lm(tmp_path_factory):  # random weights: cached and full prefills must agree whatever the model
    return load_lm(str(tiny_model_dir(tmp_path_factory.mktemp("prefix") / "m", translation_tokenizer(),
                                      max_seq_len=256)))


def _cache(ids, fill):
    """A batch-1 KVCache holding len(ids) positions of recognisable values (for the bookkeeping tests)."""
    from slmkit.model.config import model_config
    cfg = model_config("nano", dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=64)
    c = KVCache(cfg, 1, len(ids))
    for t in (*c.k, *c.v):
        t.fill_(fill)
    c.length = len(ids)
    return c


def test_longest_common_prefix_lru_and_replacement():
    cache = PrefixCache(max_bytes=10**9, min_tokens=4)
    a = list(range(20))
    cache.store(a, _cache(a, 1.0))
    assert cache.longest(a + [99]) == (20, 0)  # all of a is reused
    assert cache.longest(a[:10] + [77, 78]) == (10, 0)  # up to where they differ
    assert cache.longest(a) == (19, 0)  # never the whole prompt: its last token must run
    assert cache.longest([5, 6, 7, 8, 9]) is None and cache.longest(a[:3] + [50, 51, 52]) is None  # < min_tokens
    fresh = _cache(a, 0.0)
    fresh.length = 0
    cache.fill(fresh, 0, 12)
    assert fresh.length == 12 and bool((fresh.k[0][:, :, :12] == 1.0).all())
    assert bool((fresh.k[0][:, :, 12:] == 0).all())
    assert (cache.hits, cache.tokens_reused) == (1, 12)
    longer = a + [100, 101]
    cache.store(longer, _cache(longer, 2.0))  # extends a: replaces it
    assert len(cache) == 1 and cache.longest(a + [5]) == (20, 1)
    # the byte cap: the least recently used entry goes
    one = _cache(list(range(30)), 0.0)
    size = sum(t.numel() * t.element_size() for t in (*one.k, *one.v))
    small = PrefixCache(max_bytes=2 * size, min_tokens=4)
    for start in (100, 200, 300):
        ids = list(range(start, start + 30))
        small.store(ids, _cache(ids, 0.0))
    assert len(small) == 2 and small.bytes == 2 * size
    assert small.longest(list(range(100, 131))) is None and small.longest(list(range(300, 331))) is not None


def test_prefill_from_the_cache_equals_a_full_prefill(lm):
    system = lm.encode_prompt("def area(r):\n    return 3.14159 * r * r\n\n" * 3)
    prompts = [system + lm.tokenizer.encode(tail) for tail in ("for r in range", "print(area(2))", "def")]
    plain, cached = TorchBatch(lm, 4), TorchBatch(lm, 4, prefix_cache_mb=64)
    for row, ids in enumerate(prompts):
        want = plain.prefill(row, ids)
        got = cached.prefill(row, ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # the row's cache holds the same keys as a full prefill, so decoding continues identically
        for layer in range(len(plain.cache.k)):
            n = len(ids)
            torch.testing.assert_close(cached.cache.k[layer][row, :, :n], plain.cache.k[layer][row, :, :n],
                                       atol=1e-4, rtol=1e-4)
    assert cached.prefixes.hits == 2 and cached.prefixes.tokens_reused >= 2 * len(system) - 2


def test_engine_with_a_prefix_cache_generates_the_same_text(lm):
    shared = "def area(r):\n    return 3.14159 * r * r\n\n" * 2
    prompts = [shared + tail for tail in ("for r in", "print(", "    return", "def area")]
    params = [SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False)] * len(prompts)
    expected = [lm.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(lm, max_batch=2, prefix_cache_mb=64)
    results = run_together(engine, lm, prompts, params)
    assert [texts[0] for texts, _, _ in results] == expected
    assert engine.stats.prefix_cache_hits >= 2 and engine.stats.prefix_tokens_reused > 0
