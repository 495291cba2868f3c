"""The masked-LM objective (`slm train --objective mlm`): RoBERTa's recipe (Liu et al. 2019) on a token dataset.

What RoBERTa changed from BERT, and how each is done here:

- **Dynamic masking.** 15% of the real tokens of a sequence are chosen afresh each time it is drawn; of those,
  80% become <mask>, 10% a random token, 10% stay as they are; the loss is the cross-entropy at the chosen
  positions only. The draw is a function of (seed, sample index) (`mask_tokens`), the same index the token
  dataset orders its windows by, so a window seen in a second epoch gets a new mask, while a resumed run, or the
  same global batch split over DDP ranks, draws exactly the masks an uninterrupted single process would.
  Special tokens (bos, eos, pad, <mask>, any added special) are never chosen and never a random replacement.
  Validation masks are drawn with a fixed seed (VAL_SEED) per validation window, so every check of every run,
  whatever its --seed, scores the same masked positions.
- **FULL-SENTENCES packing, no next-sentence prediction.** Each sequence is a contiguous window of the token
  stream: a token dataset already packs its documents back to back, each behind a bos (data/tokens.py), and a
  window runs across document boundaries, as RoBERTa's FULL-SENTENCES inputs do. `full_sentence_windows` makes
  every window look like what the encoder sees at inference: it opens with <s>, and each document boundary inside
  it reads `</s> <s>` (RoBERTa's extra separator between documents), so a single text `<s> ... </s>` (what the
  saved tokenizer's post-processor adds, and what `slm embed` feeds the model) is a pattern the model was
  trained on. There is no second segment and no NSP loss.
- **Large batches** come from --grad-accum (and DDP): RoBERTa's 8k-sequence batches are
  batch_size x grad_accum x world_size sequences here.

The mask token. A tokenizer trained by `slm data prepare` (or GPT-2's) has no <mask>, and adding one to
SPECIAL_TOKENS would shift every id of every tokenizer slmkit trains. So an MLM run extends the dataset's
tokenizer instead (`mlm_tokenizer`): it appends `<mask>` (and `<pad>` when there is none; RoBERTa's positions
count from the pad id) after the last id, which the data never contains, and sets the post-processor that adds
<s> ... </s>. That extended tokenizer is saved with the encoder (RUN/checkpoint, RUN/model), whose vocabulary is
the dataset's plus those one or two ids; resume rebuilds it identically from the dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, processors
from torch import nn

from slmkit.data.tokens import TokenDataset
from slmkit.eval.perplexity import bits_per_byte
from slmkit.model.encoder import ENCODER_PRESETS, Encoder, EncoderConfig, encoder_config
from slmkit.tokenizer import Tokenizer
from slmkit.train.perf import autocast

OBJECTIVES = ("clm", "mlm", "ul2")  # ul2: train/ul2.py
MASK_TOKEN, PAD_TOKEN = "<mask>", "<pad>"
MASK_PROB = 0.15  # of the real tokens, chosen for prediction
MASK_REPLACE, MASK_RANDOM = 0.8, 0.1  # of the chosen: -> <mask>, -> a random token (the rest stay)
VAL_SEED = 20190726  # validation masks do not depend on the run's --seed (RoBERTa's arXiv date)
_STREAM = 0x4D4C4D  # "MLM": keeps the mask draws apart from the dataset's window order for the same seed


@dataclass
class MLMVocab:
    """The ids the masked-LM objective needs, for a dataset and its (extended) tokenizer."""

    vocab_size: int  # the encoder's: the dataset's vocabulary + <mask> (+ <pad>)
    mask_id: int
    pad_id: int
    bos_id: int | None  # opens each window and each document (data/tokens.py's separator)
    eos_id: int | None  # closes a document inside a window (when the tokenizer has both)
    special_ids: np.ndarray  # never masked, never a random replacement
    random_ids: np.ndarray  # what the 10% random replacements draw from: every other id of the dataset's vocabulary
    token_bytes: np.ndarray | None  # UTF-8 bytes each id stands for (byte-level BPE), or None: see masked_bytes
    mean_bytes: float  # bytes per real (non-separator) token of the validation split
    tokenizer: Tokenizer | None  # the extended tokenizer, saved with the model


def mlm_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with a mask token (and a pad token) appended when it has none, and a post-processor that wraps
    a text in bos ... eos (RoBERTa's `<s> text </s>`), as an encoder trained on its data expects."""
    hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
    mask = tokenizer.mask_token or MASK_TOKEN
    pad = tokenizer.pad_token or PAD_TOKEN
    if tokenizer.pad_token is None:
        hf.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
    if tokenizer.mask_token is None:
        # lstrip, as RoBERTa's: "the capital is <mask>." puts the space into the mask, not into a token before it
        hf.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False, lstrip=True)])
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    ends = [t for t in (bos, eos) if t is not None]
    if ends:
        single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
        pair = " ".join([*([bos] if bos else []), "$A", *([eos, eos] if eos else []), "$B", *([eos] if eos else [])])
        hf.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, hf.token_to_id(t)) for t in dict.fromkeys(ends)])
    return Tokenizer(hf, bos_token=bos, eos_token=eos, pad_token=pad, mask_token=mask,
                     model_max_length=tokenizer.model_max_length, add_bos=tokenizer.add_bos)


