"""When a person must take over, by what the customer wrote: the cases no confidence score should decide.

    handoff_reasons("Can I talk to a real person?")  ->  [("asks_for_human", "real person")]

Four reasons are read off the message itself, with patterns a team can read and extend: the customer asks for a
person; the request needs someone to act on an order or account (an order number, a double charge, a locked
account, an exception to policy); the customer is angry or talks of lawyers, chargebacks or regulators; or there
is a safety incident (sparks, smoke, burns, a leak near power). The fifth, "the help center has no answer", is
the retrieval's call (assistant.py). Patterns, not a model, because these cases must never be auto-answered: a
pattern is checked, explained ("matched 'lawyer'") and fixed in one line, and a false alarm only costs a person
a look. The order matters when several match: safety first.
"""

from __future__ import annotations

import re

REASONS = ("safety", "angry_or_legal", "asks_for_human", "needs_account_action", "not_in_kb", "low_confidence")

PATTERNS: dict[str, list[str]] = {
    "safety": [r"\bsparks?\b", r"\bsmok(?:e|ing)\b", r"\bburn(?:t|ed|s|ing)?\b", r"\bshock", r"\bmelt",
               r"\bfire\b", r"\bflames?\b", r"\bexplo", r"\bleak\w*\b.{0,90}\b(?:socket|plug|power|outlet|cable)",
               r"\b(?:socket|plug|power|outlet|cable)\b.{0,90}\bleak"],
    "angry_or_legal": [r"\blawyer", r"\blegal\b", r"\bsue\b", r"\bcourt\b", r"\bchargeback", r"\bfraud",
                       r"\bregulator", r"\bconsumer (?:authority|protection)", r"\bunacceptable\b", r"\bridiculous\b",
                       r"\bcompensation\b", r"\bthird time\b", r"\breport(?:ing)? you\b", r"\bscam\b", r"\bdisgrace"],
    "asks_for_human": [r"\b(?:real|actual) (?:person|human)", r"\bhuman\b", r"\b(?:speak|talk) (?:to|with) (?:a|an|"
                       r"someone|somebody|the|your)\b", r"\bmanager\b", r"\bphone number\b", r"\bcall me\b",
                       r"\bcan i call\b", r"\bsomeone (?:to|who) (?:call|explain)", r"\bexplain (?:this|it) to "
                       r"someone\b"],
    "needs_account_action": [r"\bKB-\d{5,}\b", r"\border (?:number|no\.?|#)\s*\d", r"\bcharged twice\b",
                             r"\bdouble[- ]charged\b", r"\bcan'?t log ?in\b", r"\bcannot log ?in\b",
                             r"\blocked out\b", r"\bbackup codes?\b", r"\bstill accept\b", r"\bexception\b",
                             r"\bwithout (?:me )?having to send\b", r"\bnever (?:got|received) it\b",
                             r"\bdelivered\b.{0,80}\b(?:never|didn'?t) (?:got|get|receive)"],
}
_COMPILED = {reason: [re.compile(p, re.I | re.S) for p in patterns] for reason, patterns in PATTERNS.items()}


def handoff_reasons(message: str) -> list[tuple[str, str]]:
    """(reason, the text that matched) for every rule `message` triggers, most urgent reason first."""
    found = []
    for reason, patterns in _COMPILED.items():
        for p in patterns:
            m = p.search(message)
            if m:
                found.append((reason, m.group(0)))
                break
    return found
