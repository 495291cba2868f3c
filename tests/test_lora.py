"""LoRA: wrapping, freezing, merging, adapter files that Hugging Face PEFT loads, and `slm finetune --lora-rank`."""

import json

import pytest
import torch
from conftest import PAIRS, chat, tiny_model_dir, translation_tokenizer
from safetensors.torch import load_file

from slmkit.formats.hf_dir import load_model_dir, load_state_dict
from slmkit.model.llama import Transformer
from slmkit.model.lora import (
    ALL_LINEAR,
    LoRAConfig,
    LoRALinear,
    add_lora,
    count_parameters,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)


@pytest.fixture(scope="module")
def tok():
    return translation_tokenizer()


def ids(cfg, n=24):
    return torch.randint(0, cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


def lora_model(path, cfg: LoRAConfig):
    """The model in `path` with LoRA added and B made non-zero, so the adapter changes the logits."""
    model = add_lora(load_model_dir(path), cfg)
    g = torch.Generator().manual_seed(0)  # the same adapter whatever ran before
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model.eval()


def test_fresh_lora_leaves_the_model_unchanged_and_trains_only_the_adapters(tiny_cfg):
    model = Transformer(tiny_cfg).eval()
    x = ids(tiny_cfg)
    before = model(x)
    add_lora(model, LoRAConfig(r=4, alpha=8))
    assert torch.equal(model(x), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()  # base names are kept

    c, r = tiny_cfg, 4
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = r * ((c.dim + q) + 2 * (c.dim + kv) + (q + c.dim))
    assert count_parameters(model) == (c.n_layers * per_layer, c.num_params() + c.n_layers * per_layer)
    every = add_lora(Transformer(tiny_cfg), LoRAConfig(r=r, target_modules="all-linear"))
    mlp = r * 3 * (c.dim + c.hidden_dim)
    assert count_parameters(every)[0] == c.n_layers * (per_layer + mlp)


def test_a_bf16_base_trains_fp32_adapters(tiny_cfg):
    model = add_lora(Transformer(tiny_cfg).to(torch.bfloat16), LoRAConfig(r=4))
    model(ids(tiny_cfg), ids(tiny_cfg)).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None for p in trainable)


def test_config_is_checked():
    from slmkit.train.loop import TrainConfig
    assert LoRAConfig(target_modules="q_proj, v_proj").targets == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="target_modules"):
        LoRAConfig(target_modules="q_proj,lm_head")
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(data="d", out="o", max_steps=1, lora=LoRAConfig(r=4))
    with pytest.raises(ValueError, match="full fine-tuning"):
        TrainConfig(data="d", out="o", max_steps=1, init_from="m", base_dtype="bfloat16")


def test_merge_and_adapter_round_trip_match_the_unmerged_model(tok, tmp_path):
    base = tiny_model_dir(tmp_path / "base", tok)
    cfg = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    model = lora_model(base, cfg)
    x = ids(model.cfg)
    with torch.no_grad():
        want = model(x)
        assert (want - load_model_dir(base)(x)).abs().max() > 1e-3  # the adapter does something

        save_adapter(model, cfg, tmp_path / "adapter", base)
        files = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in files
        assert files.keys() == lora_state_dict(model).keys()
        loaded = load_adapter(load_model_dir(base), tmp_path / "adapter")
        assert torch.equal(loaded(x), want)

        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=0)


