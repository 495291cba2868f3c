"""Tokenizers: train a byte-level BPE, load an existing one (tokenizer.json or GPT-2 files), chat template.

Everything here is a thin layer over Hugging Face `tokenizers` (Rust, fast, parallel). The `Tokenizer`
class adds the few things the rest of slmkit needs on top of it: which tokens are bos/eos/pad, a chat
template, and saving a directory that `transformers.AutoTokenizer` (and llama.cpp's converter) can read.

Byte-level BPE is used throughout because it is lossless: every string is a sequence of bytes, every byte
has a token, so `decode(encode(s)) == s` for any valid Unicode text (Python strings holding lone
surrogates are not valid text, cannot be UTF-8 encoded, and are rejected with a ValueError).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from slmkit.chat import CHATML_TEMPLATE, TURN_END, TURN_START
from slmkit.files import atomic_write_json, atomic_write_text

# Special tokens come first in the vocabulary, so a trained tokenizer always has pad=0, bos=1, eos=2.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", TURN_START, TURN_END]

# GPT-2's end-of-text token doubles as its bos and eos.
GPT2_ENDOFTEXT = "<|endoftext|>"
# (vocabulary, merges) file name pairs of a GPT-2 style BPE: OpenAI's originals, and the Hugging Face names.
GPT2_FILE_PAIRS = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]

# transformers writes this for "no known maximum length"; we read it back as None.
_UNKNOWN_MAX_LENGTH = int(1e30)


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` plus the special tokens and chat template that go with it."""

    def __init__(self, hf: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None, add_bos: bool | None = None, mask_token: str | None = None):
        self.hf = hf
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.mask_token = mask_token  # masked-LM encoders only (RoBERTa's <mask>, BERT's [MASK])
        self.chat_template = chat_template
        self.model_max_length = model_max_length  # written to tokenizer_config.json when known
        # Whether the model saw a bos token in front of every text: true for slmkit's own data (each document
        # starts with bos), false for e.g. SmolLM2, whose "bos" <|im_start|> only opens chat turns.
        self.add_bos = (bos_token is not None) if add_bos is None else add_bos
        for name, token in [("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                            ("mask_token", mask_token)]:
            if token is not None and hf.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")

    # --- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def mask_id(self) -> int | None:
        return self._id(self.mask_token)

    @property
    def sha256(self) -> str:
        """Identifies the token ids: a hash of tokenizer.json as `tokenizers` serialises it.

        Re-serialising makes it independent of how the file on disk was formatted, so it is the same before
        and after save/load. Chat template and bos/eos names are not included: they don't change any id.
        """
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    # --- encode / decode ----------------------------------------------------------------------------------

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True, but this tokenizer has no bos token")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True, but this tokenizer has no eos token")
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # add_special_tokens=False: bos/eos are only ever added here, explicitly, never by a post-processor
        # hidden in a loaded tokenizer.json (e.g. Llama's, which prepends <s>).
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except TypeError as e:
            if (error := _text_error(text)) is None:
                raise
            raise error from e
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encode many texts at once, in parallel on all cores (Rust threads; the GIL is released)."""
        texts = list(texts)
        try:
            # encode_batch_fast = encode_batch without computing character offsets, which we never use.
            encodings = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError as e:
            bad = next((i for i, t in enumerate(texts) if _text_error(t) is not None), None)
            if bad is None:
                raise
            raise ValueError(f"texts[{bad}]: {_text_error(texts[bad])}") from e
        return [self._wrap(enc.ids, add_bos, add_eos) for enc in encodings]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        # Accept lists, numpy arrays and torch tensors alike.
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        # Note `tokenizers` itself defaults to skip_special_tokens=True, so always pass it. It never "cleans up
        # tokenization spaces" (that is a transformers option), which would break the round trip.
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    # --- chat ---------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_vars) -> str:
        """Render a conversation to text, exactly as transformers' `apply_chat_template(tokenize=False)` does.

        The template sees the same variables transformers passes: messages, add_generation_prompt,
        bos_token, eos_token, pad_token, plus any extra `template_vars` (e.g. tools).
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        # Like transformers: drop None-valued keys, which templates handle better as missing.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        variables.update(template_vars)
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    # --- save ---------------------------------------------------------------------------------------------

    def save(self, directory) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self.hf.to_str(pretty=True))
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.mask_token:  # only encoders have one; transformers' fill-mask pipeline reads it
            special["mask_token"] = self.mask_token
        config = {
            # The generic fast tokenizer: transformers takes everything from tokenizer.json.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "unk_token": None,  # byte-level BPE never needs one
            "chat_template": self.chat_template,
            "model_max_length": self.model_max_length or _UNKNOWN_MAX_LENGTH,
            # Spaces are part of the text; "cleaning them up" after decoding would change it.
            "clean_up_tokenization_spaces": False,
            # bos/eos are added explicitly by whoever builds the sequences (see Tokenizer.encode); slmkit_add_bos
            # records whether they should be (Tokenizer.add_bos).
            "add_bos_token": False,
            "add_eos_token": False,
            "slmkit_add_bos": self.add_bos,
        }
        atomic_write_json(directory / "tokenizer_config.json", config)
        atomic_write_json(directory / "special_tokens_map.json", {k: v for k, v in special.items() if v})


