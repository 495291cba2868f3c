"""Clean: canonical Unicode and line endings, no stray control characters, optional PII redaction.

The PII patterns are deliberately conservative: a training corpus of code is full of numbers, and a
redactor that eats `1234567`, `3.11.7` or `a[1::2]` damages the data more than it protects it. So phone
numbers need phone formatting, card numbers need a plausible issuer digit and a valid Luhn checksum,
IPv6 needs a real address shape.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

PII_KINDS = ("email", "credit_card", "ip", "phone")
PLACEHOLDERS = {"email": "<EMAIL>", "credit_card": "<CREDIT_CARD>", "ip": "<IP>", "phone": "<PHONE>"}

# C0 and C1 controls except \t and \n (\r is turned into \n before this runs)
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
# 13-19 digits, optionally grouped by single spaces or dashes; checked further in _card()
CARD_RE = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w]|[.-]\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# not part of a longer dotted number (versions such as 1.2.3.4.5) or an identifier (v1.2.3.4)
IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    # international: +CC then 2-5 digit groups separated by space, dot or dash, e.g. +44 20 7946 0958,
    # +44 (0)20 7946 0958, +1 (555) 123-4567
    r"\+\d{1,3}(?:[ .-](?:\(\d{1,4}\) ?)?\d{1,8}){2,5}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199
    r"|(?:1[ .-])?\(\d{3}\)[ ]?\d{3}[ .-]\d{4}"
    r"|(?:1[.-])?\d{3}([.-])\d{3}\1\d{4}"
    r")(?![\w]|[.-]\d)"
)


@dataclass
class Cleaned:
    text: str
    pii: Counter = field(default_factory=Counter)  # redactions by kind


def normalize(text: str) -> str:
    """NFC, \\r\\n and lone \\r → \\n, control characters other than \\t and \\n removed."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_RE.sub("", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match) -> str | None:
    digits = re.sub(r"[ -]", "", match.group())
    # issuer digits 2-6 (Mastercard 2-series, Amex/Diners/JCB, Visa, Mastercard, Discover/UnionPay):
    # rules out most ids and timestamps before Luhn, which alone passes one number in ten
    if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits):
        return PLACEHOLDERS["credit_card"]
    return None


def _ipv6(match: re.Match) -> str | None:
    s = match.group()
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified:
        return None
    groups = [g for g in s.split(":") if g]
    # `a[1::2]` and `::1` are valid IPv6 too; demand a full address or a compressed one with a
    # group of 3+ hex digits (fe80::1, 2001:db8::ff00:42:8329)
    if len(groups) == 8 or ("::" in s and len(groups) >= 2 and max(len(g) for g in groups) >= 3):
        return PLACEHOLDERS["ip"]
    return None


_NOT_AN_ADDRESS = re.compile(r"version|section|release|rfc|spec|§", re.IGNORECASE)


def _ipv4(match: re.Match) -> str | None:
    ip = ipaddress.IPv4Address(match.group())
    # loopback, 0.0.0.0 and netmasks identify nobody, and code is full of them; dotted numbers right after
    # "version 7.1.4.34" or "section 8.2.4.44" are not addresses at all
    if ip.is_loopback or ip.is_unspecified or match.group().startswith("255."):
        return None
    if _NOT_AN_ADDRESS.search(match.string, max(0, match.start() - 24), match.start()):
        return None
    return PLACEHOLDERS["ip"]


def _phone(match: re.Match) -> str | None:
    digits = sum(ch.isdigit() for ch in match.group())
    return PLACEHOLDERS["phone"] if 7 <= digits <= 15 else None


def _always(kind: str):
    return lambda match: PLACEHOLDERS[kind]


# order matters: e-mails first (they contain digits), cards before phones (long digit runs)
REDACTORS = [
    ("email", EMAIL_RE, _always("email")),
    ("credit_card", CARD_RE, _card),
    ("ip", IPV6_RE, _ipv6),
    ("ip", IPV4_RE, _ipv4),
    ("phone", PHONE_RE, _phone),
]


def redact(text: str) -> tuple[str, Counter]:
    counts: Counter = Counter()
    for kind, pattern, decide in REDACTORS:

        def replace(match: re.Match, kind=kind, decide=decide) -> str:
            out = decide(match)
            if out is None:
                return match.group()
            counts[kind] += 1
            return out

        text = pattern.sub(replace, text)
    return text, counts


def clean_text(text: str, *, redact_pii: bool = False) -> Cleaned:
    text = normalize(text)
    if not redact_pii:
        return Cleaned(text)
    text, counts = redact(text)
    return Cleaned(text, counts)
