"""Product recommendations from a purchase history (`slm recommend`): catalogue items ranked by embedding
similarity to what the customer bought, under simple rules, each with a one-line reason.

    recs = recommend(catalogue, ["KB-PRO2"], load_embedder("minilm-l6-v2"), lm=None, k=3)

Rules, applied before ranking: only products in stock, never one already bought, and no second product of a
category the customer already owns a durable item of (someone with an espresso machine is offered what goes with
it, not another machine); consumables, coffee and accessories may repeat categories. The score is the best
cosine similarity between the candidate and any bought product (name, category and features embedded), plus 1
when the candidate's features name a bought product ("fits Pro 2 and Pro 2 Dual"): what is made for a
customer's machine comes before what merely reads alike. With an
`lm`, the reason is written by it, fact-checked like every marketing text, and replaced by the rule-based reason
when it breaks a fact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from slmkit.kb.catalogue import Catalogue, Product, check_facts
from slmkit.kb.grounding import unsupported_names

REPEATABLE = {"accessory", "consumable", "coffee"}


@dataclass
class Recommendation:
    sku: str
    name: str
    price_eur: float
    score: float
    reason: str
    reason_by: str  # "model" or "rule" (the model's reason broke a fact, or there was no model)
    violations: list[dict] = field(default_factory=list)  # of a model reason that was replaced

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(catalogue: Catalogue, history: list[str], embedder, lm=None, k: int = 3, seed: int = 0
              ) -> list[Recommendation]:
    """The `k` best products for a customer who bought the SKUs in `history`."""
    bought = [catalogue[sku] for sku in history]
    if not bought:
        raise ValueError("give the customer's purchase history: at least one SKU (--history)")
    owned = {p.category for p in bought if p.category not in REPEATABLE}
    candidates = [p for p in catalogue if p.in_stock and p.sku not in {b.sku for b in bought}
                  and p.category not in owned]
    if not candidates:
        return []
    vectors = embedder.embed([p.text() for p in bought + candidates])
    sims = vectors[len(bought):] @ vectors[:len(bought)].T  # (candidates, bought)
    best, which = sims.max(dim=1)
    fits = [[b for b in catalogue.mentioned(" ".join(p.features)) if b.sku in {x.sku for x in bought}]
            for p in candidates]
    score = best + torch.tensor([1.0 if f else 0.0 for f in fits])
    order = score.argsort(descending=True)[:k].tolist()
    out = []
    for i in order:
        product = candidates[i]
        anchor = fits[i][0] if fits[i] else bought[int(which[i])]
        rule = _rule_reason(product, anchor, bool(fits[i]))
        reason, by, violations = rule, "rule", []
        if lm is not None:
            text = _model_reason(lm, product, anchor, seed)
            found = (check_facts(text, catalogue, about=[product, anchor]) + unsupported_names(text, catalogue.text())
                     if text else [])
            if text and not found:
                reason, by = text, "model"
            else:
                violations = [asdict(v) for v in found]
        out.append(Recommendation(product.sku, product.name, product.price_eur, round(float(score[i]), 4), reason,
                                  by, violations))
    return out


def _rule_reason(product: Product, anchor: Product, fits: bool) -> str:
    what = product.features[0] if product.features else product.category.replace("_", " ")
    return f"{'Made for' if fits else 'Goes with'} your {anchor.name}: {what}."


def _model_reason(lm, product: Product, anchor: Product, seed: int) -> str:
    messages = [{"role": "system", "content": "You recommend products. Use only the facts given. Answer with one "
                                              "short sentence."},
                {"role": "user", "content": f"The customer bought: {anchor.facts()}\nRecommend: {product.facts()}\n"
                                            "In one sentence, why does the recommended product suit this customer?"}]
    params = lm.sampling_params(temperature=0.0, max_new_tokens=48, seed=seed)
    text = "".join(lm.stream_chat(messages, params)).strip()
    return text.splitlines()[0].strip() if text else ""