def _text_error(text) -> Exception | None:
    """Explain why `tokenizers` refused `text` (it only says "TextInputSequence must be str")."""
    if not isinstance(text, str):
        return TypeError(f"expected a str to encode, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return ValueError(f"text is not valid Unicode (lone surrogate at index {e.start}); it cannot be "
                          "UTF-8 encoded, so no byte-level tokenizer can represent it")
    return None


# --- chat templates (rendered in a sandbox: templates shipped with models are untrusted code) --------------

@lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # transformers' templates may wrap assistant text in {% generation %}...{% endgeneration %} to mark
        # it for loss masks; rendering to text just keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The same environment settings as transformers, so a template renders identically in both.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# --- training ----------------------------------------------------------------------------------------------

def _byte_level(bpe: models.BPE) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE around `bpe`.

    GPT-2's regex splits text into words/numbers/punctuation/space runs before BPE, so merges never cross
    those boundaries; llama.cpp recognises this setup as its `gpt2` pre-tokenizer. There is deliberately no
    normalizer: text is normalised during data cleaning, and a normalizer here would break the round trip.
    """
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                    special_tokens=SPECIAL_TOKENS, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on `texts`. The vocabulary is special tokens, then the 256 bytes, then merges.

    The result has at most `vocab_size` tokens (fewer when the corpus runs out of pairs seen
    `min_frequency` times). bos/eos/pad and the ChatML template are set when their tokens are present.
    """
    special_tokens = list(special_tokens)
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(special_tokens) + n_bytes:
        raise ValueError(f"vocab_size={vocab_size} is too small: {len(special_tokens)} special tokens + "
                         f"{n_bytes} byte tokens need at least {len(special_tokens) + n_bytes}")
    hf = _byte_level(models.BPE())  # no unk token: every byte has a token
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        # Seed the vocabulary with all 256 bytes, even those absent from the corpus, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)

    def present(token):
        return token if token in special_tokens else None

    has_chatml = TURN_START in special_tokens and TURN_END in special_tokens
    return Tokenizer(hf, bos_token=present("<s>"), eos_token=present("</s>"), pad_token=present("<pad>"),
                     chat_template=CHATML_TEMPLATE if has_chatml else None)


# --- loading -----------------------------------------------------------------------------------------------

