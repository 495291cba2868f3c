"""Train the quickstart model under different settings for the same wall-clock budget; print validation bpb.

    python benchmarks/quickstart_tuning.py --data runs/quickstart/data --minutes 10 \
        --variant base --variant "batch_size=8" --variant "lr=2e-3,min_lr_ratio=0.0"

Each variant is comma-separated TrainConfig fields (`preset=micro` and `set.n_layers=4` also work) on top of
the quickstart's defaults (slmkit.recipes.quickstart.QUICKSTART_PRESET, QUICKSTART_MODEL, QUICKSTART_TRAIN); `base` is
those defaults unchanged. A variant naming a preset (`preset=micro`) starts from that preset as it is.
Variants run one after another (never concurrently: they share 2 cores). Results are appended as JSON lines to
--log so an interrupted sweep keeps what it finished.

`--unseen DIR` also scores each trained model on the .py files under DIR, code it never saw (e.g. pip's own
sources, `--unseen $(python -c "import pip, os; print(os.path.dirname(pip.__file__))")/_internal`), in sliding
windows as `slm quickstart` scores, next to xz -9e on the same bytes, and records its greedy completion of `def `.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from slmkit.model.config import parse_overrides
from slmkit.recipes.quickstart import QUICKSTART_MODEL, QUICKSTART_PRESET, QUICKSTART_TRAIN
from slmkit.train.loop import TrainConfig, train


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(text: str) -> tuple[dict, dict]:
    fields, model = {}, []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item == "base":
            continue
        key, value = item.split("=", 1)
        if key.startswith("set."):
            model.append(f"{key[4:]}={value}")
        else:
            fields[key] = _number(value)
    return fields, parse_overrides(model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--log", default="quickstart_tuning.jsonl")
    ap.add_argument("--unseen", type=Path, help="a folder of .py files the model never saw, scored after training")
    args = ap.parse_args()
    for variant in args.variant or ["base"]:
        fields, model = parse_variant(variant)
        if "preset" not in fields:
            fields["preset"], model = QUICKSTART_PRESET, {**QUICKSTART_MODEL, **model}
        out = Path(tempfile.mkdtemp(prefix="qs-tune-"))
        cfg = TrainConfig(data=args.data, out=str(out / "run"), max_minutes=args.minutes, compile=False,
                          progress=False, **{**QUICKSTART_TRAIN, "eval_every": 0, "save_every": 0, **fields},
                          model_overrides=model)
        s = train(cfg, log=lambda *a: None)
        rec = {"variant": variant, "minutes": args.minutes, "val_bpb": round(s["val_bpb"], 4),
               "val_loss": round(s["val_loss"], 4), "steps": s["steps"], "tokens": s["tokens"],
               "tok_s": round(s["tokens_per_s"]), "parameters": s["parameters"]}
        if args.unseen:
            rec.update(score_unseen(out / "run" / "model", args.unseen))
        print(json.dumps(rec), flush=True)
        with open(args.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        shutil.rmtree(out, ignore_errors=True)


def score_unseen(model_dir: Path, folder: Path) -> dict:
    """Bits per byte on every .py file under `folder` (sliding windows of the training context, each scoring its
    second half), xz -9e on the same bytes (whole and per file), and the greedy completion of `def `."""
    from slmkit.eval.perplexity import compressor_bits_per_byte, token_bits_per_byte
    from slmkit.formats.hf_dir import load_model_dir
    from slmkit.lm import load_lm
    from slmkit.sampling import SamplingParams
    from slmkit.tokenizer import load_tokenizer
    model, tok = load_model_dir(model_dir), load_tokenizer(model_dir)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.rglob("*.py"))]
    texts = [t for t in texts if t.strip()]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    seq = model.cfg.max_seq_len
    bpb = token_bits_per_byte(model, [tok.encode(t, add_bos=tok.add_bos) for t in texts], n_bytes, seq_len=seq,
                              stride=seq // 2, batch_size=16)["bits_per_byte"]
    xz = compressor_bits_per_byte([t.encode("utf-8") for t in texts])
    greedy = load_lm(str(model_dir)).generate("def ", SamplingParams(max_new_tokens=96, temperature=0.0),
                                              heal=True)[0]
    return {"unseen": str(folder), "unseen_files": len(texts), "unseen_bytes": n_bytes, "unseen_bpb": round(bpb, 4),
            "unseen_xz": round(xz["xz -9e"], 4), "unseen_xz_per_file": round(xz["xz -9e (per file)"], 4),
            "greedy": "def " + greedy}


if __name__ == "__main__":
    main()
