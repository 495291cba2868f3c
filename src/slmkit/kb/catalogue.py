"""A product catalogue (CSV) and the fact check every generated marketing text goes through.

    catalogue = load_catalogue("catalogue.csv")   # sku,name,category,price_eur,key_features,warranty_years,in_stock
    violations = check_facts(text, catalogue, about=[catalogue["KB-PRO2"]], brief="10% off with SPRING10")

The check is deliberately strict, because a small model invents figures easily and a wrong price in a campaign
e-mail is a real cost: every number in the text must be one the catalogue gives for a product the text is
about or names (its price, warranty, a figure in its features or name, with its unit where it has one: "60 mm"
is not supported by "60 min"), or one the brief itself contains (a discount, a date). A price or warranty term
must be that of the product named last before it in its sentence, so "2-year warranty" on a 1-year product is
caught even though "2" occurs elsewhere. Features are checked against the others': a feature phrase (two content
words, e.g. "dual boiler") that only other products have is a violation when the text's products lack it. An
offer ("free shipping", "a gift", "a bundle") or a code ("SPRING24") must be the brief's, counts in words
("a triple boiler") are figures too, a name built on the brand that is no product's ("the Kettlebrite") is an
invented product, and a product out of stock may not be called in stock. What no rule here can see (an invented
quality claim in words no catalogue row uses, "designed by the finest in Europe") is left to the reader: the
writer's benchmark audits it; the tests plant each kind of violation the rules catch.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ("sku", "name", "category", "price_eur", "key_features", "warranty_years", "in_stock")
NUMBER = r"\d+(?:[.,]\d+)?"
_PRICE = re.compile(rf"€\s?({NUMBER})|\b({NUMBER})\s?(?:€|EUR\b|euros?\b)", re.I)
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
          "ten": 10}
_COUNT = rf"({NUMBER}|{'|'.join(_WORDS)})"
_WARRANTY = re.compile(rf"\b{_COUNT}[\s-]*(?:years?|yrs?)(?:'s?)?\s+(?:of\s+)?(?:warranty|guarantee)"
                       rf"|\b(?:warranty|guarantee)\s*(?:of|for|:|-|is|lasts)?\s*{_COUNT}\s*(?:years?|yrs?)\b", re.I)
_IN_STOCK = re.compile(r"\b(?:in stock|available now|ships (?:today|now|immediately)|ready to ship)\b", re.I)
_OUT_OF_STOCK = re.compile(r"\b(?:out of stock|sold out|not (?:in stock|available))\b", re.I)
# units a figure is checked together with ("60 mm" is wrong for a 58 mm portafilter even if 60 occurs elsewhere)
_UNITS = {"mm": "mm", "millimetre": "mm", "millimeter": "mm", "cm": "cm", "l": "l", "litre": "l", "liter": "l",
          "ml": "ml", "g": "g", "gram": "g", "kg": "kg", "s": "s", "sec": "s", "second": "s", "min": "min",
          "minute": "min", "°c": "°c", "c": "°c", "degree": "°c", "w": "w", "watt": "w", "bar": "bar", "%": "%",
          "hour": "h", "h": "h", "day": "day", "week": "week", "month": "month", "year": "year", "yr": "year"}
# a code with letters and digits ("SPRING10", "G40", "E5"): it must come from the brief or the catalogue
_CODE = re.compile(r"(?<![\w-])(?=[\w-]*\d)(?=[\w-]*[a-z])[a-z0-9][\w-]*[a-z0-9](?![\w-])", re.I)
# a figure, or a run of them sharing one unit ("15/30/60 min", "88-96 °C", "30 or 60 minutes", "a 30-minute hold")
_FIGURE = re.compile(rf"(?<![\w.,])({NUMBER}(?:\s*(?:/|-|–|,|\bto\b|\bor\b|\band\b)\s*{NUMBER})*)"
                     r"(?:\s*-?\s*(°\s?c\b|%|[a-z]+))?", re.I)
# an offer the brief did not make: "free shipping", "a complimentary gift"
_OFFER = re.compile(r"\b(?:free|complimentary|gifts?|bonus|vouchers?|coupons?|cashback|upgrades?|buy one|"
                    r"two for one|bogo|bundles?|promotions?|giveaways?|rewards?|loyalty points?)\b", re.I)
# counts in words are figures too ("available in two sizes", "a triple boiler")
_COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
                "twice": 2, "double": 2, "dual": 2, "triple": 3, "quadruple": 4}
_STOP = set("a an and at for the of in on to with after by from or per same time each your its is are".split())


@dataclass
class Product:
    sku: str
    name: str
    category: str
    price_eur: float
    features: list[str]
    warranty_years: int
    in_stock: bool
    line: int = 0  # its line in the CSV (for messages)

    def facts(self) -> str:
        """The product as the writer's prompt lists it: only these facts may appear in a text about it."""
        stock = "in stock" if self.in_stock else "currently out of stock"
        return (f"{self.name} (SKU {self.sku}): price €{self.price_eur:.2f}; warranty {self.warranty_years} "
                f"year{'s' if self.warranty_years != 1 else ''}; {stock}; features: {'; '.join(self.features)}")

    def text(self) -> str:
        """What the recommender embeds."""
        return f"{self.name}. {self.category.replace('_', ' ')}. {'. '.join(self.features)}"


