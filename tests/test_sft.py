"""Supervised fine-tuning: loss masks on chat and prompt/completion records, batches, `slm finetune`."""

import json

import pytest
import torch
from conftest import PAIRS, chat, tiny_model_dir, translation_tokenizer

from slmkit.data.sft import IGNORE, SFTDataset, encode_record


@pytest.fixture(scope="module")
def tok():
    return translation_tokenizer()


def targets(example):
    return [t for t in example.labels if t != IGNORE]


def test_chat_records_put_the_loss_on_assistant_turns_only(tok):
    e = encode_record(chat("red", "rouge", system="Be brief."), tok, "f:1")
    assert tok.decode(targets(e)) == "rouge<|im_end|>\n"
    text = tok.apply_chat_template(chat("red", "rouge", system="Be brief.")["messages"], add_generation_prompt=False)
    assert e.ids == tok.encode(text)  # the pieces encode exactly like the whole conversation
    two = {"messages": chat("red", "rouge")["messages"] + [{"role": "user", "content": "Translate cat"},
                                                             {"role": "assistant", "content": "chat"}]}
    assert tok.decode(targets(encode_record(two, tok, "f:2"))) == "rouge<|im_end|>\nchat<|im_end|>\n"


def test_prompt_completion_records(tok):
    e = encode_record({"prompt": "Translate red:", "completion": " rouge"}, tok, "f:1")
    assert targets(e) == tok.encode(" rouge") + [tok.eos_id]
    assert e.ids[:len(e.ids) - len(targets(e))] == tok.encode("Translate red:", add_bos=tok.add_bos)


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, "needs `messages`"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\] must be"),
    ({"prompt": "a", "completion": ""}, "non-empty completion"),
])
def test_bad_records_name_the_line(tok, tmp_path, record, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("red", "rouge")) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"d.jsonl:2: .*{message}"):
        SFTDataset(path, tok)


def test_batches_keep_examples_apart_and_pad_without_targets(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(chat(a, b)) + "\n" for a, b in PAIRS))
    data = SFTDataset(path, tok, val_fraction=0.2)
    assert len(data.train) == 8 and len(data.val) == 2 and data.meta["chat"]
    x, y = data.train_batch(0, 4, 64)
    longest = max(len(e.ids) for e in [data.train[int(i)] for i in data._perm[:4]]) - 1
    assert x.shape == y.shape == (4, longest) and longest < 64  # padded to the longest row, not to seq_len
    short_x, short_y = data.train_batch(0, 4, 8)
    assert short_x.shape == (4, 8)  # longer examples are cut to seq_len ...
    for row in range(4):  # ... from the left, as generation cuts prompts: the answer's end is still the target
        e = data.train[int(data._perm[row])]
        assert short_x[row].tolist() == e.ids[-9:-1] and short_y[row].tolist() == e.labels[-8:]
    for row in range(4):
        n = int((x[row] != data.pad_id).sum())
        assert (y[row, n:] == IGNORE).all()  # padding is never a target
        assert tok.decode([t for t in y[row].tolist() if t != IGNORE]).endswith("<|im_end|>\n")
    assert torch.equal(data.train_batch(0, 4, 64)[0], x)  # deterministic by sample index
    assert 0 < data.bytes_per_token("val") < 10


def test_finetune_cli_learns_the_answers(tok, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    from slmkit.formats.hf_dir import read_provenance
    from slmkit.lm import load_lm
    from slmkit.sampling import SamplingParams
    base = tiny_model_dir(tmp_path / "base", tok)
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.3}))  # the base's default
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(chat(a, b)) + "\n" for a, b in PAIRS * 3))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", str(base), "--data", str(path), "--out", str(out), "--seq-len", "64",
                                      "--batch-size", "8", "--lr", "1e-2", "--max-steps", "150", "--eval-every", "50",
                                      "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    assert read_provenance(out / "model")["instruction_tuned"] is True
    lm = load_lm(str(out))
    assert lm.sampling_params().temperature == 0.3  # the fine-tune keeps the sampling defaults of its base
    prompt = tok.apply_chat_template([{"role": "user", "content": "Translate dog"}])
    answer = lm.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0, stop=["<|im_end|>"]))[0]
    assert answer.strip() == "chien"
    too_long = CliRunner().invoke(app, ["finetune", str(base), "--data", str(path), "--out", str(tmp_path / "r2"),
                                        "--seq-len", "4096", "--max-steps", "1"])
    assert too_long.exit_code == 2 and "exceeds the model's context" in too_long.output
