"""The UL2R objective (`slm train --objective ul2 --init MODEL`): continued training of a causal decoder on UL2's
mixture of denoisers (Tay et al. 2022, "UL2: unifying language learning paradigms"; and "Transcending scaling
laws with 0.1% extra compute", U-PaLM, which does this to a trained PaLM for a few hundred steps).

The denoisers, each announced by its mode token at the start of the sequence:

    R  regular span corruption (T5's): mean span 3 tokens, 15% of the text corrupted
    X  extreme: either long spans (mean 32, 15%) or heavy corruption (mean 3, 50%), drawn per sample
    S  sequential: a prefix LM, the text cut at a uniform point, the continuation is the one span
    C  plain causal LM, no mode token, loss on every token: the left-to-right objective the model already has,
       mixed in (as U-PaLM's continued training keeps it) so left-to-right bits per byte stays where it was

Decoder-only form (as U-PaLM trains PaLM): one sequence of exactly seq_len + 1 tokens

    <|R|> a b <extra_id_0> e f <extra_id_1> <extra_id_0> c d <extra_id_1> g <extra_id_2>
    mode   the input, each span replaced by a sentinel   the targets: each sentinel, then its span, then the
                                                         closing sentinel

with the loss on the targets only (labels -100 elsewhere). The first target sentinel is context, not a target:
where the input ends cannot be predicted. A fill-in-the-middle prompt is the same thing with one span:
`<|R|> prefix <extra_id_0> suffix <extra_id_0>` and the model writes the span, then `<extra_id_1>`
(eval/fim.py). The source text of a sequence is the first seq_len + 1 - 2n - 2 tokens of the dataset's window
(n spans), so the sequence fills the window exactly.

Determinism: the mode, the span lengths and their places are drawn from a generator seeded by (seed, sample
index) alone, the index the token dataset orders its windows by, so a resumed run, or the same global batch split
over DDP ranks, sees exactly the sequences one uninterrupted process would.

The tokens. A decoder's tokenizer has no sentinels, so the run extends the init model's tokenizer (`ul2_tokenizer`)
with the three mode tokens and NUM_SENTINELS sentinels, appended after its last id as special tokens, and grows the
embedding (and an untied output layer) to match (`grow_vocabulary`): a new row starts at the mean of the existing
rows (Hewitt 2021: the new tokens then take little probability mass from the old ones) plus a little seeded noise,
so the sentinels can be told apart. The extended tokenizer is saved with the model (RUN/checkpoint, RUN/model);
continuing a model that already has them reuses their ids. The mode tokens are `<|R|>`-style rather than UL2's
`[R]`, because `[S]` is ordinary Python (`a[S]`) and the tokenizer would match it inside text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken

from slmkit.model.llama import Transformer
from slmkit.tokenizer import Tokenizer

MODES = ("R", "X", "S", "C")
MODE_TOKENS = {"R": "<|R|>", "X": "<|X|>", "S": "<|S|>"}  # C: plain causal LM has none
NUM_SENTINELS = 100  # T5's <extra_id_0> .. <extra_id_99>
DEFAULT_MIXTURE = {"R": 0.25, "X": 0.25, "S": 0.25, "C": 0.25}
# (mean span, corruption rate) per denoiser; X draws one of its two per sample
DENOISERS = {"R": [(3.0, 0.15)], "X": [(32.0, 0.15), (3.0, 0.5)]}
MIN_SEQ_LEN = 16
_STREAM = 0x554C32  # "UL2": keeps these draws apart from the dataset's window order for the same seed


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


@dataclass
class UL2Vocab:
    """The ids the UL2 objective needs."""

    mode_ids: dict[str, int]  # R, X, S
    sentinel_ids: list[int]
    vocab_size: int  # the grown model's
    tokenizer: Tokenizer  # the extended tokenizer, saved with the model


def parse_mixture(spec: str | dict | None) -> dict[str, float]:
    """{"R": w, ...} from "R=1,X=1,S=2,C=2" (weights, normalised to sum 1) or a dict; None: DEFAULT_MIXTURE."""
    if spec is None:
        return dict(DEFAULT_MIXTURE)
    if isinstance(spec, str):
        parts = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            try:
                parts[name.strip()] = float(value) if eq else float("nan")
            except ValueError:
                parts[name.strip()] = float("nan")
        spec = parts
    unknown = [m for m in spec if m not in MODES]
    if unknown:
        raise ValueError(f"ul2 mixture: unknown mode {unknown[0]!r}; the modes are {', '.join(MODES)} "
                         "(e.g. --ul2-mixture R=1,X=1,S=1,C=1)")
    bad = [m for m, w in spec.items() if not (isinstance(w, int | float) and w >= 0 and np.isfinite(w))]
    if bad:
        raise ValueError(f"ul2 mixture: the weight of {bad[0]} must be a number >= 0, as in {bad[0]}=0.25")
    total = sum(spec.values())
    if total <= 0 or not any(spec.get(m, 0) > 0 for m in ("R", "X", "S")):
        raise ValueError("ul2 mixture: give at least one denoiser (R, X or S) a positive weight")
    return {m: spec.get(m, 0.0) / total for m in MODES}


# ---- the tokenizer and the model ---------------------------------------------------------------------------

def ul2_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with the mode tokens and sentinels appended (those it lacks), as special tokens."""
    hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
    new = [t for t in [*MODE_TOKENS.values(), *map(sentinel, range(NUM_SENTINELS))] if hf.token_to_id(t) is None]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    return Tokenizer(hf, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                     chat_template=tokenizer.chat_template, model_max_length=tokenizer.model_max_length,
                     add_bos=tokenizer.add_bos)