@dataclass
class Catalogue:
    products: list[Product]
    path: str = ""
    _by_sku: dict = field(default_factory=dict, repr=False)
    _text: str = field(default="", repr=False)

    def __post_init__(self):
        self._by_sku = {p.sku.lower(): p for p in self.products}
        self._text = " ".join(p.facts() + " " + p.text() for p in self.products)

    def text(self) -> str:
        """Everything the catalogue says, every product's facts: the words a generated text may name
        (grounding.unsupported_names' sources)."""
        return self._text

    def __getitem__(self, sku: str) -> Product:
        try:
            return self._by_sku[sku.lower()]
        except KeyError:
            raise ValueError(f"{self.path or 'catalogue'}: no product with SKU {sku!r} "
                             f"(SKUs: {', '.join(p.sku for p in self.products)})") from None

    def __iter__(self):
        return iter(self.products)

    def __len__(self) -> int:
        return len(self.products)

    def mentioned(self, text: str) -> list[Product]:
        """The products `text` names by SKU, full name or short name ("Pro 2 Dual", "G40"), in order of first
        mention; the longest name matches first, so "Pro 2 Dual" is not also read as "Pro 2"."""
        return list({p.sku: p for _, p in self.mentions(text)}.values())

    def mentions(self, text: str) -> list[tuple[int, Product]]:
        """(position, product) of every mention in `text`, in order."""
        names = sorted(((alias, p) for p in self.products for alias in _aliases(p)), key=lambda a: -len(a[0]))
        found, rest = [], text.lower()
        for alias, product in names:
            pattern = re.compile(rf"(?<![\w-]){re.escape(alias)}(?![\w-])")
            for m in pattern.finditer(rest):
                found.append((m.start(), product))
            rest = pattern.sub(lambda m: " " * len(m.group(0)), rest)  # same length: positions stay true
        return sorted(found, key=lambda f: f[0])


def _aliases(p: Product) -> list[str]:
    """SKU, name, and the name without the brand and the category words ("Kettleby Pro 2 espresso machine" ->
    "pro 2"), when what remains is distinctive (has a digit or two words)."""
    name = p.name.lower()
    short = re.sub(r"^kettleby\s+", "", name)
    for word in p.category.replace("_", " ").split() + ["espresso machine", "coffee maker", "filter", "machine"]:
        short = re.sub(rf"\b{re.escape(word)}\b", " ", short)
    short = " ".join(short.split())
    aliases = [p.sku.lower(), name, re.sub(r"^kettleby\s+", "", name)]
    if short and (re.search(r"\d", short) or len(short.split()) >= 2):
        aliases.append(short)
    aliases += re.findall(r"\b[a-z]+-?\d+\b", name)  # model codes: "g40", "kt-1"
    return list(dict.fromkeys(aliases))


