"""Length-adaptive token pruning of an encoder classifier (Kim & Cho 2021, "Length-Adaptive Transformer: Train
Once with Length Drop, Use Anytime with Search"): train once so the encoder tolerates dropping tokens layer by
layer, then search for the per-layer length schedule that keeps the most accuracy within a FLOPs budget.

    slm classify prune runs/intent-minilm --data train.jsonl --dev dev.jsonl --budget 0.5 -o runs/intent-pruned

1. Stage 1, distillation under LengthDrop: the student (a copy of the fine-tuned classifier) learns from the
   frozen full-length teacher. Each step follows the sandwich rule: the student's full-length forward is
   trained on the teacher's soft predictions, and its smallest sub-model (every layer keeping (1 - p) of the
   tokens the layer before kept) and `sub_models` random ones (each layer keeping U(1 - p, 1)) learn from the
   student's own full-length predictions (in-place distillation); the losses are summed into one update.
2. Stage 2, adapting to pruning on the task: the same sandwich, the full-length forward now trained on the labels.
3. Search: an evolutionary search (the paper's: mutation and crossover of the best schedules so far) over
   schedules on the dev set, scoring each by dev accuracy and by FLOPs relative to full length (counted from
   the dev texts' token counts per layer, model/length_drop.py's `encoder_flops`). The Pareto front of
   (FLOPs, accuracy) is kept; the schedule chosen is the most accurate one within `budget`.

The classifier written records its schedule (`length_schedule`) and the front (`pareto`), and predicts pruned.
Its temperature is refitted on dev under that schedule, since pruning changes the logits' scale.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.classify.head import Classifier, features, fit_temperature, is_encoder
from slmkit.model.length_drop import encoder_flops, sample_keep, smallest_keep

GRID = 20  # schedules are searched on multiples of 1/GRID: short texts cannot tell finer fractions apart


def check_prunable(clf: Classifier, budget: float) -> None:
    if not 0 < budget <= 1:
        raise ValueError(f"--budget is a fraction of the full-length FLOPs in (0, 1], got {budget}")
    if not is_encoder(clf.model):
        raise ValueError("token pruning needs a classifier on an encoder (BERT / RoBERTa, e.g. minilm-l6-v2); "
                         "this one is on a decoder")
    if not clf.info.body_trained:
        raise ValueError("token pruning starts from a fine-tuned encoder: train the classifier with "
                         "`slm classify train ENCODER --train-body` first")


def lengthdrop_train(clf: Classifier, texts: list[str], labels: list[str], teacher: Classifier | None,
                     epochs: int, lr: float, drop_ratio: float, sub_models: int, batch_size: int, seed: int,
                     log=print, stage: str = "") -> None:
    """Sandwich-rule LengthDrop fine-tuning of `clf` in place: the full-length forward learns from `teacher`'s
    soft predictions (None: from the labels), the sub-models from the full-length forward's."""
    model, head, n_layers = clf.model, clf.head, clf.model.cfg.n_layers
    golds = torch.tensor([clf.info.labels.index(y) for y in labels])
    rng, order_rng = random.Random(seed), np.random.default_rng(seed)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr, weight_decay=1e-2)
    smallest = smallest_keep(n_layers, drop_ratio)

    def logits(batch: list[str], keep) -> torch.Tensor:
        return head(features(model, clf.tokenizer, batch, clf.info.prompt, len(batch), grad=True, keep=keep))

    for epoch in range(epochs):
        model.train()
        order, total = order_rng.permutation(len(texts)), 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [texts[i] for i in idx]
            full = logits(batch, None)
            if teacher is not None:
                with torch.no_grad():
                    target = torch.softmax(teacher.logits(batch), -1)
                loss = torch.sum(-target * F.log_softmax(full, -1), -1).mean()
            else:
                loss = F.cross_entropy(full, golds[idx])
            soft = torch.softmax(full.detach(), -1)
            for keep in [smallest] + [sample_keep(n_layers, drop_ratio, rng) for _ in range(sub_models)]:
                loss = loss + torch.sum(-soft * F.log_softmax(logits(batch, keep), -1), -1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log(f"{stage} epoch {epoch + 1}/{epochs}: sandwich loss {total / len(texts):.4f}")
    model.eval()


def schedule_flops(clf: Classifier, lengths: list[int], keep) -> float:
    """FLOPs of the encoder under `keep` over texts of these token counts, relative to full length."""
    cfg = clf.model.cfg
    return sum(encoder_flops(cfg, n, keep) for n in lengths) / sum(encoder_flops(cfg, n) for n in lengths)


def pareto_front(scored: dict[tuple, tuple[float, float]]) -> list[dict]:
    """The schedules no other beats on both FLOPs (lower) and accuracy (higher), cheapest first."""
    front, best = [], -1.0
    for keep, (flops, acc) in sorted(scored.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if acc > best:
            front.append({"keep": list(keep), "flops": round(flops, 4), "accuracy": round(acc, 4)})
            best = acc
    return front


def search_schedule(clf: Classifier, texts: list[str], labels: list[str], budget: float, generations: int = 10,
                    population: int = 16, mutation: float = 0.5, seed: int = 0, log=print
                    ) -> tuple[tuple, dict[tuple, tuple[float, float]]]:
    """Evolutionary search over length schedules scored on (texts, labels): (the most accurate schedule whose
    relative FLOPs are within `budget`, every schedule scored: {keep: (flops, accuracy)})."""
    from slmkit.lm.embedder import Embedder
    n_layers = clf.model.cfg.n_layers
    embedder = Embedder(clf.model, clf.tokenizer)
    lengths = [len(embedder.encode(clf.info.prompt.format(text=t))) for t in texts]
    golds = np.array([clf.info.labels.index(y) for y in labels])
    rng = random.Random(seed)
    scored: dict[tuple, tuple[float, float]] = {}

    def snap(keep) -> tuple:  # onto the grid, non-increasing, at least one step
        out, current = [], GRID
        for k in keep:
            current = min(current, max(1, round(k * GRID)))
            out.append(current / GRID)
        return tuple(out)

    def score(keep: tuple) -> None:
        if keep not in scored:
            with torch.no_grad():
                predicted = clf.head(features(clf.model, clf.tokenizer, texts, clf.info.prompt,
                                              keep=list(keep))).argmax(-1).numpy()
            scored[keep] = (schedule_flops(clf, lengths, keep), float((predicted == golds).mean()))

    def fitness(keep: tuple) -> tuple[bool, float, float]:  # within budget first, then accuracy, then cheaper
        flops, acc = scored[keep]
        return flops <= budget, acc, -flops

    # the first generation: full length, uniform per-layer ratios across the range, and LengthDrop's draws
    for r in np.linspace(1.0, 0.1, 19):  # down to very cheap ones, so any budget the first layer allows is met
        score(snap([r ** (i + 1) for i in range(n_layers)]))
    for p in (0.1, 0.2, 0.3, 0.5):
        for _ in range(population // 4):
            score(snap(sample_keep(n_layers, p, rng)))
    for generation in range(generations):
        front = [tuple(f["keep"]) for f in pareto_front(scored)]
        parents = sorted(set(front) | set(sorted(scored, key=fitness, reverse=True)[:population // 2]),
                         key=fitness, reverse=True)[:population]
        for _ in range(population // 2):  # mutation: re-draw some layers' step from the layer before
            child = list(rng.choice(parents))
            for i in range(n_layers):
                if rng.random() < mutation / n_layers * 2:
                    child[i] = (child[i - 1] if i else 1.0) * rng.uniform(0.5, 1.0)
            score(snap(child))
        for _ in range(population // 2):  # crossover: each layer's fraction from one parent or the other
            a, b = rng.choice(parents), rng.choice(parents)
            score(snap([x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]))
        best = max(scored, key=fitness)
        log(f"search generation {generation + 1}/{generations}: {len(scored)} schedules scored; best within "
            f"budget {budget}: accuracy {scored[best][1]:.3f} at {scored[best][0]:.3f} of the FLOPs")
    best = max(scored, key=fitness)
    if scored[best][0] > budget:
        raise ValueError(f"no schedule found within --budget {budget} of the FLOPs (the cheapest scored: "
                         f"{min(f for f, _ in scored.values()):.3f}); raise the budget")
    return best, scored


def prune_classifier(clf: Classifier, texts: list[str], labels: list[str], dev_texts: list[str],
                     dev_labels: list[str], budget: float = 0.5, epochs: tuple[int, int] = (3, 3),
                     lr: float = 3e-5, drop_ratio: float = 0.2, sub_models: int = 2, batch_size: int = 16,
                     generations: int = 10, population: int = 16, seed: int = 0, log=print) -> Classifier:
    """A length-adaptive copy of the fine-tuned encoder classifier `clf`: LengthDrop distillation from `clf`
    (stage 1, `epochs[0]`), LengthDrop on the labels (stage 2, `epochs[1]`), then the schedule search on dev
    within `budget` (the fraction of full-length FLOPs); its temperature refitted on dev."""
    check_prunable(clf, budget)
    for name, these in (("training", labels), ("dev", dev_labels)):
        unknown = sorted({y for y in these if y not in clf.info.labels})
        if unknown:
            raise ValueError(f"{name} label(s) {unknown} are not the classifier's {clf.info.labels}")
    if not 0 < drop_ratio < 1:
        raise ValueError(f"--drop-ratio must be in (0, 1), got {drop_ratio}")
    torch.manual_seed(seed)
    golds = torch.tensor([clf.info.labels.index(y) for y in dev_labels])
    full_acc = float((clf.logits(dev_texts).argmax(-1) == golds).float().mean())
    log(f"teacher (full length): dev accuracy {full_acc:.3f}")
    student = Classifier(copy.deepcopy(clf.model), clf.tokenizer, copy.deepcopy(clf.head),
                         replace(clf.info, metrics={}, length_schedule=None, pareto=[]))
    lengthdrop_train(student, texts, labels, clf, epochs[0], lr, drop_ratio, sub_models, batch_size, seed, log,
                     stage="stage 1 (distillation)")
    lengthdrop_train(student, texts, labels, None, epochs[1], lr, drop_ratio, sub_models, batch_size, seed + 1,
                     log, stage="stage 2 (task)")
    keep, scored = search_schedule(student, dev_texts, dev_labels, budget, generations, population, seed=seed,
                                   log=log)
    student_full = scored.get(tuple([1.0] * clf.model.cfg.n_layers), (1.0, float("nan")))[1]
    student.info.length_schedule = list(keep)
    student.info.pareto = pareto_front(scored)
    logits = student.logits(dev_texts)
    student.info.temperature = fit_temperature(logits, golds)
    flops, acc = scored[keep]
    student.info.metrics = {"dev_accuracy": acc, "dev_flops": flops, "budget": budget,
                            "teacher_dev_accuracy": full_acc, "student_full_length_dev_accuracy": student_full,
                            "temperature": student.info.temperature}
    log(f"schedule {list(keep)}: dev accuracy {acc:.3f} at {flops:.3f} of the FLOPs "
        f"(teacher {full_acc:.3f} at full length)")
    return student