def ul2_vocab(tokenizer: Tokenizer, model_vocab: int) -> UL2Vocab:
    tok = ul2_tokenizer(tokenizer)
    return UL2Vocab(mode_ids={m: tok.hf.token_to_id(t) for m, t in MODE_TOKENS.items()},
                    sentinel_ids=[tok.hf.token_to_id(sentinel(i)) for i in range(NUM_SENTINELS)],
                    vocab_size=max(model_vocab, tok.vocab_size), tokenizer=tok)


def has_ul2_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.hf.token_to_id(t) is not None for t in [*MODE_TOKENS.values(), sentinel(0), sentinel(1)])


def continued_decoder(init_from: str, data_tokenizer: Tokenizer | None, data,
                      overrides: dict | None = None) -> tuple[Transformer, UL2Vocab]:
    """The decoder `init_from` and its tokenizer, both extended for UL2. The dataset must be tokenized with that
    tokenizer: every id of the dataset's tokenizer means the same token in the model's."""
    from slmkit.formats.encoder_dir import is_encoder_dir
    from slmkit.formats.hf_dir import load_model_dir
    from slmkit.tokenizer import load_tokenizer
    if is_encoder_dir(init_from):
        raise ValueError(f"{init_from} is an encoder (BERT/RoBERTa); --objective ul2 continues a causal decoder "
                         "(an encoder trains with --objective mlm)")
    fix = f"tokenize the data with it: `slm data prepare ... --tokenizer {init_from}`"
    if data_tokenizer is None:
        raise ValueError(f"{data.path} has no tokenizer/ to check against {init_from}'s; {fix}")
    tok = load_tokenizer(init_from)
    theirs = tok.hf.get_vocab()
    if any(theirs.get(t) != i for t, i in data_tokenizer.hf.get_vocab().items()):
        raise ValueError(f"{data.path} was tokenized with another tokenizer than {init_from}'s; {fix}")
    model = load_model_dir(init_from, overrides=overrides)
    if model.cfg.vocab_size < data.vocab_size:
        raise ValueError(f"{init_from}: its {model.cfg.vocab_size} ids do not cover {data.path}'s "
                         f"{data.vocab_size}; {fix}")
    vocab = ul2_vocab(tok, model.cfg.vocab_size)
    return grow_vocabulary(model, vocab.vocab_size), vocab


@torch.no_grad()
def grow_vocabulary(model: Transformer, vocab_size: int) -> Transformer:
    """`model` with `vocab_size` rows of embedding (and output layer), the new ones at the mean of the old ones
    plus noise of 1% of their spread (drawn from torch's generator: the loop seeds it)."""
    old = model.cfg.vocab_size
    if vocab_size <= old:
        return model
    grown = Transformer(replace(model.cfg, vocab_size=vocab_size)).to(next(model.parameters()).dtype)
    state = model.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        w = state[name]
        rows = w.mean(0, keepdim=True) + 0.01 * w.std(0, keepdim=True) * torch.randn(vocab_size - old, w.shape[1])
        state[name] = torch.cat([w, rows.to(w.dtype)])
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    grown.load_state_dict(state)
    return grown


# ---- corruption --------------------------------------------------------------------------------------------

