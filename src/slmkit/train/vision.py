"""Training a LLaVA-style model: the two models LLaVA starts from, made here, then LLaVA's two stages.

    text      the decoder alone learns the language of the captions and answers (next-token loss on the
              chat-formatted text, no image): a stand-in for the pretrained LM LLaVA starts from
    clip      the ViT learns contrastively against the captions (CLIP's loss, with a small caption encoder and
              two projection heads that are thrown away afterwards): a stand-in for LLaVA's pretrained CLIP
    align     LLaVA's stage 1: image -> caption with the decoder and the ViT frozen; the projector alone learns
    instruct  LLaVA's stage 2: image + question -> answer; the projector and the decoder learn, the ViT is frozen

Why a contrastive stage rather than training the ViT in `align`: measured here, a ViT trained through the frozen
decoder (the caption loss its only signal) did not learn (the caption loss stayed flat, and the ViT's features came
out of it no better than random for stage 2), while CLIP's loss gives every image a direct signal.

Each stage is one short loop (`train_stage`): AdamW, linear warmup then a cosine over the stage's time budget
(or its steps), loss on the assistant's tokens only, a checkpoint (safetensors: weights, AdamW's state, the RNG)
every `save_every_s` seconds that a rerun resumes from. Batches are a function of (seed, step), so a resumed stage
sees the batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slmkit.files import atomic_dir, atomic_write_json, recover_dir
from slmkit.model.llama import Transformer
from slmkit.model.vit import VisionTower, splice
from slmkit.train.checkpoint import _optimizer_tensors, read_optimizer_state, restore_optimizer

IGNORE = -100
CAPTION_PROMPT = "Describe the image."
STAGES = ("text", "clip", "align", "instruct")


@dataclass
class Turn:
    """One user turn and the assistant's reply: token ids, labels (IGNORE but on the reply) and its image."""

    ids: list[int]
    labels: list[int]
    image: np.ndarray | None = None


def encode_turn(tokenizer, user: str, reply: str, image: np.ndarray | None = None) -> Turn:
    """The turn as inference sees it (the chat template's generation prompt, with bos when the tokenizer adds one),
    then the reply and the end-of-turn marker, which is where decoding stops."""
    from slmkit.chat import TURN_END
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_bos=tokenizer.add_bos)
    answer = tokenizer.encode(reply) + tokenizer.encode(TURN_END)
    return Turn(ids + answer, [IGNORE] * len(ids) + answer, image)


def encode_turns(tokenizer, turns: list[tuple[str, str, np.ndarray | None]]) -> list[Turn]:
    """`encode_turn` of many (user, reply, image) triples; a pair of texts seen before is not encoded again (the
    generated data repeats its few questions and answers thousands of times)."""
    seen: dict[tuple[str, str], Turn] = {}
    out = []
    for user, reply, image in turns:
        t = seen.get((user, reply))
        if t is None:
            t = seen[(user, reply)] = encode_turn(tokenizer, user, reply)
        out.append(Turn(t.ids, t.labels, image))
    return out


