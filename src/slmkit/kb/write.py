"""Marketing texts grounded in a product catalogue (`slm write`): campaign e-mails and product descriptions, n
variants each, every one fact-checked against the catalogue (catalogue.py) and regenerated when it makes a claim
the catalogue does not support.

    texts = write_texts(lm, catalogue, [catalogue["KB-PRO2"]], Brief(audience="home baristas", tone="warm"), n=5)
    [t.text for t in texts if not t.flagged]

The model sees only the listed products' facts and the brief, and is told to use no other figure. A variant
that still breaks a fact is sampled again with a new seed, up to `retries` times; if every attempt breaks one,
the last is returned flagged, with its violations, so nothing unchecked goes out unmarked. Brand voice comes
from the brand's own texts (brand_examples, each checked like an output): shown in the prompt as worked requests
(`examples`, `slm write --examples`), or as LoRA training records (brand_records, `slm brand-records`).
"""

from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmkit.files import iter_jsonl
from slmkit.kb.catalogue import Catalogue, Product, Violation, check_facts
from slmkit.kb.grounding import unsupported_names

KINDS = ("email", "description")

SYSTEM = ("You write marketing copy for {company}. Use only the facts given: never invent a price, number, "
          "feature, discount or warranty. Write in plain text, no placeholders.")


@dataclass
class Brief:
    audience: str = "home coffee lovers"
    tone: str = "friendly"
    words: int = 120  # the length asked for
    notes: str = ""  # anything else the campaign says (an offer, a season); its figures may appear in the text
    company: str = "Kettleby"

    def text(self) -> str:
        """What the fact check accepts as given by the brief."""
        return f"{self.audience} {self.tone} {self.notes}"


@dataclass
class Written:
    kind: str
    skus: list[str]
    variant: int
    text: str
    subject: str | None  # e-mails: the subject line
    attempts: int
    violations: list[dict] = field(default_factory=list)  # of the returned text (empty unless flagged)
    first_draft_violations: int = 0  # violations in the first attempt (what the check caught and fixed)

    @property
    def flagged(self) -> bool:
        return bool(self.violations)

    def to_dict(self) -> dict:
        return {**asdict(self), "flagged": self.flagged}


@dataclass
class Example:
    """One of the brand's own texts (brand_examples): what it is about and what it says, checked clean."""
    kind: str
    products: list[Product]
    text: str  # an e-mail's "Subject: ..." line, a blank line and its body


def build_messages(kind: str, products: list[Product], brief: Brief, examples: list[Example] = ()) -> list[dict]:
    """The writer's chat: its system prompt, then each example as a request about its products answered by its
    text (few-shot: the brand's own copy shows the form and the restraint), then the request for `products`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    shots = [turn for e in examples for turn in ({"role": "user", "content": _request(e.kind, e.products, brief)},
                                                 {"role": "assistant", "content": e.text})]
    return [{"role": "system", "content": SYSTEM.format(company=brief.company)}, *shots,
            {"role": "user", "content": _request(kind, products, brief)}]


def _request(kind: str, products: list[Product], brief: Brief) -> str:
    facts = "\n".join(f"- {p.facts()}" for p in products)
    if kind == "email":
        task = (f"Write a campaign e-mail to {brief.audience} about the product(s) below, in a {brief.tone} tone, "
                f"about {brief.words} words. Start with one line 'Subject: ...', then the body.")
    else:
        task = (f"Write a product description for {brief.audience}, in a {brief.tone} tone, about {brief.words} "
                "words.")
    notes = f"\nCampaign notes: {brief.notes}" if brief.notes else ""
    return f"{task}\n\nProduct facts:\n{facts}{notes}"


def brand_examples(catalogue: Catalogue, path: str | Path, brief: Brief) -> list[Example]:
    """The brand's own texts in `path`, a JSONL file of {"sku": "KB-PRO2" (or "skus": [...]), "subject": "...",
    "body": "..."} e-mails or {"kind": "description", "sku": ..., "body": ...}. Every text must pass the writer's
    check itself: a model tuned on, or shown, copy that breaks a fact learns to break it, so one that does is
    refused, naming its line and what it breaks."""
    examples = []
    for line, example in iter_jsonl(path):
        where = f"{path}:{line}"
        kind, body = example.get("kind", "email"), example.get("body")
        skus = example.get("skus") or ([example["sku"]] if example.get("sku") else [])
        if kind not in KINDS or not isinstance(body, str) or not body.strip() or not skus:
            raise ValueError(f"{where}: an example needs \"sku\" (or \"skus\"), a non-empty \"body\" and a kind of "
                             f"{' or '.join(KINDS)}")
        if kind == "email" and not example.get("subject"):
            raise ValueError(f"{where}: an e-mail example needs its \"subject\"")
        try:
            products = [catalogue[sku] for sku in skus]
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        text = f"Subject: {example['subject']}\n\n{body.strip()}" if kind == "email" else body.strip()
        broken = _check(text, catalogue, products, brief, kind)
        if broken:
            raise ValueError(f"{where}: the text breaks the writer's check: {'; '.join(map(str, broken))} "
                             "(correct it, or put what it rightly says in the catalogue or the brief)")
        examples.append(Example(kind, products, text))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def brand_records(catalogue: Catalogue, path: str | Path, brief: Brief) -> list[dict]:
    """Chat records for `slm finetune --lora` that teach a model the brand's voice: the writer's own prompt
    (build_messages) for each of the brand's texts (brand_examples), that text as the answer."""
    return [{"messages": [*build_messages(e.kind, e.products, brief), {"role": "assistant", "content": e.text}]}
            for e in brand_examples(catalogue, path, brief)]


