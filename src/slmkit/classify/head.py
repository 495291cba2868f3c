"""A classifier on a language model: a summary of its final hidden states -> a linear head, with calibrated
confidence. The model is a decoder (the last token's hidden state) or an encoder (the mean of the tokens').

    slm classify train MODEL --data train.jsonl --dev dev.jsonl -o DIR    ({"text", "label"} records)
    slm classify predict DIR --data new.jsonl                             (label + confidence per line)
    slm classify eval DIR --data dev.jsonl                                (accuracy, macro-F1, ECE)

The decoder reads `prompt` (default "{text}") and the hidden state at its last token summarises it (a causal
model's only position that has seen the whole text). By default the decoder stays frozen and only the head is
trained, on features computed once: with a handful of labelled examples that is fast on a CPU and hard to
overfit; `train_body=True` fine-tunes everything. Confidence is calibrated by temperature scaling on dev data
(Guo et al., 2017): one scalar T fitted to minimise the dev negative log-likelihood, so that "90% sure" is right
about 90% of the time (reported as expected calibration error before and after). Cascades and SuperICL rely on
these confidences being honest.

On an encoder (a BERT / RoBERTa directory, or a pulled one: `minilm-l6-v2`) the features are the mean-pooled,
L2-normalised final hidden states over the tokenizer's own [CLS] ... [SEP], exactly the sentence embedding
lm/embedder.py computes: every token has seen the whole text, so the mean summarises it. An encoder classifier
may also carry a length schedule (classify/prune.py, `slm classify prune`): its encoder then drops the least
significant tokens layer by layer at prediction time.

A saved classifier is a directory: classifier.json (labels, prompt, temperature, base model), head.safetensors,
and model/ when the decoder or encoder itself was trained (an HF model directory either way).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slmkit.files import atomic_dir, iter_jsonl


@dataclass
class ClassifierInfo:
    labels: list[str]
    base: str  # the decoder's or encoder's model directory ("model": the one saved inside the classifier)
    prompt: str = "{text}"
    temperature: float = 1.0
    body_trained: bool = False
    metrics: dict = field(default_factory=dict)
    length_schedule: list[float] | None = None  # encoder only: fraction of tokens kept after each layer
    pareto: list[dict] = field(default_factory=list)  # the prune search's front: {"keep", "flops", "accuracy"}


class Classifier:
    def __init__(self, model, tokenizer, head: torch.nn.Linear, info: ClassifierInfo):
        self.model, self.tokenizer, self.head, self.info = model.eval(), tokenizer, head, info

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        feats = features(self.model, self.tokenizer, texts, self.info.prompt, batch_size,
                         keep=self.info.length_schedule)
        return self.head(feats)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, labels) calibrated probabilities."""
        return torch.softmax(self.logits(texts) / self.info.temperature, dim=-1).numpy()

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        probs = self.predict_proba(texts)
        return [(self.info.labels[int(p.argmax())], float(p.max())) for p in probs]

    def save(self, directory: str | Path) -> None:
        from slmkit.formats.encoder_dir import save_encoder_dir
        from slmkit.formats.hf_dir import save_model_dir
        with atomic_dir(directory) as tmp:
            info = self.info
            if info.body_trained:
                save = save_encoder_dir if is_encoder(self.model) else save_model_dir
                save(self.model, tmp / "model", tokenizer=self.tokenizer)
                info = ClassifierInfo(**{**asdict(info), "base": "model"})
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(tmp / "head.safetensors"))
            (tmp / "classifier.json").write_text(json.dumps(asdict(info), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Classifier:
        directory = Path(directory)
        path = directory / "classifier.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a classifier directory (no classifier.json); "
                                    "make one with `slm classify train`")
        info = ClassifierInfo(**json.loads(path.read_text()))
        base = directory / info.base if info.base == "model" else Path(info.base)
        model, tokenizer = load_body(base)
        head = torch.nn.Linear(model.cfg.dim, len(info.labels))
        head.load_state_dict(load_file(str(directory / "head.safetensors")))
        return cls(model, tokenizer, head, info)


def is_encoder(model) -> bool:
    from slmkit.model.encoder import Encoder
    return isinstance(model, Encoder)


def load_body(path: str | Path):
    """(model, tokenizer) of a model directory: an encoder (model/encoder.py) or a decoder."""
    from slmkit.formats.encoder_dir import is_encoder_dir, load_encoder_dir
    from slmkit.formats.hf_dir import load_model_dir
    from slmkit.tokenizer import load_tokenizer
    model = load_encoder_dir(path) if is_encoder_dir(path) else load_model_dir(path)
    return model, load_tokenizer(Path(path))


def features(model, tokenizer, texts: list[str], prompt: str = "{text}", batch_size: int = 32,
             grad: bool = False, keep: list[float] | None = None) -> torch.Tensor:
    """(N, dim) features of each prompt-formatted text: a decoder's final hidden state at the last token
    (right-padded batches), or an encoder's mean-pooled final hidden states (lm/embedder.py), under the length
    schedule `keep` when given."""
    if is_encoder(model):
        from slmkit.lm.embedder import Embedder
        training = model.training
        embedder = Embedder(model, tokenizer, batch_size=batch_size)
        if training:
            model.train()  # Embedder sets eval mode; while training, dropout stays on
        with torch.set_grad_enabled(grad):
            return embedder.pool([prompt.format(text=t) for t in texts], keep=keep)
    if keep is not None:
        raise ValueError("a length schedule needs an encoder classifier; this one is on a decoder")
    encoded = [tokenizer.encode(prompt.format(text=t), add_bos=tokenizer.add_bos)[-model.cfg.max_seq_len:]
               for t in texts]
    out = []
    device = next(model.parameters()).device
    with torch.set_grad_enabled(grad):
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for row, ids in enumerate(batch):
                x[row, :len(ids)] = torch.tensor(ids)
            h = model.hidden_states(x.to(device))
            last = torch.tensor([len(ids) - 1 for ids in batch], device=device)
            out.append(h[torch.arange(len(batch), device=device), last].float())
    return torch.cat(out)


def train_classifier(model_dir: str | Path, texts: list[str], labels: list[str], label_set: list[str] | None = None,
                     *, soft_targets: np.ndarray | None = None, dev: tuple[list[str], list[str]] | None = None,
                     prompt: str = "{text}", train_body: bool = False, epochs: int = 200, lr: float | None = None,
                     weight_decay: float = 1e-2, seed: int = 0, log=print) -> Classifier:
    """Train a head (and optionally the decoder or encoder under it) on labelled texts; calibrate on `dev`
    (texts, labels). `model_dir` is a decoder or encoder directory (see `features` for what each gives).

    `soft_targets` (N, labels) trains on probability distributions instead of hard labels (distilling e.g.
    PET's soft labels on unlabelled text into the classifier).
    """
    torch.manual_seed(seed)
    label_set = list(label_set or sorted(set(labels)))
    unknown = sorted(set(labels) - set(label_set))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label set {label_set}")
    model, tokenizer = load_body(model_dir)
    targets = (torch.tensor(soft_targets, dtype=torch.float32) if soft_targets is not None else
               F.one_hot(torch.tensor([label_set.index(y) for y in labels]), len(label_set)).float())
    head = torch.nn.Linear(model.cfg.dim, len(label_set))
    info = ClassifierInfo(labels=label_set, base=str(Path(model_dir).resolve()), prompt=prompt,
                          body_trained=train_body)
    # The head is first fitted on the frozen model's features; with train_body everything is then fine-tuned
    # from there (linear probing, then fine-tuning: Kumar et al., 2022), so the small body learning rate does
    # not have to drag a random head into place, and the features the pretrained body had are not wrecked early.
    model.eval()
    fit_head(head, features(model, tokenizer, texts, prompt), targets, 200 if train_body else epochs,
             lr=1e-2 if train_body else lr or 1e-2, weight_decay=weight_decay)
    if train_body:
        model.train()  # dropout on while fine-tuning
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=lr or 2e-5, weight_decay=weight_decay)
        rng = np.random.default_rng(seed)
        batch = 8
        for epoch in range(epochs):
            order, total = rng.permutation(len(texts)), 0.0
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                feats = features(model, tokenizer, [texts[i] for i in idx], prompt, grad=True)
                loss = torch.sum(-targets[idx] * F.log_softmax(head(feats), -1), -1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            log(f"epoch {epoch + 1}/{epochs}: training loss {total / len(texts):.4f}")
        model.eval()
    classifier = Classifier(model, tokenizer, head, info)
    if dev is not None:
        dev_texts, dev_labels = dev
        logits = classifier.logits(dev_texts)
        golds = np.array([label_set.index(y) for y in dev_labels])
        before = expected_calibration_error(torch.softmax(logits, -1).numpy(), golds)
        info.temperature = fit_temperature(logits, torch.tensor(golds))
        after = expected_calibration_error(torch.softmax(logits / info.temperature, -1).numpy(), golds)
        info.metrics = {"dev_accuracy": float((logits.argmax(-1).numpy() == golds).mean()),
                        "dev_ece_before": before, "dev_ece_after": after, "temperature": info.temperature}
        log(f"dev accuracy {info.metrics['dev_accuracy']:.3f}; temperature {info.temperature:.3f}: "
            f"ECE {before:.3f} -> {after:.3f}")
    return classifier


def fit_head(head: torch.nn.Linear, feats: torch.Tensor, targets: torch.Tensor, epochs: int, lr: float,
             weight_decay: float) -> None:
    """Full-batch AdamW on fixed features against (soft) targets: cross-entropy with probability targets."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = torch.sum(-targets * F.log_softmax(head(feats), -1), -1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def fit_temperature(logits: torch.Tensor, golds: torch.Tensor) -> float:
    """The T > 0 minimising the negative log-likelihood of softmax(logits / T) (a 1-D convex search over log T)."""
    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), golds))
    lo, hi = math.log(0.05), math.log(20.0)
    for _ in range(60):  # golden-section search
        a, b = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def expected_calibration_error(probs: np.ndarray, golds: np.ndarray, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by the bins' sizes."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = predicted == golds
    total = 0.0
    for lo in np.linspace(0, 1, bins, endpoint=False):
        in_bin = (confidence > lo) & (confidence <= lo + 1 / bins)
        if in_bin.any():
            total += in_bin.mean() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(total)


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list, list]:
    """(texts, labels) of a JSONL file; a bad line is reported as file:line."""
    texts, labels = [], []
    for n, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path}:{n}: needs a string field {text_field!r}")
        texts.append(record[text_field])
        labels.append(str(record[label_field]) if label_field in record else None)
    return texts, labels
