"""The marketing writer on the support catalogue: 100 campaign e-mails (5 variants for each of the 20 products),
every one fact-checked against the catalogue, resampled while it breaks a fact, flagged when it never stops.

    nice python benchmarks/writer.py --model smollm2-135m-instruct --variants 5 --retries 3 \
        --json docs/benchmark-logs/writer.json --texts docs/benchmark-logs/writer-emails.jsonl
    nice python benchmarks/writer.py --model runs/brand/model --seed 1000 --skus KB-PRO2D KB-G40 ...  # held out

`--seed` moves every variant's seeds (product n's from seed + 100 n, n its place in the catalogue, so `--skus`,
a subset, keeps each product's seeds: a brand-voice model tuned on the other products is compared like for like).

Reports, over all outputs: violations per 100 first drafts (what the check caught), by kind; the share that went
out flagged after the retries; attempts per output; seconds per attempt. The texts are kept (--texts) so a person
can audit the unflagged ones: the issue's bar is no unflagged fact violation in 100 e-mails, and only a reader can
say whether the check missed one (the audit is in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from pathlib import Path

from slmkit.files import atomic_write_json, atomic_write_text
from slmkit.kb.catalogue import load_catalogue
from slmkit.kb.write import Brief, brand_examples, summarize, write_texts
from slmkit.recipes.kb import _open_lm

CATALOGUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "support" / "catalogue.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--catalogue", default=str(CATALOGUE))
    ap.add_argument("--variants", type=int, default=5, help="e-mails per product")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--words", type=int, default=80)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--notes", default="spring offer: 10% off everything with code SPRING10")
    ap.add_argument("--limit", type=int, default=None, help="only the first N products")
    ap.add_argument("--seed", type=int, default=0, help="product n's variants are seeded from seed + 100 n")
    ap.add_argument("--skus", nargs="+", default=None, help="only these products (seeded by their catalogue place)")
    ap.add_argument("--examples", default=None, help="the brand's own texts, shown few-shot (slm write --examples)")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--texts", default=None, help="write every output (JSONL) here for auditing")
    args = ap.parse_args()

    catalogue = load_catalogue(args.catalogue)
    brief = Brief(audience="home coffee lovers", tone="friendly", words=args.words, notes=args.notes)
    examples = brand_examples(catalogue, args.examples, brief) if args.examples else []
    lm = _open_lm(args.model, args.backend)
    texts, seconds = [], []
    first_kinds = collections.Counter()
    for n, product in enumerate(list(catalogue)[:args.limit]):
        if args.skus and product.sku not in args.skus:
            continue
        start = time.perf_counter()
        batch = write_texts(lm, catalogue, [product], brief, kind="email", n=args.variants, retries=args.retries,
                            seed=args.seed + n * 100, temperature=args.temperature, examples=examples,
                            shots=args.shots)
        took = time.perf_counter() - start
        seconds.append(took / sum(t.attempts for t in batch))
        texts += batch
        print(f"{product.sku}: {sum(t.flagged for t in batch)}/{len(batch)} flagged, "
              f"{sum(t.attempts for t in batch)} attempts, {took:.0f} s", flush=True)
        if args.texts:  # after every product, so a run stopped early keeps what it wrote
            atomic_write_text(args.texts, "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in texts))
    lm.close()
    # which kinds the check catches in first drafts: re-check isn't needed, the flagged ones keep theirs, and
    # first_draft_violations counts all; the kinds of what went out flagged:
    for t in texts:
        first_kinds.update(v["kind"] for v in t.violations)
    summary = {**summarize(texts), "model": args.model, "retries": args.retries, "temperature": args.temperature,
               "words": args.words, "seed": args.seed, "skus": args.skus, "examples": args.examples,
               "shots": args.shots if args.examples else 0, "flagged_kinds": dict(first_kinds),
               "median_s_per_attempt": round(statistics.median(seconds), 2),
               "unflagged": sum(not t.flagged for t in texts), "cpu": platform.processor() or platform.machine()}
    print(json.dumps(summary, indent=2))
    if args.json:
        atomic_write_json(args.json, summary)


if __name__ == "__main__":
    main()