def collate(turns: list[Turn], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and labels: the prompts' shared beginning keeps the image token at one place."""
    width = max(len(t.ids) for t in turns)
    ids = torch.full((len(turns), width), pad_id, dtype=torch.long)
    labels = torch.full((len(turns), width), IGNORE, dtype=torch.long)
    for i, t in enumerate(turns):
        ids[i, :len(t.ids)] = torch.tensor(t.ids)
        labels[i, :len(t.labels)] = torch.tensor(t.labels)
    return ids, labels


def turn_loss(decoder: Transformer, tower: VisionTower | None, turns: list[Turn], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the replies of a batch of turns (all with an image, or none)."""
    ids, labels = collate(turns, pad_id)
    device = decoder.embed_tokens.weight.device
    ids, labels = ids.to(device), labels.to(device)
    image_embeds = None
    if turns[0].image is not None:
        image_embeds = tower(tower.pixels(np.stack([t.image for t in turns])))
    image_id = tower.cfg.image_token_id if tower is not None else -1
    x, idx = splice(decoder, ids, image_embeds, image_id)
    spliced = torch.where(idx >= 0, labels.gather(1, idx.clamp(min=0)), torch.full_like(idx, IGNORE))
    logits = decoder(ids, embeds=x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), spliced[:, 1:].flatten(), ignore_index=IGNORE)


@dataclass
class StageConfig:
    name: str  # one of STAGES
    minutes: float | None = None  # the budget (time) ...
    max_steps: int | None = None  # ... or a number of steps (whichever comes first)
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    save_every_s: float = 60.0
    log_every: int = 25


class CaptionEncoder(torch.nn.Module):
    """CLIP's two heads for the `clip` stage: a caption encoder (token + position embeddings, averaged: the
    generated captions are templates, so where a word stands carries their meaning) and the image's projection
    (the ViT's patch features, averaged). Both end in the same space; only the ViT is kept afterwards."""

    def __init__(self, vocab_size: int, vit_dim: int, dim: int = 128, max_len: int = 64):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab_size, dim)
        self.positions = torch.nn.Embedding(max_len, dim)
        self.text_proj = torch.nn.Linear(dim, dim)
        self.image_proj = torch.nn.Linear(vit_dim, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).clamp(max=self.positions.num_embeddings - 1)
        x = (self.tokens(ids) + self.positions(pos)) * mask[..., None]
        return F.normalize(self.text_proj(x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)), dim=-1)

    def image(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(features.mean(1)), dim=-1)


