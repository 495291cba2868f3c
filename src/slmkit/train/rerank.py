"""Training a cross-encoder reranker (`slm rerank-train ENCODER --pairs pairs.jsonl -o DIR`): an encoder with a
score head (model/cross_encoder.py) learns to score a query's positive above its negatives.

Each query forms a group: its positive, then `negatives` passages (its own hard negatives from the pairs'
`negative` field first, then other queries' positives drawn at random). The loss is listwise: cross-entropy of
the group's scores with the positive as the class (a softmax over the group; the "localized contrastive
estimation" of Gao et al. 2021, the usual way rerankers are trained on retrieved negatives). `pairwise=True`
uses a margin ranking loss on (positive, negative) score pairs instead (RankNet-style, margin 1).

The head's dense layer starts from BERT's pretrained pooler when the source encoder has one (all-MiniLM-L6-v2
does), its output layer from N(0, 0.02); the head trains at `head_lr`, the encoder at `lr`. Accuracy on `dev`
pairs (the positive ranked first in its group, and MRR) is measured before and after and kept in slmkit.json.
The result loads in transformers as BertForSequenceClassification with one label, and as `load_reranker` /
`slm kb ... --reranker DIR`.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit.formats.encoder_dir import is_encoder_dir, load_encoder_dir
from slmkit.formats.reranker_dir import cross_encoder_from, read_pooler, save_reranker_dir
from slmkit.lm.reranker import Reranker
from slmkit.train.contrastive import read_pairs
from slmkit.train.perf import pick_device


def groups(pairs: list[dict], negatives: int, rng: random.Random) -> list[list[str]]:
    """[positive, negative, ...] per pair, 1 + `negatives` distinct passages: its own hard negatives first, then
    other pairs' positives at random."""
    distinct = len({p["positive"] for p in pairs} | {n for p in pairs for n in p["negatives"]})
    if distinct < 1 + negatives:
        raise ValueError(f"{distinct} distinct passages in the pairs, fewer than 1 + {negatives} negatives per "
                         "query; lower --negatives or add pairs")
    out = []
    for p in pairs:
        group = [p["positive"]]
        for n in p["negatives"]:
            if len(group) <= negatives and n not in group:
                group.append(n)
        while len(group) <= negatives:
            other = pairs[rng.randrange(len(pairs))]["positive"]
            if other not in group:
                group.append(other)
        out.append(group)
    return out


def group_loss(scores: torch.Tensor, pairwise: bool = False) -> torch.Tensor:
    """`scores` (queries, 1 + negatives), the positive in column 0: listwise softmax CE, or pairwise margin."""
    if pairwise:
        return F.relu(1.0 - (scores[:, :1] - scores[:, 1:])).mean()
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))


@torch.no_grad()
def group_accuracy(rr: Reranker, pairs: list[dict], negatives: int, seed: int) -> dict:
    """Share of dev queries whose positive scores above all its group's negatives, and the positive's MRR."""
    was_training = rr.model.training
    rr.model.eval()
    ranks = []
    for p, group in zip(pairs, groups(pairs, negatives, random.Random(seed)), strict=True):
        s = rr.score(p["query"], group)
        ranks.append(1 + sum(x > s[0] for x in s[1:]))
    rr.model.train(was_training)
    return {"accuracy": round(sum(r == 1 for r in ranks) / len(ranks), 4),
            "mrr": round(sum(1 / r for r in ranks) / len(ranks), 4), "pairs": len(pairs),
            "candidates": 1 + negatives}