def mlm_vocab(data: TokenDataset, tokenizer: Tokenizer | None, init_from: str | None = None) -> MLMVocab:
    """The masked-LM ids for `data`; `tokenizer` is the dataset's (None for a dataset without one: then <mask>
    and <pad> are the two ids after its vocabulary, and there are no bos/eos). Continuing an encoder
    (`init_from`), its own tokenizer is used, which must give every id of the dataset's the same meaning."""
    base = data.vocab_size
    if init_from is not None:
        tokenizer = _continued_tokenizer(init_from, tokenizer, data)
    split = data.meta["splits"]["val"]
    mean_bytes = split["bytes"] / max(1, split["tokens"] - split.get("documents", 0))
    if tokenizer is None:
        bos, eos = data.meta.get("bos_id"), data.meta.get("eos_id")
        special = np.unique(np.array([i for i in (base, base + 1, bos, eos) if i is not None], dtype=np.int64))
        return MLMVocab(vocab_size=base + 2, mask_id=base, pad_id=base + 1, bos_id=bos, eos_id=eos,
                        special_ids=special, random_ids=np.setdiff1d(np.arange(base), special),
                        token_bytes=None, mean_bytes=mean_bytes, tokenizer=None)
    tok = mlm_tokenizer(tokenizer)
    added = [i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special]
    special = np.unique(np.array([i for i in [*added, tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id]
                                  if i is not None], dtype=np.int64))
    vocab = max(tok.vocab_size, base)
    return MLMVocab(vocab_size=vocab, mask_id=tok.mask_id, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                    special_ids=special, random_ids=np.setdiff1d(np.arange(base), special),
                    token_bytes=_byte_level_lengths(tok, vocab, special), mean_bytes=mean_bytes, tokenizer=tok)


def _continued_tokenizer(init_from: str, data_tokenizer: Tokenizer | None, data: TokenDataset) -> Tokenizer:
    from slmkit.tokenizer import load_tokenizer
    tok = load_tokenizer(init_from)
    fix = f"tokenize the data with it: `slm data prepare ... --tokenizer {init_from}`"
    if data_tokenizer is None:
        raise ValueError(f"{data.path} has no tokenizer/ to check against {init_from}'s; {fix}")
    theirs = tok.hf.get_vocab()
    if any(theirs.get(t) != i for t, i in data_tokenizer.hf.get_vocab().items()):
        raise ValueError(f"{data.path} was tokenized with another tokenizer than {init_from}'s; {fix}")
    if tok.mask_token is None:
        raise ValueError(f"{init_from}: its tokenizer has no mask token, so it was not trained as a masked LM")
    return tok


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet (its bytes_to_unicode): the printable character each byte is written as."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _byte_level_lengths(tok: Tokenizer, vocab: int, special: np.ndarray) -> np.ndarray | None:
    """Bytes per id of a byte-level BPE (slmkit's and GPT-2's tokenizers): each character of a token's string is
    one byte. None for other tokenizers (WordPiece, ...), whose bytes per token the validation split's mean gives."""
    if (json.loads(tok.hf.to_str()).get("decoder") or {}).get("type") != "ByteLevel":
        return None
    alphabet = _gpt2_byte_chars()
    out = np.zeros(vocab, dtype=np.int64)
    for token, i in tok.hf.get_vocab(with_added_tokens=False).items():
        if i < vocab and all(c in alphabet for c in token):
            out[i] = len(token)
    out[special[special < vocab]] = 0
    return out


# ---- the encoder -------------------------------------------------------------------------------------------