def load_catalogue(path: str | Path) -> Catalogue:
    """Read a catalogue CSV (columns: sku,name,category,price_eur,key_features,warranty_years,in_stock;
    key_features `;`-separated, in_stock true/false); a bad row is reported as file:line: field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such catalogue file (a CSV with columns {','.join(COLUMNS)})")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)} (need {','.join(COLUMNS)})")
        products, seen = [], set()
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            try:
                price = float(row["price_eur"])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: price_eur {row['price_eur']!r} is not a number") from None
            try:
                warranty = int(row["warranty_years"])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: warranty_years {row['warranty_years']!r} is not a whole number") from None
            stock = (row["in_stock"] or "").strip().lower()
            if stock not in ("true", "false"):
                raise ValueError(f"{where}: in_stock {row['in_stock']!r} must be true or false")
            sku = (row["sku"] or "").strip()
            if not sku or not (row["name"] or "").strip():
                raise ValueError(f"{where}: sku and name must not be empty")
            if sku.lower() in seen:
                raise ValueError(f"{where}: SKU {sku!r} appears twice")
            seen.add(sku.lower())
            products.append(Product(sku, row["name"].strip(), row["category"].strip(), price,
                                    [f.strip() for f in (row["key_features"] or "").split(";") if f.strip()],
                                    warranty, stock == "true", line))
    if not products:
        raise ValueError(f"{path}: the catalogue has no products")
    return Catalogue(products, str(path))


# ---- the fact check ------------------------------------------------------------------------------------

@dataclass
class Violation:
    kind: str  # price | warranty | figure | feature | stock
    claim: str  # what the text says
    expected: str  # what the catalogue says (or why the claim has no support)

    def __str__(self) -> str:
        return f"{self.kind}: {self.claim!r} ({self.expected})"


def _number(s: str) -> float:
    s = s.lower()
    return float(_WORDS[s]) if s in _WORDS else float(s.replace(",", "."))


def _numbers(text: str) -> set[float]:
    return {_number(m) for m in re.findall(NUMBER, text)}


def _unit(word: str | None) -> str | None:
    if not word:
        return None
    word = word.lower().replace(" ", "")
    return _UNITS.get(word) or _UNITS.get(word.removesuffix("s"))


def _figures(text: str) -> set[tuple[float, str]]:
    return {(value, u) for m in _FIGURE.finditer(text) if (u := _unit(m.group(2))) for value in _numbers(m.group(1))}


def _phrases(text: str) -> set[str]:
    """Two-content-word phrases ("dual boiler", "steam wand"): what a feature is called."""
    words = re.findall(r"[a-z]+", text.lower())
    content = [w if len(w) > 2 and w not in _STOP and not _unit(w) else None for w in words]
    return {f"{a} {b}" for a, b in zip(content, content[1:], strict=False) if a and b}


def check_facts(text: str, catalogue: Catalogue, about: list[Product] = (), brief: str = "",
                brand: str = "") -> list[Violation]:
    """Every claim in `text` that the catalogue does not support, for a text about `about` (plus any product it
    names). `brand`: a word built on it that is no product's name ("the Kettlebrite") is an invented product.
    Empty: nothing to flag."""
    mentions = catalogue.mentions(text)
    products = list({p.sku: p for p in [*about, *(p for _, p in mentions)]}.values())
    brief_numbers = _numbers(brief)
    violations, spans = [], []

    def owners(at: int) -> list[Product]:
        """Whose price or warranty a claim at `at` states: the product named last before it in its sentence,
        else any product of the text."""
        start = max(text.rfind(c, 0, at) for c in ".!?\n") + 1
        named = [p for pos, p in mentions if start <= pos < at]
        return named[-1:] or products

    for m in _PRICE.finditer(text):
        spans.append(m.span())
        value, whose = round(_number(m.group(1) or m.group(2)), 2), owners(m.start())
        if value not in {round(p.price_eur, 2) for p in whose} and value not in brief_numbers:
            violations.append(Violation("price", m.group(0).strip(), "catalogue price " + (
                ", ".join(f"€{p.price_eur:.2f} ({p.name})" for p in whose) or "of no product the text names")))
    for m in _WARRANTY.finditer(text):
        spans.append(m.span())
        whose = owners(m.start())
        if _number(m.group(1) or m.group(2)) not in {p.warranty_years for p in whose}:
            violations.append(Violation("warranty", m.group(0).strip(), "catalogue warranty " + (
                ", ".join(f"{p.warranty_years} years ({p.name})" for p in whose) or "of no product named")))
    allowed, with_units = set(brief_numbers), _figures(brief)
    for p in products:
        allowed |= _numbers(p.name) | _numbers(" ".join(p.features)) | {p.price_eur, float(p.warranty_years)}
        with_units |= _figures(p.name) | _figures(" ".join(p.features)) | {(float(p.warranty_years), "year")}
    for m in _FIGURE.finditer(text):
        if any(a <= m.start() < b for a, b in spans):
            continue
        unit = _unit(m.group(2))
        wrong = [v for v in _numbers(m.group(1)) if ((v, unit) not in with_units if unit else v not in allowed)]
        if wrong:
            violations.append(Violation("figure", (m.group(0) if unit else m.group(1)).strip(), "no such figure for "
                                        + (", ".join(p.name for p in products) or "any product the text names")))
    known = brief.lower() + " " + " ".join(f"{p.sku} {p.name} {' '.join(p.features)}" for p in catalogue).lower()
    for m in _CODE.finditer(text):
        code = m.group(0)
        if code.lower() not in known and not _unit(re.sub(rf"^{NUMBER}-?", "", code)):
            violations.append(Violation("code", code, "not in the brief or the catalogue"))
    words = " ".join(p.name + " " + " ".join(p.features) for p in products).lower() + " " + brief.lower()
    for m in re.finditer(rf"\b({'|'.join(_COUNT_WORDS)})\b", text, re.I):
        word = m.group(1).lower()
        if word not in words and float(_COUNT_WORDS[word]) not in allowed:
            violations.append(Violation("figure", text[m.start():m.start() + 30].split("\n")[0].strip(),
                                        "no such figure for " + (", ".join(p.name for p in products) or
                                                                 "any product the text names")))
    names = " ".join(p.name for p in catalogue).lower() + " " + brief.lower()
    for m in re.finditer(rf"\b{re.escape(brand[:max(4, len(brand) - 2)])}\w*", text, re.I) if brand else ():
        if m.group(0).lower() not in names and m.group(0).lower() != brand.lower():
            violations.append(Violation("product", m.group(0), f"no {brand} product of that name"))
    for m in _OFFER.finditer(text):
        if m.group(0).lower() not in known:
            violations.append(Violation("offer", text[m.start():m.start() + 40].split("\n")[0].strip(),
                                        "an offer the brief does not make"))
    own = set().union(*(_phrases(" ".join([p.name, *p.features])) for p in products)) if products else set()
    others = {}
    for p in catalogue:
        if p.sku not in {q.sku for q in products}:
            for phrase in _phrases(" ".join(p.features)):
                others.setdefault(phrase, p)
    for phrase in sorted(_phrases(text) & set(others) - own - _phrases(brief)):
        violations.append(Violation("feature", phrase, f"a feature of {others[phrase].name}, not of "
                                    + (", ".join(p.name for p in products) or "the products named")))
    if any(not p.in_stock for p in products) and _IN_STOCK.search(text):
        gone = ", ".join(p.name for p in products if not p.in_stock)
        violations.append(Violation("stock", _IN_STOCK.search(text).group(0), f"out of stock: {gone}"))
    if products and all(p.in_stock for p in products) and _OUT_OF_STOCK.search(text):
        violations.append(Violation("stock", _OUT_OF_STOCK.search(text).group(0), "in stock"))
    return violations
