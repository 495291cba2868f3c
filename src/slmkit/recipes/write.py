"""The marketing writer as plain functions (`slm write`, `slm brand-records`, `slm recommend`): catalogue texts
fact-checked against the catalogue (slmkit.kb.write), the brand's own texts as LoRA training records, and
recommendations from a purchase history (slmkit.kb.recommend)."""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.files import atomic_write_text
from slmkit.kb.catalogue import load_catalogue
from slmkit.kb.recommend import recommend
from slmkit.kb.write import Brief, brand_examples, brand_records, summarize, write_texts
from slmkit.recipes.kb import _open_lm


def write_marketing(catalogue: str | Path, model: str, skus: list[str], kind: str = "email", brief: Brief | None = None,
                    n: int = 3, retries: int = 3, seed: int = 0, temperature: float = 0.7, backend: str = "auto",
                    examples: str | Path | None = None, shots: int = 2, out: str | Path | None = None,
                    log=None) -> tuple[list[dict], dict]:
    """`n` fact-checked `kind` texts about the products `skus` of the `catalogue` CSV by `model`, after `shots`
    of the brand's own texts in `examples` (a JSONL file, kb.write.brand_examples) when given; with `out`, the
    records are written there as JSONL (atomically). Returns (records, summary)."""
    cat = load_catalogue(catalogue)
    products = [cat[s] for s in skus]
    brief = brief or Brief()
    shown = brand_examples(cat, examples, brief) if examples else []
    lm = _open_lm(model, backend)
    try:
        texts = write_texts(lm, cat, products, brief, kind=kind, n=n, retries=retries, seed=seed,
                            temperature=temperature, examples=shown, shots=shots, log=log)
    finally:
        lm.close()
    records = [t.to_dict() for t in texts]
    if out:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records, summarize(texts)


def write_brand_records(catalogue: str | Path, examples: str | Path, out: str | Path,
                        brief: Brief | None = None) -> int:
    """The brand's own texts in `examples` as chat records for `slm finetune --lora` (kb.write.brand_records),
    written to `out` (JSONL, atomically); how many."""
    records = brand_records(load_catalogue(catalogue), examples, brief or Brief())
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def recommend_products(catalogue: str | Path, history: list[str], embedder: str = "minilm-l6-v2",
                       model: str | None = None, k: int = 3, backend: str = "auto", seed: int = 0) -> list[dict]:
    """The `k` best catalogue products for a customer who bought `history` (SKUs), ranked by `embedder`
    similarity under the stock / already-bought / owned-category rules, with a reason (by `model` when given,
    fact-checked; else rule-based)."""
    from slmkit.lm.embedder import load_embedder
    cat = load_catalogue(catalogue)
    for sku in history:
        cat[sku]  # an unknown SKU fails here, before any model loads
    emb = load_embedder(embedder)
    lm = _open_lm(model, backend) if model else None
    try:
        return [r.to_dict() for r in recommend(cat, history, emb, lm=lm, k=k, seed=seed)]
    finally:
        emb.close()
        if lm is not None:
            lm.close()