def clip_loss(tower: VisionTower, heads: CaptionEncoder, turns: list[Turn], pad_id: int) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a batch of (image, caption) turns; images with the same caption are
    all right answers (the generated captions repeat), so the targets spread over them."""
    caps = [t.ids[next(i for i, x in enumerate(t.labels) if x != IGNORE):] for t in turns]
    width = max(len(c) for c in caps)
    device = heads.tokens.weight.device
    ids = torch.full((len(caps), width), pad_id, dtype=torch.long)
    for i, c in enumerate(caps):
        ids[i, :len(c)] = torch.tensor(c)
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in caps])
    txt = heads.text(ids.to(device), mask.to(device))
    img = heads.image(tower.vit(tower.pixels(np.stack([t.image for t in turns]))))
    logits = heads.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
    keys = [tuple(c) for c in caps]
    same = torch.tensor([[float(a == b) for b in keys] for a in keys], device=device)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def trainable(stage: str, decoder: Transformer, tower: VisionTower) -> list[torch.nn.Parameter]:
    """Freeze what the stage keeps fixed; return what it trains (of the decoder and the tower)."""
    train_decoder = stage in ("text", "instruct")
    train_vit = stage == "clip"
    train_projector = stage in ("align", "instruct")
    for p in decoder.parameters():
        p.requires_grad_(train_decoder)
    for p in tower.vit.parameters():
        p.requires_grad_(train_vit)
    for p in tower.projector.parameters():
        p.requires_grad_(train_projector)
    return [p for m in (decoder, tower) for p in m.parameters() if p.requires_grad]


def _lr(cfg: StageConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, max(0.0, progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _save(ckpt: Path, decoder: Transformer, tower: VisionTower, opt, state: dict, heads=None) -> None:
    with atomic_dir(ckpt) as tmp:
        weights = {f"decoder.{k}": v.detach().contiguous() for k, v in decoder.state_dict().items()
                   if not (decoder.cfg.tie_embeddings and k == "lm_head.weight")}
        weights.update({f"tower.{k}": v.detach().contiguous() for k, v in tower.state_dict().items()})
        if heads is not None:
            weights.update({f"heads.{k}": v.detach().contiguous() for k, v in heads.state_dict().items()})
        save_file(weights, str(tmp / "weights.safetensors"))
        tensors, scalars = _optimizer_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "optimizer_scalars": scalars})


def load_weights(ckpt: Path, decoder: Transformer, tower: VisionTower, heads=None) -> None:
    """A stage checkpoint's weights into the decoder and the tower (and CLIP's heads)."""
    weights = load_file(str(ckpt / "weights.safetensors"))
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in weights.items() if k.startswith("decoder.")},
                            strict=not decoder.cfg.tie_embeddings)
    tower.load_state_dict({k.removeprefix("tower."): v for k, v in weights.items() if k.startswith("tower.")})
    if heads is not None:
        heads.load_state_dict({k.removeprefix("heads."): v for k, v in weights.items() if k.startswith("heads.")})


def _load(ckpt: Path, decoder: Transformer, tower: VisionTower, opt, heads=None) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    load_weights(ckpt, decoder, tower, heads)
    restore_optimizer(opt, read_optimizer_state(ckpt, state))
    return state


def train_stage(cfg: StageConfig, decoder: Transformer, tower: VisionTower, turns: list[Turn], pad_id: int,
                ckpt: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the stage's parameters on `turns` (in place) until its budget is spent; returns the stage's summary.

    With `ckpt`, a checkpoint is saved there every cfg.save_every_s seconds and at the end, and a checkpoint found
    there is resumed from (model, AdamW, RNG, step and elapsed time)."""
    if cfg.name not in STAGES:
        raise ValueError(f"unknown stage {cfg.name!r}; choose one of {', '.join(STAGES)}")
    if cfg.minutes is None and cfg.max_steps is None:
        raise ValueError(f"stage {cfg.name}: give a time budget (minutes) or max_steps")
    if not turns:
        raise ValueError(f"stage {cfg.name}: no training examples")
    params = trainable(cfg.name, decoder, tower)
    heads = None
    if cfg.name == "clip":
        torch.manual_seed(cfg.seed)
        heads = CaptionEncoder(decoder.cfg.vocab_size, tower.cfg.dim).to(decoder.embed_tokens.weight.device)
        params += list(heads.parameters())
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    state = {"step": 0, "elapsed": 0.0, "losses": []}
    if ckpt is not None:
        recover_dir(ckpt)
        if (ckpt / "state.json").exists():
            state = _load(ckpt, decoder, tower, opt, heads)
            log(f"  resuming stage {cfg.name} at step {state['step']} ({state['elapsed']:.0f} s done)")
    decoder.train()
    tower.train()
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else None
    start, last_save = time.perf_counter() - state["elapsed"], time.perf_counter()
    window = []

    def done() -> bool:
        if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
            return True
        return budget_s is not None and state["elapsed"] >= budget_s

    while not done():
        step = state["step"]
        if budget_s is not None:
            progress = state["elapsed"] / budget_s
        else:
            progress = step / cfg.max_steps
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step, progress)
        rng = random.Random(f"{cfg.seed}-{cfg.name}-{step}")  # the batch is a function of (seed, stage, step)
        batch = [turns[rng.randrange(len(turns))] for _ in range(cfg.batch_size)]
        loss = (clip_loss(tower, heads, batch, pad_id) if heads is not None
                else turn_loss(decoder, tower, batch, pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        window.append(loss.item())
        state["step"] = step + 1
        state["elapsed"] = time.perf_counter() - start
        if state["step"] % cfg.log_every == 0:
            state["losses"].append([state["step"], sum(window) / len(window)])
            log(f"  {cfg.name} step {state['step']}: loss {state['losses'][-1][1]:.3f} "
                f"({state['elapsed']:.0f} s)")
            window = []
        if ckpt is not None and time.perf_counter() - last_save >= cfg.save_every_s:
            _save(ckpt, decoder, tower, opt, state, heads)
            last_save = time.perf_counter()
    if window:
        state["losses"].append([state["step"], sum(window) / len(window)])
    if ckpt is not None:
        _save(ckpt, decoder, tower, opt, state, heads)
    decoder.eval()
    tower.eval()
    for p in [*decoder.parameters(), *tower.parameters()]:
        p.requires_grad_(True)
    return {"stage": cfg.name, "steps": state["step"], "elapsed_s": round(state["elapsed"], 1),
            "final_loss": state["losses"][-1][1] if state["losses"] else None, "losses": state["losses"]}
