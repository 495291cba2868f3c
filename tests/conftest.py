"""Shared fixtures: tiny models and a tiny synthetic token dataset, so tests run in seconds on a CPU."""

import contextlib
import json
import os
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch
from browser import browser, chromium_binary  # noqa: F401 (the page tests' fixtures: headless Chromium)

from slmkit.model.config import model_config

TINY = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


# A tiny translation task shared by the fine-tuning tests (SFT, LoRA).
PAIRS = [("red", "rouge"), ("blue", "bleu"), ("green", "vert"), ("black", "noir"), ("white", "blanc"),
         ("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("water", "eau"), ("bread", "pain")]


def translation_tokenizer():
    from slmkit.tokenizer import train_tokenizer
    return train_tokenizer([" ".join(f"Translate {a}: {b}." for a, b in PAIRS)] * 20, vocab_size=320)


def chat(a, b, system=None):
    """A chat record asking to translate `a`, answered `b`."""
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": f"Translate {a}"}, {"role": "assistant", "content": b}]}


@pytest.fixture(autouse=True)
def _restore_process_settings():
    """`slm serve` run in-process (CliRunner) sets torch's thread count to cores - 1 and a 1 ms GIL switch
    interval for the process; without this a later test ran single-threaded (the llama.cpp parity tests then
    measured a torch vs llama.cpp gap 14x larger, over their tolerance)."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    yield
    torch.set_num_threads(threads)
    sys.setswitchinterval(interval)


@pytest.fixture
def tiny_cfg():
    return model_config("nano", **TINY)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_token_dataset(path, n_train=20000, n_val=2000, vocab=96, seed=0):
    """A learnable synthetic corpus: noisy repeated patterns, in the format `slm data prepare` writes."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(3, vocab, size=37)
    stream = np.tile(pattern, (n_train + n_val) // len(pattern) + 1)[: n_train + n_val].copy()
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(3, vocab, size=int(noise.sum()))
    path.mkdir(parents=True, exist_ok=True)
    stream[:n_train].astype(np.uint16).tofile(path / "train.bin")
    stream[n_train:].astype(np.uint16).tofile(path / "val.bin")
    meta = {"format": "slmkit-tokens", "version": 1, "dtype": "uint16", "vocab_size": vocab,
            "splits": {"train": {"tokens": n_train, "documents": 1, "bytes": 3 * n_train},
                       "val": {"tokens": n_val, "documents": 1, "bytes": 3 * n_val}}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def token_data(tmp_path):
    return write_token_dataset(tmp_path / "data")


def pulled(name: str):
    """The directory of a pulled registry source (`slm pull NAME`), downloading it on first use.

    Offline, the test is skipped, except in CI (CI=true), where these downloads are the proof and must work.
    """
    import os

    from slmkit.hub import pull
    try:
        return pull(name, log=lambda m: None)
    except ConnectionError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"registry not reachable: {e}")


def tiny_model_dir(path, tokenizer, tie=True, train_on: str | None = None, steps: int = 150, **overrides):
    """A tiny slmkit model directory whose vocabulary matches `tokenizer`: random, or fitted to `train_on`.

    A fitted model has confident predictions (large logit gaps), so greedy decoding is robust to the tiny
    numerical differences between backends; a random one has near-ties everywhere.
    """
    import dataclasses

    from slmkit.formats.hf_dir import save_model_dir
    from slmkit.model.llama import Transformer
    cfg = dataclasses.replace(model_config("nano", **TINY), vocab_size=tokenizer.vocab_size, tie_embeddings=tie,
                              bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.pad_id, **overrides)
    with torch.random.fork_rng():  # the same weights whatever ran before (the global generator's state)
        torch.manual_seed(0)
        model = Transformer(cfg)
    if train_on:
        ids = torch.tensor(tokenizer.encode(train_on * 20, add_bos=tokenizer.add_bos))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - cfg.max_seq_len - 1, (8,), generator=g)
            batch = torch.stack([ids[s:s + cfg.max_seq_len + 1] for s in starts])
            loss = model(batch[:, :-1], targets=batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_model_dir(model.eval(), path, tokenizer)


@contextlib.contextmanager
def live_server(app, send_buffer: int | None = None, **config):
    """Serve `app` on a free loopback port from a background thread; yields its base URL. `config`: more
    uvicorn.Config options (root_path, ...); `send_buffer`: the sockets' SO_SNDBUF (a slow-reader test fills it)."""
    # proto IPPROTO_TCP, not socket.socket()'s 0: asyncio sets TCP_NODELAY on accepted connections only then (as
    # uvicorn's own sockets have it); without it every response waited ~43 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted sockets inherit it
    sock.bind(("127.0.0.1", 0))
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def stop_process(proc) -> None:
    """Terminate a child process, killing it if it does not exit within 10 s."""
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_wordpiece(path, vocab: dict[str, int], pair: bool = True) -> None:
    """`path`/tokenizer.json: a lower-casing WordPiece over `vocab` whose post-processor adds [CLS] A [SEP] (and,
    with `pair`, [CLS] A [SEP] B [SEP] with token types 0 / 1), as BERT's does; the tiny encoders' tokenizer."""
    import tokenizers
    hf = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    hf.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    special = [("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    hf.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1" if pair else None, special_tokens=special)
    path.mkdir(parents=True, exist_ok=True)
    hf.save(str(path / "tokenizer.json"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning workers cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_encoder_dir(path, texts, flavour: str = "bert", std: float = 0.02, **overrides):
    """A tiny random BERT (or RoBERTa) directory over a WordPiece vocabulary of `texts`' words, its tokenizer.json
    adding [CLS] A [SEP] (and [CLS] A [SEP] B [SEP] for pairs, token types 0 / 1) as BERT's does. `std`: the
    weights' spread (BERT's 0.02 leaves a tiny random model's [CLS] state almost the same for every input, which
    a cross-encoder test would need thousands of steps to get past)."""
    import tokenizers

    from slmkit.formats.encoder_dir import save_encoder_dir
    from slmkit.model.encoder import Encoder, EncoderConfig
    from slmkit.tokenizer import load_tokenizer
    words = sorted({w for t in texts for w in tokenizers.pre_tokenizers.BertPreTokenizer().pre_tokenize_str(
        t.lower()) for w in [w[0]]})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    write_wordpiece(path, vocab)
    cfg = dict(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_positions=64, dropout=0.0,
               flavour=flavour, type_vocab_size=2 if flavour == "bert" else 1)
    model = Encoder(EncoderConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and std != 0.02:
                p.normal_(std=std)
    save_encoder_dir(model, path, tokenizer=load_tokenizer(path / "tokenizer.json"))
    return path


def _llama_server_binary():
    from slmkit.serve.llama_server import find_llama_server
    try:
        return find_llama_server()
    except FileNotFoundError:
        return None


# Tests that run llama.cpp's C++ llama-server (`slm build-llama-server`): skipped without the binary, except under
# CI=true, where .ci/run builds it and a missing binary must fail.
needs_llama_server = pytest.mark.skipif(_llama_server_binary() is None and not os.environ.get("CI"),
                                        reason="no llama-server binary (slm build-llama-server)")


def adapter_with_random_b(base, cfg, seed: int):
    """`base` (a model directory) with LoRA layers of `cfg` whose B is random (a fresh adapter's is zero and
    changes nothing), so tests can tell an adapter applied from one ignored."""
    from slmkit.formats.hf_dir import load_model_dir
    from slmkit.model.lora import LoRALinear, add_lora
    model = add_lora(load_model_dir(base), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.3)
    return model