def build_encoder(preset: str, overrides: dict, vocab: MLMVocab, seq_len: int) -> Encoder:
    """An encoder of `preset` shaped by `overrides`, for `vocab`. Positions default to --seq-len: a learned
    position the training never reaches would stay random, and the embedder truncates texts at the table's end."""
    fields = {"max_positions": seq_len, **overrides}
    if fields.get("vocab_size", vocab.vocab_size) < vocab.vocab_size:
        raise ValueError(f"encoder vocab_size {fields['vocab_size']} < the {vocab.vocab_size} ids of the dataset's "
                         "tokenizer with <mask>; drop --set vocab_size")
    fields.setdefault("vocab_size", vocab.vocab_size)
    if fields.get("pad_token_id", vocab.pad_id) != vocab.pad_id:
        raise ValueError(f"pad_token_id is the tokenizer's pad ({vocab.pad_id}); drop --set pad_token_id")
    fields["pad_token_id"] = vocab.pad_id
    if not fields.get("mlm_head", True):
        raise ValueError("masked-LM training needs the MLM head; drop --set mlm_head=false")
    cfg = encoder_config(preset, **fields)
    if seq_len > cfg.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the encoder's {cfg.max_positions} positions; use --seq-len "
                         f"{cfg.max_positions} or less, or --set max_positions={seq_len}")
    return Encoder(cfg)


def continued_encoder(init_from: str, overrides: dict, vocab: MLMVocab, seq_len: int) -> Encoder:
    """The encoder directory `init_from` (with its masked-LM head) to train further on the masked-LM objective."""
    from slmkit.formats.encoder_dir import is_encoder_dir, load_encoder_dir
    if not is_encoder_dir(init_from):
        raise ValueError(f"{init_from}: not an encoder directory (BERT/RoBERTa config.json); --objective mlm "
                         "continues an encoder")
    if overrides:
        raise ValueError(f"--set {next(iter(overrides))}: the shape of a continued encoder is {init_from}'s")
    model = load_encoder_dir(init_from).train()
    cfg = model.cfg
    if model.lm_head is None:
        raise ValueError(f"{init_from}: the encoder has no masked-LM head (a sentence-embedding model, e.g.); "
                         "masked-LM training needs one")
    if cfg.vocab_size < vocab.vocab_size or cfg.pad_token_id != vocab.pad_id:
        raise ValueError(f"{init_from}: its vocabulary ({cfg.vocab_size} ids, pad {cfg.pad_token_id}) is not its "
                         f"tokenizer's ({vocab.vocab_size} ids, pad {vocab.pad_id})")
    if seq_len > cfg.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the encoder's {cfg.max_positions} positions; use --seq-len "
                         f"{cfg.max_positions} or less")
    return model


def check_preset(preset: str, objective: str) -> None:
    """One line when the preset is of the other kind of model than the objective trains."""
    from slmkit.model.config import PRESETS
    if objective == "mlm" and preset not in ENCODER_PRESETS:
        kind = "a decoder preset" if preset in PRESETS else "not a preset"
        raise ValueError(f"preset {preset!r} is {kind}; --objective mlm trains an encoder: choose one of "
                         f"{', '.join(ENCODER_PRESETS)}")
    if objective == "clm" and preset in ENCODER_PRESETS:
        raise ValueError(f"preset {preset!r} is an encoder; train it with --objective mlm (causal LM presets: "
                         f"{', '.join(PRESETS)})")


