"""`slm quickstart vision`: a small multimodal assistant in LLaVA-Phi's form, trained here from nothing.

    image -> small ViT -> MLP projector -> 16 image tokens spliced into a small Llama decoder's input

    OUT/data/tokenizer.json   byte-level BPE on the generated captions, questions and answers (+ `<image>`)
    OUT/data/test/            the held-out images as PNGs and their questions (questions.jsonl)
    OUT/run/<stage>/          each stage's checkpoint (a rerun resumes it) and done.json once it is finished
    OUT/model/                the model directory (formats/vision_dir.py): what `slm generate --image` loads
    OUT/report.md, report.json   held-out `accuracy`, `text_only_accuracy` (the same model, the image left out),
                                 `chance`, per kind of image

The data (data/vision.py) is made locally: scikit-learn's handwritten digits and Pillow drawings of shapes,
colours, counts, positions, bar charts and stripes. The stages (train/vision.py): the decoder learns the text
alone and the ViT learns contrastively against the captions (the two pretrained models LLaVA starts from, made
here), then the projector learns to caption with both frozen (LLaVA's stage 1), then the projector and the
decoder learn to answer questions about the image (stage 2). Re-running continues where an interrupted run
stopped. The default budget fits well inside 15 minutes on 2 CPU cores (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from slmkit.chat import TURN_END
from slmkit.data.vision import (
    IMAGE_SIZE,
    KINDS,
    all_text,
    chance,
    make_examples,
    qa_items,
    write_png,
)
from slmkit.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from slmkit.formats.vision_dir import save_vision_dir
from slmkit.lm.vision_lm import VisionLM, image_prompt
from slmkit.model.config import ModelConfig
from slmkit.model.llama import Transformer
from slmkit.model.vit import VisionConfig, VisionTower
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from slmkit.train.vision import CAPTION_PROMPT, STAGES, StageConfig, encode_turns, load_weights, train_stage

IMAGE_TOKEN = "<image>"
# Measured on the shared 2-core machine (BENCHMARKS.md, "Vision quickstart"): the decoder is the quickstart's
# `nano` shape, the ViT three blocks of width 128 over 16 patches of 8x8 pixels.
DECODER = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seq_len=96)
VISION = dict(image_size=IMAGE_SIZE, patch_size=8, dim=128, n_layers=3, n_heads=4)
# how the budget is shared: the decoder's text, the ViT's contrastive pre-training, alignment (LLaVA's stage 1),
# instruction tuning (stage 2)
SHARES = {"text": 0.1, "clip": 0.3, "align": 0.15, "instruct": 0.45}
LRS = {"text": 3e-3, "clip": 2e-3, "align": 1e-3, "instruct": 1e-3}
BATCH = {"clip": 4}  # times batch_size: CLIP's loss wants many negatives, and the ViT alone is cheap


def run_vision_quickstart(out: str | Path = "runs/quickstart-vision", minutes: float = 8.0, n_train: int = 6000,
                          n_test: int = 600, max_eval: int | None = None, seed: int = 0,
                          decoder: dict | None = None, vision: dict | None = None, max_steps: int | None = None,
                          batch_size: int = 32, threads: int | None = 1, log=print) -> dict:
    """Train and evaluate the demo model (see the module docstring); returns report.json's content.

    `minutes` is the training budget of the three stages together; `max_steps` (per stage) replaces it, for tests.
    `n_train` / `n_test` rendered images (every digit scan of each split is added); `max_eval` held-out questions
    at most (None: all). `threads`: torch's CPU threads (None: torch's default). One, because on the shared 2-core
    machine two threads made a training step of these small matrices 2.5-10x slower (BENCHMARKS.md)."""
    out = Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    if not minutes > 0:
        raise ValueError(f"--minutes {minutes:g}: the training budget must be positive")
    t0 = time.perf_counter()
    log(f"[1/6] making the data: digits + {n_train} rendered training images, {n_test} held out")
    train_ex = make_examples("train", n_train, seed=seed)
    test_ex = make_examples("test", n_test, seed=seed)
    tok_path = out / "data" / "tokenizer.json"
    if tok_path.exists():
        tok = load_tokenizer(tok_path.parent)
    else:
        # the reply ends with TURN_END, a special token: train it with the image token on the generated text
        tok = train_tokenizer(all_text(train_ex) + [CAPTION_PROMPT], vocab_size=512,
                              special_tokens=SPECIAL_TOKENS + [IMAGE_TOKEN])
        tok.save(tok_path.parent)
    items = qa_items(test_ex)
    if max_eval is not None and len(items) > max_eval:
        step = len(items) / max_eval  # spread over the kinds, as the split interleaves them
        items = [items[int(i * step)] for i in range(max_eval)]
    _write_test_split(out / "data" / "test", test_ex, items)

    image_id = tok._id(IMAGE_TOKEN)
    dcfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok._id(TURN_END),
                       pad_token_id=tok.pad_id, **{**DECODER, **(decoder or {})})
    vcfg = VisionConfig(text_dim=dcfg.dim, image_token=IMAGE_TOKEN, image_token_id=image_id,
                        **{**VISION, **(vision or {})})
    torch.manual_seed(seed)
    model, tower = Transformer(dcfg), VisionTower(vcfg)
    log(f"  decoder {model.num_params():,} parameters, vision tower {sum(p.numel() for p in tower.parameters()):,} "
        f"({vcfg.n_patches} image tokens)")

    ask = image_prompt(CAPTION_PROMPT, IMAGE_TOKEN)
    turns = {
        "text": encode_turns(tok, [(CAPTION_PROMPT, ex.caption, None) for ex in train_ex]
                             + [(q["question"], q["answer"], None) for ex in train_ex for q in ex.qa]),
        "align": encode_turns(tok, [(ask, ex.caption, ex.image) for ex in train_ex]),
        "instruct": encode_turns(tok, [(image_prompt(q["question"], IMAGE_TOKEN), q["answer"], ex.image)
                                       for ex in train_ex for q in ex.qa]),
    }
    longest = max(len(t.ids) for ts in turns.values() for t in ts) + vcfg.n_patches
    if longest > dcfg.max_seq_len:
        raise ValueError(f"the longest training turn has {longest} positions, more than max_seq_len "
                         f"{dcfg.max_seq_len}; raise it (decoder={{'max_seq_len': ...}})")
    stages = {}
    turns["clip"] = turns["align"]
    what = {"text": "the decoder on the text alone", "clip": "the ViT, contrastively against the captions",
            "align": "stage 1: the projector on captions, decoder and ViT frozen",
            "instruct": "stage 2: projector + decoder on questions and answers, ViT frozen"}
    for n, name in enumerate(STAGES):
        d = out / "run" / name
        done = d / "done.json"
        cfg = StageConfig(name, minutes=None if max_steps else minutes * SHARES[name], max_steps=max_steps,
                          batch_size=batch_size * BATCH.get(name, 1), lr=LRS[name], seed=seed)
        if done.exists():
            log(f"[{n + 2}/6] {what[name]}: done, reusing it")
            load_weights(d / "checkpoint", model, tower)
            stages[name] = json.loads(done.read_text())
            continue
        log(f"[{n + 2}/6] {what[name]}: {len(turns[name]):,} turns, "
            f"{f'{cfg.minutes:.1f} min' if cfg.minutes else f'{max_steps} steps'}")
        stages[name] = train_stage(cfg, model, tower, turns[name], tok.pad_id, ckpt=d / "checkpoint", log=log)
        atomic_write_json(done, stages[name])

    provenance = {"instruction_tuned": True, "recipe": "quickstart vision",
                  "vision": {"stages": {k: {x: v[x] for x in ("steps", "elapsed_s", "final_loss")}
                                        for k, v in stages.items()}}}
    save_vision_dir(model, tower, out / "model", tok, provenance, sampling={"temperature": 0.0})
    log("[6/6] answering the held-out questions, with the image and without it")
    lm = VisionLM.load(out / "model")
    results = evaluate_vqa(lm, test_ex, items)
    report = {**results, "minutes": minutes, "wall_s": round(time.perf_counter() - t0, 1),
              "train_images": len(train_ex), "test_images": len(test_ex),
              "decoder_parameters": model.num_params(),
              "vision_parameters": sum(p.numel() for p in tower.parameters()),
              "image_tokens": vcfg.n_patches, "stages": stages, "model": str(out / "model")}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_report(out, report))
    log(f"held-out accuracy {results['accuracy']:.3f} (text only {results['text_only_accuracy']:.3f}, chance "
        f"{results['chance']:.3f}) on {results['questions']} questions -> {out / 'report.md'}")
    return report


def evaluate_vqa(lm: VisionLM, examples, items) -> dict:
    """Greedy answers to each (example index, question) with the image and with the image token left out
    (`text_only_accuracy`: what the same decoder guesses from the question alone); exact match after trimming."""
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    right = {"image": defaultdict(list), "text": defaultdict(list)}
    for i, q in items:
        ex = examples[i]
        right["image"][ex.kind].append(lm.answer(ex.image, q["question"], greedy).strip() == q["answer"])
        right["text"][ex.kind].append(lm.answer(None, q["question"], greedy).strip() == q["answer"])

    def mean(xs):
        return sum(xs) / max(1, len(xs))

    by_kind = {}
    for kind in KINDS:
        kind_items = [(i, q) for i, q in items if examples[i].kind == kind]
        if kind_items:
            by_kind[kind] = {"questions": len(kind_items), "accuracy": mean(right["image"][kind]),
                             "text_only_accuracy": mean(right["text"][kind]), "chance": chance(kind_items)}
    return {"accuracy": mean([x for v in right["image"].values() for x in v]),
            "text_only_accuracy": mean([x for v in right["text"].values() for x in v]),
            "chance": chance(items), "questions": len(items), "by_kind": by_kind}


def _write_test_split(d: Path, examples, items) -> None:
    """The held-out images as PNG files and their questions, so a user can ask the model about them."""
    if (d / "questions.jsonl").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    used = sorted({i for i, _ in items})
    for i in used:
        atomic_write_bytes(d / f"{i:05d}.png", write_png(examples[i].image))
    lines = [json.dumps({"image": f"{i:05d}.png", "kind": examples[i].kind, "question": q["question"],
                         "answer": q["answer"]}) for i, q in items]
    atomic_write_text(d / "questions.jsonl", "\n".join(lines) + "\n")


def render_report(out: Path, r: dict) -> str:
    rows = "\n".join(f"| {k} | {v['questions']} | **{v['accuracy']:.3f}** | {v['text_only_accuracy']:.3f} | "
                     f"{v['chance']:.3f} |" for k, v in r["by_kind"].items())
    stages = "\n".join(f"| {k} | {v['steps']:,} | {v['elapsed_s'] / 60:.1f} min | {v['final_loss']:.3f} |"
                       for k, v in r["stages"].items())
    first = json.loads((out / "data" / "test" / "questions.jsonl").read_text().splitlines()[0])
    return f"""# slmkit quickstart vision report

