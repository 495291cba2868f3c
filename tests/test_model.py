import pytest
import torch

from slmkit.model.config import PRESETS, ModelConfig, model_config, parse_overrides
from slmkit.model.decode import KVCache
from slmkit.model.llama import Transformer


def built_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, non-embedding ones) of the model actually built, on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())  # a tied head is the embedding tensor: one entry
    embedding = sum(p.numel() for name, p in params.items() if name in ("embed_tokens.weight", "lm_head.weight"))
    total = sum(p.numel() for p in params.values())
    return total, total - embedding


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_match_the_built_model(name, tie):
    cfg = model_config(name, tie_embeddings=tie)
    total, non_embedding = built_counts(cfg)
    assert cfg.num_params() == total
    # non-embedding (Kaplan et al.): neither the token embedding nor an untied head; tying changes only the total
    assert cfg.num_params(include_embeddings=False) == non_embedding
    assert total - non_embedding == cfg.vocab_size * cfg.dim * (1 if tie else 2)


def test_presets_have_their_published_sizes():
    assert abs(model_config("smollm2-135m").num_params() - 134.5e6) < 0.1e6
    assert abs(model_config("tinyllama-1.1b").num_params() - 1.100e9) < 0.001e9
    assert abs(model_config("stories15m").num_params() - 15.2e6) < 0.1e6
    assert abs(model_config("stories110m").num_params() - 109.5e6) < 0.1e6
    assert 0.9e6 < model_config("nano").num_params() < 1.5e6
    assert 5.5e6 < model_config("micro").num_params() < 7e6


def test_overrides_are_typed_and_validated():
    assert parse_overrides(["dim=64", "tie_embeddings=false", "rope_theta=5e5"]) == {
        "dim": 64, "tie_embeddings": False, "rope_theta": 500000.0}
    with pytest.raises(ValueError, match="unknown model field"):
        parse_overrides(["width=3"])
    with pytest.raises(ValueError, match="field=value"):
        parse_overrides(["dim"])
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_counts_every_matmul_of_a_training_step(tiny_cfg, tie):
    """One forward + backward, its matmuls counted by torch: flops_per_token(T) x T, less the 6 FLOPs per norm
    weight that the 6N rule charges but no matmul spends. The LM head counts once, tied or not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = ModelConfig(**{**tiny_cfg.to_dict(), "tie_embeddings": tie})
    model, t = Transformer(cfg), 24
    x, y = torch.randint(0, cfg.vocab_size, (2, t)), torch.randint(0, cfg.vocab_size, (2, t))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as countable bmm
        model(x, y).backward()
    norm_weights = (2 * cfg.n_layers + 1) * cfg.dim
    assert counter.get_total_flops() == 2 * t * (cfg.flops_per_token(t) - 6 * norm_weights)


def test_kv_cache_matches_full_forward(tiny_cfg):
    model = Transformer(tiny_cfg).eval()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(tiny_cfg, 2, 64)
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:17], cache=cache)]
        parts += [model(x[:, i:i + 1], cache=cache) for i in range(17, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits(tiny_cfg):
    model = Transformer(tiny_cfg).eval()
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % tiny_cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])


def test_chunked_loss_equals_plain_loss_and_gradients(tiny_cfg):
    model = Transformer(tiny_cfg)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    y = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    y[0, :3] = -100
    plain = model(x, y)
    plain.backward()
    g_plain = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    chunked = model(x, y, loss_chunk=7)
    chunked.backward()
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(model.embed_tokens.weight.grad, g_plain)


def test_sequence_longer_than_context_is_refused(tiny_cfg):
    model = Transformer(tiny_cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, tiny_cfg.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("tie", [True, False])
def test_prepared_for_decoding_computes_the_same_and_unfuses_back(tiny_cfg, tie):
    import copy

    from slmkit.formats.hf_dir import hf_state_dict
    from slmkit.model.decode import SlotKVCache, is_fused, prepare_for_decoding, unfuse_projections
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_cfg.to_dict(), "tie_embeddings": tie})
    plain = Transformer(cfg).eval()
    fast = prepare_for_decoding(copy.deepcopy(plain))
    assert is_fused(fast) and not hasattr(fast.layers[0].self_attn, "q_proj")
    assert fast.num_params() == plain.num_params()  # a tied head stays tied: one (transposed) tensor
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=0)
        # cached decoding, single-sequence and slot (continuous batching) caches
        c1, c2 = KVCache(cfg, 2, 32), KVCache(cfg, 2, 32)
        plain(x[:, :20], cache=c1), fast(x[:, :20], cache=c2)
        torch.testing.assert_close(fast(x[:, 20:21], cache=c2), plain(x[:, 20:21], cache=c1), atol=1e-5, rtol=0)
        slot = SlotKVCache(cfg, 2, 32)
        for row in range(2):
            single = KVCache(cfg, 1, 32)
            fast(x[row:row + 1, :20], cache=single)
            slot.load_row(row, single)
        slot.n_active = 2
        torch.testing.assert_close(fast(x[:, 20:21], cache=slot), plain(x[:, :21])[:, 20:21], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unfuse_projections"):
        hf_state_dict(fast)
    unfuse_projections(fast)
    assert not is_fused(fast)
    back, want = hf_state_dict(fast), hf_state_dict(plain)
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


def test_fusion_leaves_wrapped_projections_alone(tiny_cfg):
    from slmkit.model.decode import fuse_projections
    from slmkit.model.lora import LoRAConfig, add_lora
    model = add_lora(Transformer(tiny_cfg), LoRAConfig(r=2, alpha=4))  # q/k/v/o wrapped
    fuse_projections(model)
    assert hasattr(model.layers[0].self_attn, "q_proj") and hasattr(model.layers[0].mlp, "gate_up_proj")
