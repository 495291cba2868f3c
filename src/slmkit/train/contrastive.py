"""Contrastive fine-tuning of sentence embeddings (`slm embed-train ENCODER --pairs pairs.jsonl -o DIR`): an encoder
learns to put each query next to its positive and away from every other passage in the batch.

The loss is sentence-transformers' MultipleNegativesRankingLoss (InfoNCE, van den Oord et al. 2018; in-batch
negatives as in DPR, Karpukhin et al. 2020): for a batch of B pairs, the cosine similarities of each query to the
B positives (and to the B hard negatives, when the pairs carry a third field) times a scale (1 / temperature, 20
as in sentence-transformers) are logits, and the query's own positive is the class:

    loss = CE(scale * q @ [p; n]^T, arange(B))          (+ CE(scale * p @ q^T, arange(B)) with symmetric=True)

Pairs are `{"query", "positive"[, "negative"]}` JSONL (`slm kb pairs` writes them from a knowledge base). The
result is an encoder directory with sentence-transformers' files (mean pooling, max_seq_length), which
`slm embed`, `load_embedder` and `slm kb index --embedder DIR` use. Accuracy on `dev` pairs (recall@1 and MRR of
each dev query over all dev positives) is measured before and after and kept in slmkit.json.

This is a short loop of its own rather than train/loop.py, which trains next-token objectives on token windows:
here a batch is a set of texts, there is no sequence budget, and a whole run is a few hundred steps.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit.files import atomic_write_json, iter_jsonl
from slmkit.formats.encoder_dir import save_encoder_dir
from slmkit.lm.embedder import Embedder, load_embedder
from slmkit.model.encoder import mean_pool
from slmkit.train.perf import pick_device

# sentence-transformers' files beside the weights that say how to pool (copied from the source encoder)
ST_FILES = ("modules.json", "config_sentence_transformers.json", "1_Pooling", "2_Normalize")


def read_pairs(path: str | Path, need_negative: bool = False) -> list[dict]:
    """`{"query", "positive"[, "negative"]}` records; `negative` may be one string or a list of them (kept as
    `negatives`, a list). A bad line is `file:line: field ...`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such pairs file (JSONL of {{\"query\", \"positive\"}}; "
                                "`slm kb pairs KB -o FILE` writes one)")
    pairs = []
    for n, r in iter_jsonl(path):
        for field in ("query", "positive"):
            if not isinstance(r.get(field), str) or not r[field].strip():
                raise ValueError(f"{path}:{n}: \"{field}\" must be a non-empty string")
        neg = r.get("negative", r.get("negatives", []))
        neg = [neg] if isinstance(neg, str) else neg
        if not isinstance(neg, list) or not all(isinstance(x, str) and x.strip() for x in neg):
            raise ValueError(f"{path}:{n}: \"negative\" must be a non-empty string or a list of them")
        pairs.append({"query": r["query"], "positive": r["positive"], "negatives": neg})
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    if need_negative and not any(p["negatives"] for p in pairs) and len(pairs) < 2:
        raise ValueError(f"{path}: one pair and no negatives: nothing to rank against")
    return pairs


def _cut(ids: list[int], max_length: int) -> list[int]:
    return ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:]  # keep the closing special token


def embed_batch(emb: Embedder, texts: list[str], max_length: int) -> torch.Tensor:
    """Unit vectors of `texts` through `emb`'s model with gradients (Embedder.embed is inference only)."""
    ids = [_cut(emb.encode(t), max_length) for t in texts]
    device = next(emb.model.parameters()).device
    width = max(len(x) for x in ids)
    x = torch.full((len(ids), width), emb.model.cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for r, row in enumerate(ids):
        x[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    x, mask = x.to(device), mask.to(device)
    return mean_pool(emb.model(x, mask), mask)


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, scale: float = 20.0,
                     symmetric: bool = False) -> torch.Tensor:
    """MultipleNegativesRankingLoss of unit vectors: query i's class is positive i among all positives (and
    hard negatives `n`); `symmetric` adds the positives ranking the queries."""
    docs = p if n is None or not len(n) else torch.cat([p, n])
    labels = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(scale * q @ docs.T, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(scale * p @ q.T, labels)) / 2
    return loss


@torch.no_grad()
def pair_accuracy(emb: Embedder, pairs: list[dict]) -> dict:
    """recall@1, recall@5 and MRR of each query over every pair's positive (the dev set is the candidate pool)."""
    was_training = emb.model.training
    emb.model.eval()
    q = emb.embed([p["query"] for p in pairs])
    d = emb.embed([p["positive"] for p in pairs])
    emb.model.train(was_training)
    sims = q @ d.T
    ranks = (sims > sims.diagonal()[:, None]).sum(dim=1) + 1  # 1-based rank of the own positive
    return {"recall_at_1": round((ranks == 1).float().mean().item(), 4),
            "recall_at_5": round((ranks <= 5).float().mean().item(), 4),
            "mrr": round((1.0 / ranks.float()).mean().item(), 4), "pairs": len(pairs)}


def train_embedder(encoder: str, pairs: str | Path, out: str | Path, dev: str | Path | None = None,
                   epochs: int = 1, batch_size: int = 32, lr: float = 2e-5, warmup: float = 0.1,
                   scale: float = 20.0, symmetric: bool = False, max_length: int | None = None,
                   max_steps: int | None = None, seed: int = 0, device: str = "auto", log=print) -> dict:
    """Fine-tune the sentence encoder `encoder` (an encoder directory or pulled name) on `pairs`; write the encoder
    directory `out`. Returns the run's summary: steps, losses, seconds and dev accuracy before and after."""
    if batch_size < 2:
        raise ValueError(f"--batch-size {batch_size}: in-batch negatives need at least 2 pairs per batch")
    for name, value in (("epochs", epochs), ("lr", lr), ("scale", scale)):
        if not value > 0:
            raise ValueError(f"--{name} is {value}; it must be above 0")
    if not 0 <= warmup < 1:
        raise ValueError(f"--warmup {warmup}: a share of the steps, 0 <= warmup < 1")
    train_pairs = read_pairs(pairs)
    dev_pairs = read_pairs(dev) if dev is not None else None
    emb = load_embedder(encoder)
    if not isinstance(emb, Embedder):
        emb.close()
        raise ValueError(f"{encoder}: not an encoder (a BERT/RoBERTa directory or minilm-l6-v2); contrastive "
                         "training fine-tunes an encoder's sentence embeddings")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    emb.model.to(pick_device(device))
    length = min(max_length or emb.max_length, emb.max_length)
    before = pair_accuracy(emb, dev_pairs) if dev_pairs else None
    if before:
        log(f"dev before: {json.dumps(before)}")
    steps_per_epoch = math.ceil(len(train_pairs) / batch_size)
    total = min(max_steps or steps_per_epoch * epochs, steps_per_epoch * epochs)
    opt = torch.optim.AdamW(emb.model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(  # sentence-transformers' WarmupLinear
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    emb.model.train()
    losses, step, start = [], 0, time.perf_counter()
    while step < total:
        order = list(range(len(train_pairs)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = [train_pairs[j] for j in order[i:i + batch_size]]
            if len(batch) < 2 or step >= total:
                continue
            negatives = [rng.choice(p["negatives"]) for p in batch if p["negatives"]]
            q = embed_batch(emb, [p["query"] for p in batch], length)
            p = embed_batch(emb, [p["positive"] for p in batch], length)
            n = embed_batch(emb, negatives, length) if negatives else None
            loss = contrastive_loss(q, p, n, scale=scale, symmetric=symmetric)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(emb.model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0 or step == total:
                log(f"step {step}/{total} loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                    f"({time.perf_counter() - start:.0f}s)")
    emb.model.eval()
    after = pair_accuracy(emb, dev_pairs) if dev_pairs else None
    if after:
        log(f"dev after: {json.dumps(after)}")
    summary = {"steps": step, "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-10:]) /
               len(losses[-10:]), 4), "seconds": round(time.perf_counter() - start, 1), "dev_before": before,
               "dev_after": after}
    config = {"encoder": str(encoder), "pairs": str(pairs), "dev": None if dev is None else str(dev),
              "epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup": warmup, "scale": scale,
              "symmetric": symmetric, "max_length": length, "seed": seed}
    emb.model.cpu()
    save_encoder_dir(emb.model, out, tokenizer=emb.tokenizer,
                     provenance={"kind": "sentence-embedder", "contrastive": {"config": config, **summary}},
                     extra=lambda tmp: _sentence_transformers_files(encoder, tmp, emb.max_length))
    return {**summary, "out": str(out)}


def _sentence_transformers_files(encoder: str, tmp: Path, max_seq_length: int) -> None:
    """sentence-transformers' pooling files from the source (so the result loads there as it did), and
    sentence_bert_config.json with the source's max_seq_length (which `load_embedder` reads)."""
    from slmkit.hub import resolve_model
    ref = resolve_model(encoder, kinds=("model", "embedding"))
    source = Path(ref.location)
    for name in ST_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, tmp / name)
        elif (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    st = source / "sentence_bert_config.json"
    config = json.loads(st.read_text()) if st.exists() else {"do_lower_case": False}
    atomic_write_json(tmp / "sentence_bert_config.json", {**config, "max_seq_length": max_seq_length})