A LLaVA-style assistant trained from nothing in {r['minutes']:g} minutes of training ({r['wall_s'] / 60:.1f} min
wall time in all): a ViT ({r['vision_parameters']:,} parameters with the projector) whose {r['image_tokens']} patch
features an MLP projector turns into the input embeddings of a {r['decoder_parameters']:,}-parameter Llama decoder,
in place of the prompt's `{IMAGE_TOKEN}` token. Data: scikit-learn's handwritten digits and Pillow drawings
({r['train_images']:,} training images, {r['test_images']:,} held out), each with a caption and questions.

## Held-out accuracy (exact match of the greedy answer)
| | questions | with the image | text only (image left out) | chance |
|---|---|---|---|---|
| **all** | {r['questions']} | **{r['accuracy']:.3f}** | {r['text_only_accuracy']:.3f} | {r['chance']:.3f} |
{rows}

"Text only" is the same model asked the same question with the image token dropped: what the decoder can guess
from the question's wording alone. "Chance" picks one of the question's possible answers at random.

## Training
| stage | steps | time | final loss |
|---|---|---|---|
{stages}

text: the decoder alone on the captions, questions and answers; clip: the ViT contrastively against the captions
(CLIP's loss); align (LLaVA's stage 1): the projector learns to caption, decoder and ViT frozen; instruct (stage 2):
projector + decoder learn to answer, the ViT frozen.

## Next
```bash
slm generate {out}/model --image {out}/data/test/{first['image']} "{first['question']}"
slm serve {out}/model    # chat page at http://127.0.0.1:8000/ (attach an image); image_url parts in the API
```
"""