def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer from any of:

    - a `tokenizer.json` file, or a directory holding one (+ optional tokenizer_config.json,
      special_tokens_map.json, chat_template.jinja, as transformers writes them);
    - GPT-2's `encoder.json` + `vocab.bpe` (or `vocab.json` + `merges.txt`): a directory holding them,
      or the path of either file.
    """
    path = Path(path)
    expected = ("expected a tokenizer.json file, a directory containing tokenizer.json, "
                "or GPT-2 BPE files (encoder.json + vocab.bpe)")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} ({expected})")

    if path.is_dir():
        directory, tokenizer_json = path, path / "tokenizer.json"
        if not tokenizer_json.is_file():
            tokenizer_json = None
    elif any(path.name in pair for pair in GPT2_FILE_PAIRS):
        directory, tokenizer_json = path.parent, None
    else:
        # A tokenizer.json under another name has no side files we can trust to belong to it.
        directory = path.parent if path.name == "tokenizer.json" else None
        tokenizer_json = path

    if tokenizer_json is not None:
        try:
            hf = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{tokenizer_json}: not a valid tokenizer.json ({e})") from e
        defaults = _guess_special_tokens(hf)
    else:
        hf = _load_gpt2(directory, expected)
        defaults = {"bos_token": GPT2_ENDOFTEXT, "eos_token": GPT2_ENDOFTEXT} if _has(hf, GPT2_ENDOFTEXT) else {}

    # What the side files say overrides the defaults; what they don't mention keeps them.
    settings = {**defaults, **(_read_config(directory) if directory is not None else {})}
    try:
        return Tokenizer(hf, **settings)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# --- comparing ---------------------------------------------------------------------------------------------

class TokenizerMismatch(ValueError):
    """Two models that must read the same token ids (distillation, speculative decoding) do not."""


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_name: str, b_name: str, hint: str = "") -> None:
    """Raise TokenizerMismatch (one line naming both, then `hint`) unless `a` and `b` map every token string to
    the same id."""
    va, vb = a.hf.get_vocab(), b.hf.get_vocab()
    if va == vb:
        return
    differ = sum(1 for tok, i in vb.items() if va.get(tok) != i)
    example = next((tok for tok, i in sorted(vb.items(), key=lambda kv: kv[1]) if va.get(tok) != i), None)
    raise TokenizerMismatch(
        f"{a_name} and {b_name} use different tokenizers ({len(va):,} vs {len(vb):,} tokens; {differ:,} of "
        f"{b_name}'s tokens have another id or none in {a_name}'s, e.g. {example!r}). {hint}".rstrip())


def _has(hf: tokenizers.Tokenizer, token: str) -> bool:
    return hf.token_to_id(token) is not None


def _guess_special_tokens(hf: tokenizers.Tokenizer) -> dict:
    """Defaults for a tokenizer.json whose side files (if any) name no special tokens: slmkit's and GPT-2's."""
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    guesses = {"bos_token": ["<s>", GPT2_ENDOFTEXT], "eos_token": ["</s>", GPT2_ENDOFTEXT], "pad_token": ["<pad>"]}
    return {name: next((t for t in candidates if t in special), None) for name, candidates in guesses.items()}


def _load_gpt2(directory: Path, expected: str) -> tokenizers.Tokenizer:
    """Build GPT-2's byte-level BPE from its vocabulary (token -> id JSON) and merges (one pair a line)."""
    for vocab_name, merges_name in GPT2_FILE_PAIRS:
        vocab_file, merges_file = directory / vocab_name, directory / merges_name
        if vocab_file.is_file() or merges_file.is_file():
            break
    else:
        raise ValueError(f"{directory}: no tokenizer files found ({expected})")
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: GPT-2 BPE needs both {vocab_file.name} and {merges_file.name}")

    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{vocab_file}: not valid JSON ({e})") from e
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{vocab_file}: expected a JSON object mapping tokens to integer ids")

    merges = []
    for lineno, line in enumerate(merges_file.read_text(encoding="utf-8").splitlines(), 1):
        if (lineno == 1 and line.startswith("#version")) or not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{merges_file}:{lineno}: expected two space-separated tokens, got {line!r}")
        merges.append((pair[0], pair[1]))

    try:
        hf = _byte_level(models.BPE(vocab=vocab, merges=merges))
    except Exception as e:  # e.g. a merge whose parts are not in the vocabulary
        raise ValueError(f"{directory}: inconsistent {vocab_file.name} / {merges_file.name} ({e})") from e
    # <|endoftext|> is a single special token, never split into "<", "|", ... (it keeps its GPT-2 id).
    if GPT2_ENDOFTEXT in vocab:
        hf.add_special_tokens([AddedToken(GPT2_ENDOFTEXT, special=True, normalized=False)])
    return hf


def _token_name(value) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_config(directory: Path) -> dict:
    """Special tokens, chat template and max length from transformers' side files: only what they mention."""
    config_file = directory / "tokenizer_config.json"
    map_file = directory / "special_tokens_map.json"
    template_file = directory / "chat_template.jinja"

    def read_json(f: Path) -> dict:
        if not f.is_file():
            return {}
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{f}: expected a JSON object")
        return obj

    config, special_map = read_json(config_file), read_json(map_file)
    settings = {}
    for name in ("bos_token", "eos_token", "pad_token", "mask_token"):
        # tokenizer_config.json wins; special_tokens_map.json (older transformers) fills what it lacks.
        if name in config or name in special_map:
            settings[name] = _token_name(config.get(name)) or _token_name(special_map.get(name))

    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: use the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template_file.is_file():  # newer transformers save it here, and prefer it, as we do
        template = template_file.read_text(encoding="utf-8")
    if isinstance(template, str):
        settings["chat_template"] = template

    # slmkit's own record wins; otherwise transformers' add_bos_token flag, whose absence from a model's
    # tokenizer_config.json means no bos (GPT-2 style); with no side files at all, a bos token means "use it".
    if isinstance(config.get("slmkit_add_bos"), bool):
        settings["add_bos"] = config["slmkit_add_bos"]
    elif config_file.is_file():
        settings["add_bos"] = bool(config.get("add_bos_token", False))

    max_len = config.get("model_max_length")
    if isinstance(max_len, int) and max_len < _UNKNOWN_MAX_LENGTH:
        settings["model_max_length"] = max_len
    return settings