def pick_examples(examples: list[Example], kind: str, products: list[Product], shots: int) -> list[Example]:
    """The `shots` examples to show before a request: of the same kind, about none of its products (the model
    would copy the answer), those about a product of the same category first, in file order."""
    skus, categories = {p.sku for p in products}, {p.category for p in products}
    usable = [e for e in examples if e.kind == kind and not skus & {p.sku for p in e.products}]
    return sorted(usable, key=lambda e: not categories & {p.category for p in e.products})[:shots]


def split_subject(text: str) -> tuple[str | None, str]:
    """An e-mail's 'Subject: ...' line and the body after it."""
    m = re.match(r"\s*\**subject\**\s*:\s*(.+?)\s*(?:\n|$)", text, re.I)
    return (m.group(1).strip(" *"), text[m.end():].strip()) if m else (None, text.strip())


def write_texts(lm, catalogue: Catalogue, products: list[Product], brief: Brief, kind: str = "email", n: int = 3,
                retries: int = 3, seed: int = 0, temperature: float = 0.7, max_new_tokens: int | None = None,
                examples: list[Example] = (), shots: int = 2, log=None) -> list[Written]:
    """`n` variants of a `kind` text about `products` by `lm` (any LM with a chat template), each fact-checked
    and resampled up to `retries` times while it breaks a catalogue fact. With the brand's `examples`
    (brand_examples), `shots` of them (pick_examples) come first in the chat as worked requests."""
    if not products:
        raise ValueError("name at least one product (--sku) to write about")
    if n < 1 or retries < 0 or shots < 0:
        raise ValueError(f"n must be >= 1, retries and shots >= 0, got n={n}, retries={retries}, shots={shots}")
    messages = build_messages(kind, products, brief, pick_examples(list(examples), kind, products, shots))
    budget = max_new_tokens or int(brief.words * 2) + 40  # ~1.3 tokens a word, and room for the subject line
    out = []
    for variant in range(n):
        first = None
        for attempt in range(retries + 1):
            # a mild repetition penalty: small models otherwise loop on one sentence
            params = lm.sampling_params(temperature=temperature, top_p=0.95, max_new_tokens=budget,
                                        repetition_penalty=1.1, seed=seed + 1000 * variant + attempt)
            text = "".join(lm.stream_chat(messages, params)).strip()
            violations = _check(text, catalogue, products, brief, kind)
            first = len(violations) if first is None else first
            if not violations:
                break
        subject, body = split_subject(text) if kind == "email" else (None, text)
        written = Written(kind, [p.sku for p in products], variant, body, subject, attempt + 1,
                          [asdict(v) for v in violations], first)
        if log:
            log(f"variant {variant + 1}/{n}: {attempt + 1} attempt(s)"
                + (f", FLAGGED: {'; '.join(str(v) for v in violations)}" if violations else ", checked"))
        out.append(written)
    return out


_PLACEHOLDER = re.compile(r"\[[^\]\n]{1,40}\]|\{[^}\n]{1,40}\}|<[^>\n]{1,40}>")
_ECHO = re.compile(r"\b(?:product facts|campaign notes)\b", re.I)


def _check(text: str, catalogue: Catalogue, products: list[Product], brief: Brief,
           kind: str = "email") -> list[Violation]:
    """The catalogue's fact check and the names check (grounding.py), plus what makes a text unusable as it
    stands: nothing written (for an e-mail: no subject line, or nothing after it), a placeholder left for someone
    to fill in ("[Your Name]"), the prompt's own headings copied out, or a sentence repeated three times (a small
    model's loop)."""
    if not text.strip():
        return [Violation("empty", "", "the model wrote nothing")]
    subject, body = split_subject(text) if kind == "email" else (None, text)
    if not body:
        return [Violation("empty", subject or "", "nothing after the subject line")]
    found = []
    if kind == "email" and subject is None:
        found.append(Violation("format", text.strip().splitlines()[0][:60], "no 'Subject:' line first"))
    found += check_facts(text, catalogue, about=products, brief=brief.text(), brand=brief.company)
    sources = " ".join([brief.text(), brief.company, catalogue.text()])
    named = _PLACEHOLDER.sub(" ", f"{subject}\n{body}" if subject else body)  # "[Name]" is a placeholder (below)
    found += unsupported_names(named, sources, title_lines=int(bool(subject)))
    found += [Violation("placeholder", m.group(0), "a placeholder, not text") for m in _PLACEHOLDER.finditer(text)]
    found += [Violation("echo", m.group(0).strip(), "the prompt copied out") for m in _ECHO.finditer(text)][:1]
    sentences = collections.Counter(s.strip().lower() for s in re.split(r"[.!?\n]+", text) if len(s.strip()) > 8)
    found += [Violation("repetition", s[:60], f"said {n} times") for s, n in sentences.items() if n >= 3][:1]
    return found


def summarize(texts: list[Written]) -> dict:
    """The writer's numbers over a batch: outputs, how many went out flagged, and fact violations per 100
    first drafts (what the check caught) and per 100 outputs left flagged."""
    n = len(texts)
    return {"outputs": n, "flagged": sum(t.flagged for t in texts),
            "attempts": sum(t.attempts for t in texts),
            "first_draft_violations_per_100": round(100 * sum(t.first_draft_violations for t in texts) / max(n, 1), 1),
            "flagged_violations_per_100": round(100 * sum(len(t.violations) for t in texts) / max(n, 1), 1)}