def test_peft_loads_our_adapters_and_we_load_peft_adapters(tok, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from slmkit.cli import app
    base = tiny_model_dir(tmp_path / "base", tok)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = lora_model(base, cfg)
    save_adapter(model, cfg, tmp_path / "adapter", base)
    x = ids(model.cfg)
    with torch.no_grad():
        want = model(x)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
        torch.testing.assert_close(peft_model.eval()(x).logits, want, atol=1e-4, rtol=0)

        result = CliRunner().invoke(app, ["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "m")])
        assert result.exit_code == 0, result.output
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        torch.testing.assert_close(merged(x).logits, want, atol=1e-4, rtol=0)

        # The other way: an adapter PEFT trained and saved applies to slmkit's model.
        hf = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                            LoraConfig(r=2, lora_alpha=6, target_modules="all-linear", task_type="CAUSAL_LM"))
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        hf.save_pretrained(tmp_path / "peft")
        ours = load_adapter(load_model_dir(base), tmp_path / "peft")
        torch.testing.assert_close(ours(x), hf.eval()(x).logits, atol=1e-4, rtol=0)


def test_finetune_cli_with_lora(tok, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    from slmkit.model.lora import read_adapter_config
    base = tiny_model_dir(tmp_path / "base", tok)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(chat(a, b)) + "\n" for a, b in PAIRS * 3))
    out = tmp_path / "run"
    args = ["finetune", str(base), "--data", str(path), "--out", str(out), "--seq-len", "64", "--batch-size", "8",
            "--lr", "3e-2", "--eval-every", "15", "--save-every", "15", "--precision", "fp32",
            "--lora-rank", "4", "--lora-targets", "all-linear"]
    result = CliRunner().invoke(app, [*args, "--max-steps", "30"])
    assert result.exit_code == 0, result.output
    assert "trainable: " in result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1's loss is the base model's (B = 0). A random tiny base, its embeddings and norms frozen, can only
    # reach small logit gaps, so the drop is modest; it is far beyond noise.
    assert metrics[-1]["val_loss"] < metrics[0]["loss"] - 0.2, metrics

    cfg = read_adapter_config(out / "adapter")
    assert (cfg.r, cfg.alpha, set(cfg.targets)) == (4, 8, set(ALL_LINEAR))
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["base_model_name_or_path"] == str(base.resolve())

    # The base stays frozen: the merged model is the base plus scale·B·A, and nothing else moved.
    before, after = load_state_dict(base), load_state_dict(out / "model")
    lora = {k.removeprefix("base_model.model.model."): v
            for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()}
    for name, w in before.items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in lora:
            delta = lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"] * 2.0
            assert delta.abs().max() > 0
            torch.testing.assert_close(after[name], w + delta, atol=1e-6, rtol=0)
        else:
            assert torch.equal(after[name], w), name

    # A checkpoint is a loadable (merged) model, and a run resumes from its adapter.
    assert load_model_dir(out / "checkpoint").cfg == load_model_dir(base).cfg
    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    result = CliRunner().invoke(app, [*args, "--max-steps", "30", "--resume"])  # budget spent: reload, re-save
    assert result.exit_code == 0, result.output
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(resumed[k], v) for k, v in trained.items())


def test_generate_with_adapter_equals_the_merged_model(tok, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    base = tiny_model_dir(tmp_path / "base", tok, train_on="Translate red: rouge. ", steps=40)
    cfg = LoRAConfig(r=4, alpha=8)
    save_adapter(lora_model(base, cfg), cfg, tmp_path / "adapter", base)
    assert CliRunner().invoke(app, ["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "m")]) \
        .exit_code == 0
    common = ["Translate", "--max-new-tokens", "8", "--temperature", "0", "--no-chat"]
    unmerged = CliRunner().invoke(app, ["generate", str(base), *common, "--adapter", str(tmp_path / "adapter")])
    merged = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), *common])
    assert unmerged.exit_code == 0, unmerged.output
    assert unmerged.output == merged.output


def test_serve_with_an_adapter_answers_like_the_merged_model(tok, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from slmkit.cli import app as cli
    from slmkit.formats.hf_dir import save_model_dir
    from slmkit.lm import load_lm
    from slmkit.sampling import SamplingParams
    base = tiny_model_dir(tmp_path / "base", tok)
    cfg = LoRAConfig(r=4, alpha=8)
    model = lora_model(base, cfg)
    save_adapter(model, cfg, tmp_path / "adapter", base)
    save_model_dir(merge_lora(model), tmp_path / "merged", tok)
    prompt = "Translate red:"
    want = load_lm(str(tmp_path / "merged"), backend="torch").generate(
        prompt, SamplingParams(max_new_tokens=8, temperature=0))[0]
    plain = load_lm(str(base), backend="torch").generate(prompt, SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert want != plain  # the adapter changes the answer
    answers = []

    def fake_run(app, **kw):  # serve() closes its engine when uvicorn returns, so ask while "running"
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0})
            answers.append(r.json()["choices"][0]["text"])

    monkeypatch.setattr(uvicorn, "run", fake_run)
    result = CliRunner().invoke(cli, ["serve", str(base), "--adapter", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert answers == [want]
    result = CliRunner().invoke(cli, ["serve", str(base), "--adapter", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no adapter_config.json" in result.output
