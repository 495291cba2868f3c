"""Retrieval on kb-python dev by embedder: MiniLM (an encoder) vs SmolLM2-135M-Instruct's mean-pooled hidden states
(a decoder, `TorchLM.embed`), MiniLM fine-tuned contrastively on pairs made from the corpus itself, and a
cross-encoder reranker trained on the same pairs; `hit_at_5` and `mrr`, dense-only and hybrid.

    nice python benchmarks/retrieval_embedders.py --work /tmp/retrieval \
        --questions ../shared/data/kb-python/questions.dev.jsonl --json docs/benchmark-logs/retrieval_embedders.json

Steps (each skipped when its output exists under --work, so an interrupted run resumes, and two processes with
different --runs can share the work):
1. index Python's language reference (`pydoc-topics`) once per embedder: `kb-minilm`, `kb-smollm` (with
   --decoder-docs N only the first N topic files: the decoder embeds a chunk in seconds on a loaded CPU; every
   embedder is then also evaluated on those N documents, `-subset`, with the questions they can answer);
2. `kb_pairs` from kb-minilm's chunks (heading -> text, and the inverse cloze task: a sentence -> the rest of its
   chunk, with a BM25 hard negative), the first --dev-pairs of them held out as dev pairs; no kb-python question
   is used for training or tuning;
3. `train_embedder` (MiniLM, MultipleNegativesRankingLoss with the hard negatives) -> `emb-ft`, indexed as `kb-ft`;
4. `train_reranker` (a cross-encoder from MiniLM, listwise over 1 + 3 negatives) on the first --rerank-pairs
   training pairs -> `rr-ft` (a subset: on 2 shared cores a step of 8 queries x 4 passages takes about a minute);
5. `kb_eval` (retrieval only) for every KB in dense and hybrid mode, bm25 once, and hybrid + the reranker over the
   fused top --rerank-pool for kb-minilm and kb-ft.
Prints and writes one JSON object: each run's hit_at_5, mrr and median search seconds, the indexing summaries, the
training summaries (dev pair accuracy before / after), the CPU and the load average at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from slmkit.files import atomic_write_json
from slmkit.kb.evaluate import read_questions
from slmkit.kb.index import index_kb
from slmkit.kb.pairs import kb_pairs
from slmkit.kb.store import SQLiteStore
from slmkit.recipes.kb import kb_eval
from slmkit.train.contrastive import train_embedder
from slmkit.train.rerank import train_reranker


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def index(work: Path, name: str, embedder: str, log, sources=("pydoc-topics",)) -> dict | None:
    kb = work / name
    if (kb / "kb.sqlite").exists():
        return json.loads((work / f"{name}.index.json").read_text()) if (work / f"{name}.index.json").exists() \
            else None
    summary = index_kb(list(sources), kb, embedder=embedder)
    atomic_write_json(work / f"{name}.index.json", summary)
    log(f"indexed {name}: {json.dumps(summary)}")
    return summary


def subset_kb(src: Path, dst: Path, stems: set[str]) -> Path:
    """A copy of knowledge base `src` with only the documents named by `stems` (their chunks and vectors as they
    were: each document is chunked and embedded on its own, so this equals indexing those files alone)."""
    if not (dst / "kb.sqlite").exists():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "kb.sqlite", dst / "kb.sqlite")
        store = SQLiteStore(dst / "kb.sqlite")
        for path in store.documents():
            if Path(path).stem not in stems:
                store.delete_document(path)
        store.close()
    return dst


def subset_questions(questions: Path, stems: set[str], out: Path) -> Path:
    """The questions a corpus of `stems` can answer (a gold topic among them), and every unanswerable one."""
    kept = [q for q in read_questions(questions) if not q["answerable"] or set(q["topics"]) & stems]
    out.write_text("".join(json.dumps(q) + "\n" for q in kept))
    return out


def split_pairs(pairs: Path, dev_n: int, work: Path) -> tuple[Path, Path]:
    lines = pairs.read_text().splitlines(keepends=True)
    dev, train = work / "pairs.dev.jsonl", work / "pairs.train.jsonl"
    dev.write_text("".join(lines[:dev_n]))
    train.write_text("".join(lines[dev_n:]))
    return train, dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--decoder", default="smollm2-135m-instruct")
    ap.add_argument("--decoder-docs", type=int, help="index only the first N topic files (alphabetical) with the "
                    "decoder, and compare every embedder on those N and the questions they answer")
    ap.add_argument("--dev-pairs", type=int, default=100)
    ap.add_argument("--embed-batch", type=int, default=32)
    ap.add_argument("--embed-max-length", type=int, default=128)
    ap.add_argument("--rerank-pairs", type=int, default=400)
    ap.add_argument("--rerank-lr", type=float, default=1e-4)
    ap.add_argument("--rerank-head-lr", type=float, default=5e-3)
    ap.add_argument("--rerank-dev-pairs", type=int, default=40, help="dev pairs scored before / after (x 4 passes)")
    ap.add_argument("--rerank-max-length", type=int, default=128)
    ap.add_argument("--rerank-pool", type=int, default=20)
    ap.add_argument("--eval-only", action="store_true", help="train nothing (another process may be training)")
    ap.add_argument("--runs", help="only these evaluations, CORPUS:EMBEDDER:MODE[:rr], e.g. full:minilm:hybrid:rr "
                    "(default: all)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(message, flush=True)
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d"), "questions": str(args.questions), "index": {}, "train": {}}
    report["index"]["minilm"] = index(work, "kb-minilm", "minilm-l6-v2", log)
    topics = sorted((work / "kb-minilm" / "sources" / "pydoc-topics").glob("*.md"))
    decoder_files = topics[:args.decoder_docs] if args.decoder_docs else ["pydoc-topics"]
    report["index"]["smollm"] = index(work, "kb-smollm", args.decoder, log, sources=decoder_files)

    pairs = work / "pairs.jsonl"
    if not pairs.exists():
        report["pairs"] = kb_pairs(work / "kb-minilm", pairs)
    train, dev = split_pairs(pairs, args.dev_pairs, work)
    if not (work / "emb-ft" / "model.safetensors").exists() and not args.eval_only:
        train_embedder("minilm-l6-v2", train, work / "emb-ft", dev=dev, batch_size=args.embed_batch,
                       max_length=args.embed_max_length, log=log)
    report["train"]["embedder"] = json.loads((work / "emb-ft" / "slmkit.json").read_text())["contrastive"]
    report["index"]["fine_tuned"] = index(work, "kb-ft", str(work / "emb-ft"), log)
    if not (work / "rr-ft" / "model.safetensors").exists() and not args.eval_only:
        subset, dev_subset = work / "pairs.rerank.jsonl", work / "pairs.rerank-dev.jsonl"
        subset.write_text("".join(train.read_text().splitlines(keepends=True)[:args.rerank_pairs]))
        dev_subset.write_text("".join(dev.read_text().splitlines(keepends=True)[:args.rerank_dev_pairs]))
        train_reranker("minilm-l6-v2", subset, work / "rr-ft", dev=dev_subset, max_length=args.rerank_max_length,
                       lr=args.rerank_lr, head_lr=args.rerank_head_lr, log=log)
    if (work / "rr-ft" / "slmkit.json").exists():
        report["train"]["reranker"] = json.loads((work / "rr-ft" / "slmkit.json").read_text())["reranker"]

    questions = {"full": args.questions}
    kbs = {"minilm": "kb-minilm", "fine_tuned": "kb-ft"}
    if args.decoder_docs:  # the decoder saw part of the corpus: compare every embedder on that part
        stems = {Path(f).stem for f in decoder_files}
        questions["subset"] = subset_questions(args.questions, stems, work / "questions.subset.jsonl")
        for name in ("minilm", "fine_tuned"):
            subset_kb(work / kbs[name], work / f"{kbs[name]}-subset", stems)
        report["subset"] = {"documents": len(stems), "questions": len(read_questions(questions["subset"])),
                            "answerable": sum(q["answerable"] for q in read_questions(questions["subset"]))}
    runs = [("full", "minilm", "kb-minilm", "bm25", None)]
    if not args.decoder_docs:
        kbs["smollm"] = "kb-smollm"
    runs += [("full", name, kb, mode, None) for name, kb in kbs.items() for mode in ("dense", "hybrid")]
    if args.decoder_docs:
        runs += [("subset", name, f"{kb}-subset" if name != "smollm" else kb, mode, None)
                 for name, kb in (*kbs.items(), ("smollm", "kb-smollm")) for mode in ("dense", "hybrid")]
    runs += [("full", name, kb, "hybrid", work / "rr-ft") for name, kb in (("fine_tuned", "kb-ft"),
                                                                           ("minilm", "kb-minilm"))]
    if args.runs:
        runs = [r for r in runs if f"{r[0]}:{r[1]}:{r[3]}{':rr' if r[4] else ''}" in args.runs.split(",")]
    report["retrieval"] = []
    for corpus, name, kb, mode, reranker in runs:
        out = work / f"eval-{kb}-{mode}{'-rr' if reranker else ''}{'-subset' if corpus == 'subset' else ''}"
        if (out / "results.json").exists():  # an earlier (or parallel) run's
            r = json.loads((out / "results.json").read_text())
        else:
            r = kb_eval(work / kb, questions[corpus], out, mode=mode, reranker=reranker, rerank_pool=args.rerank_pool)
        row = {"corpus": corpus, "embedder": name, "mode": mode, "reranker": reranker is not None,
               "hit_at_5": r["hit_at_5"], "mrr": r["mrr"], "median_search_s": r["latency"]["median_search_s"]}
        report["retrieval"].append(row)
        log(json.dumps(row))
    if args.json:
        atomic_write_json(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
