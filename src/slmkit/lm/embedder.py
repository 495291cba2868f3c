"""Sentence embeddings: `load_embedder(spec).embed(texts)` -> (n, dim) unit vectors, from an encoder or a decoder.

    emb = load_embedder("minilm-l6-v2")            # all-MiniLM-L6-v2 (slm pull minilm-l6-v2), or any BERT /
    vectors = emb.embed(["how do I return it?"])   # RoBERTa directory, or a slmkit/HF decoder (TorchLM.embed)
    scores = vectors @ emb.embed(["returns policy"]).T     # cosine similarities

An encoder embeds the way sentence-transformers does for all-MiniLM-L6-v2: the tokenizer's own special tokens
([CLS] ... [SEP], from tokenizer.json's post-processor), truncation at the model's positions, mean pooling over
real tokens, L2 normalisation; texts are cut at sentence-transformers' max_seq_length when the directory has one.
Batches are sorted by length and padded, so padding costs little.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import tokenizers
import torch

from slmkit.model.encoder import Encoder, mean_pool

_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_copy(tokenizer) -> tokenizers.Tokenizer:
    """A private copy of the tokenizer without the padding and truncation a tokenizer.json may carry (MiniLM's
    pads every text to 128): lengths are ours to decide here. Kept per tokenizer, since copying one costs more
    than embedding a short text (classify/head.py makes an Embedder per call)."""
    if tokenizer not in _PLAIN:
        hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
        hf.no_padding()
        hf.no_truncation()
        _PLAIN[tokenizer] = hf
    return _PLAIN[tokenizer]


class Embedder:
    """An encoder (model/encoder.py) with its tokenizer, as a sentence embedder."""

    def __init__(self, model: Encoder, tokenizer, name: str = "encoder", batch_size: int = 32,
                 max_length: int | None = None):
        self.model = model.eval() if model.training else model  # eval() walks every module: not per call
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.dim = model.cfg.dim
        self.max_length = min(max_length or model.cfg.max_positions, model.cfg.max_positions)
        self._hf = _plain_copy(tokenizer)

    def token_ids(self, text: str) -> list[int]:
        """Token ids with the tokenizer's special tokens, uncut (the server counts and checks them)."""
        return self._hf.encode(text, add_special_tokens=True).ids

    def encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's special tokens, cut to max_length (keeping the closing special token)."""
        ids = self.token_ids(text)
        if len(ids) > self.max_length:
            ids = ids[:self.max_length - 1] + ids[-1:]
        return ids

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """One unit-length vector per text, a (len(texts), dim) float32 CPU tensor."""
        return self.pool(texts).cpu()

    def pool(self, texts: list[str], normalize: bool = True, keep=None) -> torch.Tensor:
        """The mean-pooled final hidden states (len(texts), dim) on the model's device, differentiable when the
        caller has gradients on (classify/head.py trains through it); `keep` runs the encoder under a length
        schedule (model/length_drop.py), pooling over the tokens kept."""
        ids = [self.encode(t) for t in texts]
        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        chunks = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), self.model.cfg.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            x, mask = x.to(device), mask.to(device)
            if keep is None:
                hidden = self.model(x, mask)
            else:
                hidden, mask = self.model.forward_pruned(x, mask, keep)
            chunks.append(mean_pool(hidden.float(), mask, normalize=normalize))
        if not chunks:
            return torch.empty(0, self.dim, device=device)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(chunks)[inverse.to(device)]

    def close(self) -> None:
        """Nothing to free: for symmetry with LM, so callers can close whatever load_embedder gave them."""


def load_embedder(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """An embedder for `spec`: a BERT/RoBERTa directory or pulled encoder (`minilm-l6-v2`) gives an `Embedder`;
    a decoder (anything `load_lm` opens on the torch backend) gives its `TorchLM`, whose `embed` mean-pools the
    final hidden states. Both answer `embed(texts)` with unit vectors."""
    from slmkit.formats.encoder_dir import is_encoder_dir, load_encoder_dir
    from slmkit.hub import resolve_model
    from slmkit.tokenizer import load_tokenizer
    ref = resolve_model(spec, kinds=("model", "embedding"))
    if ref.kind == "dir" and is_encoder_dir(ref.location):
        model = load_encoder_dir(ref.location, device=device, dtype=dtype)
        # sentence-transformers' max_seq_length (256 for all-MiniLM-L6-v2, whose positions go to 512)
        st_config = Path(ref.location) / "sentence_bert_config.json"
        max_length = json.loads(st_config.read_text()).get("max_seq_length") if st_config.exists() else None
        return Embedder(model, load_tokenizer(Path(ref.location)), name=spec, max_length=max_length)
    from slmkit.lm.resolve import load_lm
    return load_lm(spec, backend="torch", device=device, dtype=dtype)