def _segments(rng: np.random.Generator, total: int, n: int) -> np.ndarray:
    """`total` split into `n` positive lengths, uniformly over such splits (T5's random_segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=n - 1, replace=False)) if n > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def corrupt(window: np.ndarray, sample: int, seed: int, vocab: UL2Vocab, mixture: dict[str, float]):
    """One training sequence from `window` (seq_len + 1 token ids): (mode, sequence ids, loss mask over the
    sequence: True where the token is a target). The draws depend on (seed, sample) only."""
    rng = np.random.default_rng([seed, _STREAM, sample])
    mode = MODES[rng.choice(len(MODES), p=[mixture[m] for m in MODES])]
    total = len(window)
    if mode == "C":
        return mode, window.copy(), np.ones(total, dtype=bool)
    if mode == "S":
        n = 1
        length = total - 2 * n - 2
        prefix = int(rng.integers(1, length))  # at least one token of input and one of target
        keep, noise = np.array([prefix]), np.array([length - prefix])
    else:
        mean, rate = DENOISERS[mode][int(rng.integers(len(DENOISERS[mode])))]
        # n spans take 2n + 2 extra tokens (a sentinel in the input and one in the targets each, the closing
        # sentinel, the mode token); choose n so that the source text's noise averages `mean` per span
        n = int(np.clip(round(rate * (total - 2) / (mean + 2 * rate)), 1, NUM_SENTINELS - 1))
        length = total - 2 * n - 2
        n_noise = int(np.clip(round(length * rate), n, length - n))
        noise, keep = _segments(rng, n_noise, n), _segments(rng, length - n_noise, n)
    source = window[:length]
    sent = vocab.sentinel_ids
    inputs, targets, pos = [vocab.mode_ids[mode]], [], 0
    for i, (k, z) in enumerate(zip(keep, noise, strict=True)):
        inputs += [*source[pos:pos + k], sent[i]]
        targets += [sent[i], *source[pos + k:pos + k + z]]
        pos += k + z
    targets.append(sent[n])
    seq = np.array(inputs + targets, dtype=np.int64)
    is_target = np.zeros(len(seq), dtype=bool)
    is_target[len(inputs) + 1:] = True  # the first target sentinel is context: the input's end is not predictable
    return mode, seq, is_target


def reconstruct(seq: np.ndarray, vocab: UL2Vocab) -> list[int]:
    """The source text of a corrupted sequence (its input with each sentinel replaced by its span): the inverse
    of `corrupt`, used by the tests and to check a sequence by eye."""
    ids = seq.tolist()
    if ids[0] not in vocab.mode_ids.values():
        return ids
    sent = {s: i for i, s in enumerate(vocab.sentinel_ids)}
    first = next(j for j in range(1, len(ids)) if ids[j] == vocab.sentinel_ids[0])
    second = next(j for j in range(first + 1, len(ids)) if ids[j] == vocab.sentinel_ids[0])
    spans: dict[int, list[int]] = {}
    current = None
    for t in ids[second:]:
        if t in sent:
            current = sent[t]
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in ids[1:second]:
        out += spans[sent[t]] if t in sent else [t]
    return out


def train_batch(data, first: int, batch_size: int, seq_len: int, seed: int, vocab: UL2Vocab,
                mixture: dict[str, float]):
    """Samples first .. first+batch_size-1: the dataset's windows (its seeded order), each corrupted by its
    denoiser; (inputs, labels) int64 tensors (B, seq_len), labels -100 except at targets."""
    x, y = data.train_batch(first, batch_size, seq_len, seed)
    windows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    xs, ys = np.empty_like(x.numpy()), np.empty_like(x.numpy())
    for r in range(batch_size):
        _, seq, is_target = corrupt(windows[r], first + r, seed, vocab, mixture)
        xs[r] = seq[:-1]
        ys[r] = np.where(is_target[1:], seq[1:], -100)
    return torch.from_numpy(xs), torch.from_numpy(ys)


def check_config(cfg) -> None:
    """One line for what --objective ul2 cannot do."""
    if not cfg.init_from:
        raise ValueError("objective ul2 continues training an existing decoder: pass --init MODEL")
    unsupported = [name for name, on in (("lora", cfg.lora), ("distill", cfg.distill)) if on]
    if unsupported:
        raise ValueError(f"objective ul2 trains the whole decoder (its embedding grows by the sentinels); "
                         f"{unsupported[0]} is not supported with it")
    if cfg.seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len={cfg.seq_len}: objective ul2 needs at least {MIN_SEQ_LEN} tokens per sequence")
    if str(cfg.data).endswith(".jsonl"):
        raise ValueError(f"{cfg.data}: objective ul2 reads a token dataset (from `slm data prepare`), not JSONL")
    parse_mixture(cfg.ul2_mixture)
