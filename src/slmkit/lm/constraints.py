"""Structured output: a grammar every sampled token must keep to, through llguidance.

    grammar = compile_grammar(tokenizer, json_schema={"type": "object", ...})   # ValueError: what is wrong
    m = Matcher(tokenizer, grammar)
    logits = m.mask(logits)        # tokens the grammar forbids next -> -inf (before any other sampling step)
    m.advance(token)               # the sampled token; m.done once the grammar is complete

llguidance (Microsoft's, in Rust; what vLLM, SGLang and llama.cpp's LLGUIDANCE build use) rather than xgrammar:
its wheel has no dependencies at all, where xgrammar's requires torch, transformers and triton, which would pull
a CUDA torch into a CPU install. It builds its token trie straight from the HF `tokenizers` JSON that slmkit's
Tokenizer wraps, so the same code serves slmkit's models and GGUF files (their tokenizer is rebuilt the same way).

JSON whitespace is bounded: at most 12 characters of it between two tokens of the JSON (llguidance's
`whitespace_pattern`). Free whitespace (llguidance's default) lets a weak model emit spaces until max_tokens and
never close the object; none at all (`whitespace_flexible: false`) pushes a real instruct model, which writes
`{\n  "key": ...`, off its course (SmolLM2-135M-Instruct then writes one endless key). A grammar bounds what is
generated, not how long: a schema with unbounded strings, numbers or arrays can still run past max_tokens, and a
truncated reply (finish_reason "length") is not valid JSON. A schema bounded everywhere (maxLength, maxItems,
enums, integer ranges) cannot, given max_tokens above its longest reply.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import torch

# Bounded JSON whitespace (see the module docstring); a schema's own "x-guidance" options still win.
JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{0,12}"}

_ll_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("structured output needs llguidance: pip install 'slmkit[serve]'") from None
    return llguidance


def ll_tokenizer(tokenizer):
    """llguidance's view of slmkit's `tokenizer` (built once per tokenizer: 0.16 s for SmolLM2's 49k vocabulary)."""
    ll = _ll_tokenizers.get(tokenizer)
    if ll is None:
        ll = _llguidance().LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size,
                                       eos_token=tokenizer.eos_id)
        _ll_tokenizers[tokenizer] = ll
    return ll


def compile_grammar(tokenizer, *, json_schema: dict | None = None, grammar: str | None = None,
                    regex: str | None = None) -> str:
    """llguidance's grammar for exactly one of: a JSON schema (`{}`: any JSON value), a grammar (GBNF as
    llama.cpp's, or Lark as llguidance's) or a regular expression. Raises ValueError saying what is wrong with it."""
    llg = _llguidance()
    given = [k for k, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give one of json_schema, grammar or regex, not {' and '.join(given) or 'none'}")
    if json_schema is not None:
        if not isinstance(json_schema, dict):
            raise ValueError("a JSON schema is an object")
        compiled = llg.LLMatcher.grammar_from_json_schema(json.dumps(json_schema), defaults=JSON_OPTIONS)
    elif grammar is not None:
        compiled = llg.grammar_from("grammar", grammar)  # GBNF is translated to Lark; Lark passes through
    else:
        compiled = llg.LLMatcher.grammar_from_regex(regex)
    error = llg.LLMatcher.validate_grammar(compiled, ll_tokenizer(tokenizer))
    if error:
        raise ValueError(error)
    return compiled


class Matcher:
    """One sequence's place in a grammar: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, tokenizer, grammar: str):
        self._m = _llguidance().LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        self.vocab_size = tokenizer.vocab_size
        self._check()

    def _check(self) -> None:
        if self._m.is_error():
            raise ValueError(f"the grammar failed: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but eos may follow, so the completion ends here."""
        return self._m.is_stopped()

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar allows next."""
        # llguidance's bitmask: token i is bit i % 32 of little-endian int32 word i // 32, i.e. bit i % 8 of byte i // 8
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (vocab,) with every token the grammar forbids next at -inf (a new tensor). Rows past the
        tokenizer's vocabulary (a model's padded embedding) are forbidden too."""
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(self.vocab_size, logits.shape[-1])
        allowed[:n] = self.allowed()[:n]
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Move past the sampled `token` (one the mask allowed)."""
        self._m.consume_token(token)
        self._check()


def read_json_schema(value: str) -> dict:
    """A JSON schema given on the command line: inline JSON ('{"type": "object"}') or a .json file's path."""
    from pathlib import Path
    text, where = value, "--json-schema"
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{value}: neither an inline JSON schema nor a file")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a JSON schema is an object")
    return schema