def flops_per_token(cfg: EncoderConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x the body's matrices + attention's 12·L·d·T, plus the MLM
    head (dense + vocabulary projection) at the masked 15% of positions only (loss_and_accuracy skips the rest)."""
    d = cfg.dim
    body = cfg.n_layers * (4 * d * d + 2 * d * cfg.hidden_dim)
    return 6 * body + 12 * cfg.n_layers * d * seq_len + 6 * MASK_PROB * (d * d + cfg.vocab_size * d)


class MaskedLM(nn.Module):
    """The encoder and its loss as one module, so DDP (which hooks a module's forward) sees the head's use too."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, labels: torch.Tensor):
        """(mean cross-entropy over the masked positions, how many of them the argmax gets right, how many)."""
        hidden = self.encoder(ids)  # full windows, no padding
        chosen = labels != -100
        logits = self.encoder.mlm_logits(hidden[chosen]).float()  # the vocabulary projection at 15% of positions
        target = labels[chosen]
        n = target.numel()
        loss = F.cross_entropy(logits, target, reduction="sum") / max(n, 1)
        return loss, (logits.argmax(-1) == target).sum(), n


# ---- batches -----------------------------------------------------------------------------------------------

def full_sentence_windows(rows: np.ndarray, vocab: MLMVocab) -> np.ndarray:
    """Windows of the token stream as the encoder's inputs: each opens with bos, and each document boundary inside
    (the dataset's bos separator) becomes eos bos; cut back to the window's length. With one separator token
    (GPT-2's <|endoftext|> is bos and eos) the window just opens with it."""
    b, t = rows.shape
    bos, eos = vocab.bos_id, vocab.eos_id
    sep = bos if bos is not None else eos
    if sep is None:
        return rows
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        if row[0] == sep:
            row = row[1:]
        if bos is not None and eos is not None and bos != eos:
            row = np.insert(row, np.flatnonzero(row == bos), eos)
        out[r] = np.concatenate([[sep], row[:t - 1]])
    return out


def mask_tokens(ids: np.ndarray, samples: list[int], seed: int, vocab: MLMVocab):
    """RoBERTa's dynamic masking of `ids` (B, T): (inputs, labels) int64 tensors, labels -100 where not chosen.

    Row r's draws come from a generator seeded by (seed, samples[r]) alone, so a sample's mask does not depend on
    which batch, micro-batch or rank it lands in."""
    inputs, labels = ids.copy(), np.full_like(ids, -100)
    maskable = ~np.isin(ids, vocab.special_ids)
    for r, sample in enumerate(samples):
        rng = np.random.default_rng([seed, _STREAM, sample])
        chosen = (rng.random(ids.shape[1]) < MASK_PROB) & maskable[r]
        action = rng.random(ids.shape[1])
        random = vocab.random_ids[rng.integers(0, len(vocab.random_ids), ids.shape[1])]
        labels[r, chosen] = ids[r, chosen]
        inputs[r] = np.where(chosen & (action < MASK_REPLACE), vocab.mask_id,
                             np.where(chosen & (action >= 1 - MASK_RANDOM), random, ids[r]))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def train_batch(data: TokenDataset, first: int, batch_size: int, seq_len: int, seed: int, vocab: MLMVocab):
    """Samples first .. first+batch_size-1: the dataset's windows (its seeded order), packed and masked."""
    x, _ = data.train_batch(first, batch_size, seq_len, seed)
    rows = full_sentence_windows(x.numpy(), vocab)
    return mask_tokens(rows, list(range(first, first + batch_size)), seed, vocab)


def masked_bytes(labels: torch.Tensor, vocab: MLMVocab) -> float:
    """UTF-8 bytes of the text the masked tokens stand for: exact for a byte-level BPE, else the validation split's
    mean bytes per real token times their number (the masked tokens are a uniform sample of the real tokens)."""
    chosen = labels[labels != -100]
    if vocab.token_bytes is None:
        return float(chosen.numel() * vocab.mean_bytes)
    return float(vocab.token_bytes[chosen.numpy()].sum())


@torch.no_grad()
def evaluate(model: Encoder, data: TokenDataset, vocab: MLMVocab, seq_len: int, batch_size: int, device,
             precision: str, max_tokens: int | None = None) -> dict:
    """Masked-LM validation on the val split's windows, with the same masks every time (VAL_SEED, window index):

    - val_loss: mean cross-entropy (nats) over the masked tokens;
    - val_masked_acc: the fraction of masked tokens the argmax predicts;
    - val_bpb: the masked tokens' cross-entropy in bits over the UTF-8 bytes they stand for. It says how well the
      model fills 15% holes given the other 85% of the text on both sides, so it is far lower than a causal
      model's bits per byte on the same text, which predicts every token from its left context only: compare
      MLM bpb with MLM bpb (same masking rate), never with `slm train`'s causal val_bpb.
    """
    was_training = model.training
    model.eval()
    objective = MaskedLM(model)
    nats, correct, count, n_bytes, window = 0.0, 0, 0, 0.0, 0
    for x, _ in data.val_batches(batch_size, seq_len, max_tokens):
        rows = full_sentence_windows(x.numpy(), vocab)
        ids, labels = mask_tokens(rows, list(range(window, window + len(rows))), VAL_SEED, vocab)
        window += len(rows)
        with autocast(device, precision):
            loss, right, n = objective(ids.to(device), labels.to(device))
        nats += loss.item() * n
        correct += int(right)
        count += n
        n_bytes += masked_bytes(labels, vocab)
    model.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_bpb": float("nan"), "val_masked_acc": float("nan"),
                "val_masked_tokens": 0}
    return {"val_loss": nats / count, "val_bpb": bits_per_byte(nats, n_bytes),
            "val_masked_acc": correct / count, "val_masked_tokens": count}
