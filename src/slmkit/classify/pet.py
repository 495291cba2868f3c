"""PET, pattern-exploiting training (Schick & Schütze, 2021): classification as a cloze the LM already knows.

A *pattern* turns a text into a prompt that ends where the answer goes ("{text}\nThe user wants to:"), a
*verbaliser* maps each label to a word (" music"). The label score is the LM's log-probability of the label's
word at that slot, so an LM classifies with no training at all (zero-shot), and a handful of labelled examples
fine-tune it with cross-entropy over the labels' words at the slot — the LM head is reused instead of a new
classifier learned from scratch, which is why PET needs so few examples. Several patterns are ensembled by
averaging their label log-probabilities, and the ensemble's soft labels on unlabelled text can be distilled
into a small classifier (`classify.head.train_classifier(soft_targets=...)`), as in PET's final step.

For a decoder the slot is the next token after the pattern, so patterns end at the slot, and a verbaliser is
scored by its first token: every label's word must start with a different token (checked). This version trains
one model on all patterns together (PET trains one per pattern; iPET's rounds are not implemented).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PET:
    patterns: list[str]  # str.format templates over {text}, each ending at the slot
    verbalizers: dict[str, str]  # label -> word(s) written at the slot (with its leading space)

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizers)

    def slot_tokens(self, tokenizer) -> list[int]:
        """The first token of each label's word; labels must differ in it."""
        first = [tokenizer.encode(word)[0] for word in self.verbalizers.values()]
        if len(set(first)) != len(first):
            clash = [label for label, t in zip(self.labels, first, strict=True) if first.count(t) > 1]
            raise ValueError(f"verbalisers of {clash} start with the same token; choose words that differ in "
                             "their first token (e.g. single words)")
        return first


def slot_logprobs(model, tokenizer, pet: PET, texts: list[str], pattern: str, batch_size: int = 16,
                  grad: bool = False) -> torch.Tensor:
    """(N, labels) log-probabilities over the labels' words at the slot (normalised over the labels)."""
    from slmkit.classify.head import features
    slot = torch.tensor(pet.slot_tokens(tokenizer))
    hidden = features(model, tokenizer, texts, pattern, batch_size, grad=grad)  # the slot's hidden state
    with torch.set_grad_enabled(grad):
        logits = F.linear(hidden, model.lm_head.weight[slot.to(hidden.device)].float())  # the labels' words only
        return F.log_softmax(logits, dim=-1)


def predict(model, tokenizer, pet: PET, texts: list[str]) -> np.ndarray:
    """(N, labels) ensemble probabilities: the mean over patterns of each pattern's label log-probabilities."""
    model.eval()
    logps = torch.stack([slot_logprobs(model, tokenizer, pet, texts, p) for p in pet.patterns])
    return torch.softmax(logps.mean(0), dim=-1).numpy()


def train_pet(model, tokenizer, pet: PET, texts: list[str], labels: list[str], epochs: int = 6, lr: float = 1e-5,
              batch_size: int = 8, seed: int = 0, log=print):
    """Fine-tune `model` (in place) on labelled texts: cross-entropy over the labels' words, every pattern."""
    targets = torch.tensor([pet.labels.index(y) for y in labels])
    examples = [(i, p) for i in range(len(texts)) for p in pet.patterns]
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(examples))
        total = 0.0
        for start in range(0, len(order), batch_size):
            chunk = [examples[j] for j in order[start:start + batch_size]]
            loss = 0.0
            for pattern in {p for _, p in chunk}:  # one forward per pattern within the batch
                idx = [i for i, p in chunk if p == pattern]
                logp = slot_logprobs(model, tokenizer, pet, [texts[i] for i in idx], pattern, grad=True)
                loss = loss + F.nll_loss(logp, targets[idx], reduction="sum")
            loss = loss / len(chunk)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(chunk)
        log(f"PET epoch {epoch + 1}/{epochs}: loss {total / len(examples):.4f}")
    model.eval()
    return model


def pet_classifier(model_dir, pet: PET, texts: list[str], labels: list[str], unlabelled: list[str] | None = None,
                   dev: tuple[list[str], list[str]] | None = None, epochs: int = 6, lr: float = 1e-5, seed: int = 0,
                   log=print):
    """PET end to end: fine-tune on the labelled texts, label `unlabelled` (and the labelled texts) softly with
    the pattern ensemble, and distil that into a head on the PET-tuned decoder (an `classify.head.Classifier`,
    calibrated on `dev`)."""
    from slmkit.formats.hf_dir import load_model_dir
    from slmkit.tokenizer import load_tokenizer
    torch.manual_seed(seed)
    model, tokenizer = load_model_dir(model_dir), load_tokenizer(model_dir)
    train_pet(model, tokenizer, pet, texts, labels, epochs=epochs, lr=lr, seed=seed, log=log)
    return distil_classifier(model, tokenizer, pet, list(texts) + list(unlabelled or []), str(model_dir), dev)


def distil_classifier(model, tokenizer, pet: PET, pool: list[str], base: str,
                      dev: tuple[list[str], list[str]] | None = None):
    """A head on the (PET-tuned) decoder trained on the pattern ensemble's soft labels for `pool`."""
    from slmkit.classify.head import Classifier, ClassifierInfo, features, fit_temperature
    soft = predict(model, tokenizer, pet, pool)
    # The head starts from the LM's own slot logits (hidden state · word embedding), so before any distillation
    # step the classifier already predicts exactly what pattern 1 does; the soft labels then tune it.
    slot = pet.slot_tokens(tokenizer)
    head = torch.nn.Linear(model.cfg.dim, len(pet.labels))
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight[slot].float())
        head.bias.zero_()
    info = ClassifierInfo(labels=pet.labels, base=base, prompt=pet.patterns[0], body_trained=True)
    feats = features(model, tokenizer, pool, info.prompt)
    targets = torch.tensor(soft, dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(100):
        loss = torch.sum(-targets * F.log_softmax(head(feats), -1), -1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    classifier = Classifier(model, tokenizer, head, info)
    if dev is not None:
        logits = classifier.logits(dev[0])
        golds = torch.tensor([pet.labels.index(y) for y in dev[1]])
        info.temperature = fit_temperature(logits, golds)
        info.metrics = {"dev_accuracy": float((logits.argmax(-1) == golds).float().mean()),
                        "temperature": info.temperature}
    return classifier