def train_reranker(encoder: str, pairs: str | Path, out: str | Path, dev: str | Path | None = None,
                   negatives: int = 3, epochs: int = 1, batch_size: int = 8, lr: float = 2e-5,
                   head_lr: float = 1e-3, warmup: float = 0.1,
                   pairwise: bool = False, max_length: int = 256, max_steps: int | None = None, seed: int = 0,
                   device: str = "auto", log=print) -> dict:
    """Train a cross-encoder on `pairs` from `encoder` (an encoder directory, a pulled encoder such as minilm-l6-v2,
    or a reranker directory to train further); write the reranker directory `out`. Returns the run's summary."""
    from slmkit.formats.reranker_dir import is_reranker_dir, load_reranker_dir
    from slmkit.hub import resolve_model
    from slmkit.tokenizer import load_tokenizer
    if negatives < 1 or batch_size < 1 or max_length < 8:
        raise ValueError(f"--negatives {negatives}, --batch-size {batch_size}, --max-length {max_length}: need "
                         "at least 1 negative, 1 query a batch and 8 tokens")
    for name, value in (("epochs", epochs), ("lr", lr), ("head-lr", head_lr)):
        if not value > 0:
            raise ValueError(f"--{name} is {value}; it must be above 0")
    if not 0 <= warmup < 1:
        raise ValueError(f"--warmup {warmup}: a share of the steps, 0 <= warmup < 1")
    train_pairs = read_pairs(pairs, need_negative=True)
    dev_pairs = read_pairs(dev, need_negative=True) if dev is not None else None
    torch.manual_seed(seed)  # before the head is made: its initialisation is part of the run
    ref = resolve_model(encoder, kinds=("model", "embedding"))
    source = Path(ref.location)
    if ref.kind == "dir" and is_reranker_dir(source):
        model = load_reranker_dir(source).train()
    elif ref.kind == "dir" and is_encoder_dir(source):
        model = cross_encoder_from(load_encoder_dir(source), read_pooler(source))
    else:
        raise ValueError(f"{encoder}: not an encoder (a BERT/RoBERTa directory or minilm-l6-v2) or reranker "
                         "directory; a cross-encoder is trained from an encoder")
    rng = random.Random(seed)
    rr = Reranker(model, load_tokenizer(source), name=str(encoder), max_length=max_length)
    model.to(pick_device(device))
    before = group_accuracy(rr, dev_pairs, negatives, seed) if dev_pairs else None
    if before:
        log(f"dev before: {json.dumps(before)}")
    steps_per_epoch = math.ceil(len(train_pairs) / batch_size)
    total = min(max_steps or steps_per_epoch * epochs, steps_per_epoch * epochs)
    # The new score head starts from nothing: at the body's lr it barely moves in a few hundred steps (all scores
    # stay equal, the loss stays at ln(1 + negatives)), so it learns at its own, higher rate.
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                             {"params": model.head.parameters(), "lr": head_lr}], weight_decay=0.01)
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    while step < total:
        order = list(range(len(train_pairs)))
        rng.shuffle(order)
        all_groups = groups(train_pairs, negatives, rng)
        for i in range(0, len(order), batch_size):
            if step >= total:
                break
            rows = order[i:i + batch_size]
            encoded = [rr.encode(train_pairs[j]["query"], passage) for j in rows for passage in all_groups[j]]
            scores = model(*rr.batch(encoded)).view(len(rows), 1 + negatives)
            loss = group_loss(scores, pairwise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0 or step == total:
                log(f"step {step}/{total} loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                    f"({time.perf_counter() - start:.0f}s)")
    model.eval()
    after = group_accuracy(rr, dev_pairs, negatives, seed) if dev_pairs else None
    if after:
        log(f"dev after: {json.dumps(after)}")
    summary = {"steps": step, "first_loss": round(losses[0], 4),
               "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
               "seconds": round(time.perf_counter() - start, 1), "dev_before": before, "dev_after": after}
    config = {"encoder": str(encoder), "pairs": str(pairs), "dev": None if dev is None else str(dev),
              "negatives": negatives, "epochs": epochs, "batch_size": batch_size, "lr": lr, "head_lr": head_lr,
              "warmup": warmup,
              "loss": "pairwise" if pairwise else "listwise", "max_length": max_length, "seed": seed}
    save_reranker_dir(model.cpu(), out, tokenizer=rr.tokenizer, provenance={"reranker": {"config": config, **summary}})
    return {**summary, "out": str(out)}
