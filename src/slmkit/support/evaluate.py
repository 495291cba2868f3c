"""`slm support eval`: the assistant on a file of customer messages (../shared/data/support's format), scored.

    {"id", "message", "intent", "answer_articles": ["shipping.md"], "answer_keywords": ["€6.95"],
     "escalate": false, "escalate_reason": ""}

OUT/results.json holds at least `intent_accuracy`, `handoff_precision`, `handoff_recall`, `auto_resolved` (share
of all messages answered without a person) and `wrong_reply_rate` (share of automatic replies that miss an
answer keyword), and besides: macro-F1 of the intents, recall per escalation reason, safety messages answered
automatically (must be 0), article hit@1/3/5, keyword recall of the replies, their mean length in words, the
error rate among automatic replies (an automatic reply is an error when the message should have gone to a person
or the reply misses a keyword), and the largest automatic share whose error rate (`auto_resolved_at_error`), or
whose wrong_reply_rate (`auto_resolved_at_wrong_reply`), stays at or under 5% and 10% when the confidence
threshold is swept (the rules' hand-offs stay hand-offs), and `threshold_leave_half_out`: what a threshold chosen
for wrong_reply_rate <= 5% on half of the messages does on the other half (the honest estimate beside a threshold
tuned on all of them). OUT/replies.jsonl holds every turn.

`slm eval` runs the same as a task of kind `support` (support/task.py; examples/tasks/support.yaml).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from slmkit.eval.metrics import classification_report
from slmkit.files import atomic_write_json, atomic_write_text, iter_jsonl
from slmkit.kb.retrieve import search
from slmkit.support.rules import handoff_reasons

FIELDS = ("message", "intent", "answer_articles", "answer_keywords", "escalate")


def read_messages(path: str | Path) -> list[dict]:
    """Support messages; a record without the fields scoring needs is reported as file:line."""
    out = []
    for n, record in iter_jsonl(path):
        missing = [f for f in FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)} (support messages need "
                             f"{', '.join(FIELDS)})")
        if not isinstance(record["message"], str) or not record["message"].strip():
            raise ValueError(f"{path}:{n}: `message` must be a non-empty string")
        out.append(record)
    return out


def has_keyword(reply: str, keyword: str) -> bool:
    """Case-insensitive substring after collapsing whitespace runs (the data's README rule)."""
    def norm(s: str) -> str:
        return re.sub(r"\s+", " ", s).lower()
    return norm(keyword) in norm(reply)


def message_record(assistant, m: dict) -> dict:
    """The assistant's turn on one message (its own conversation) with what scoring needs beside it."""
    turn = assistant.handle([{"role": "user", "content": m["message"]}])
    top5 = [Path(h.path).name for h in search(assistant.kb, m["message"], k=5, mode=assistant.mode,
                                                rerank=getattr(assistant, "rerank", None))]
    keywords = m["answer_keywords"]
    found = [has_keyword(turn.draft, k) for k in keywords]
    return {**turn.to_dict(), "id": m.get("id"), "gold_intent": m["intent"], "gold_escalate": bool(m["escalate"]),
            "gold_reason": m.get("escalate_reason", ""), "gold_articles": m["answer_articles"], "retrieved_5": top5,
            "keywords_found": sum(found), "keywords": len(keywords), "all_keywords": all(found),
            "rule": bool(handoff_reasons(m["message"]))}


def evaluate_support(assistant, messages: list[dict], out: str | Path | None = None, log=None) -> dict:
    """Run `assistant` (SupportAssistant) on every message (each its own conversation) and score it."""
    records = []
    for i, m in enumerate(messages, 1):
        records.append(message_record(assistant, m))
        if log:
            turn = records[-1]
            log(f"[{i}/{len(messages)}] {'hand-off ' + turn['reason'] if turn['handoff'] else 'auto'}: "
                f"{m['message'][:60]}")
    metrics = support_metrics(records)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "replies.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_json(out / "results.json", metrics)
    return metrics


def tallies(records: list[dict]) -> dict[str, tuple[int, int]]:
    """The five headline numbers as (count, out of): each is a share of the messages (or hand-offs, or automatic
    replies) it is counted over; `slm eval`'s support task turns them into rates with intervals."""
    handed = [r for r in records if r["handoff"]]
    gold = [r for r in records if r["gold_escalate"]]
    auto = [r for r in records if not r["handoff"]]
    return {"intent_accuracy": (sum(r["intent"] == r["gold_intent"] for r in records), len(records)),
            "handoff_precision": (sum(r["gold_escalate"] for r in handed), len(handed)),
            "handoff_recall": (sum(r["handoff"] for r in gold), len(gold)),
            "auto_resolved": (len(auto), len(records)),
            "wrong_reply_rate": (sum(wrong_reply(r) for r in auto), len(auto))}


def support_metrics(records: list[dict]) -> dict:
    n = len(records)
    if not n:
        raise ValueError("no messages to evaluate")
    labels = sorted({r["gold_intent"] for r in records} | {r["intent"] for r in records})
    report = classification_report([r["gold_intent"] for r in records], [r["intent"] for r in records], labels)
    handed = [r for r in records if r["handoff"]]
    gold = [r for r in records if r["gold_escalate"]]
    auto = [r for r in records if not r["handoff"]]
    with_kw = [r for r in auto if r["keywords"]]
    reasons = sorted({r["gold_reason"] for r in gold})
    with_articles = [r for r in records if r["gold_articles"]]

    def hit(k: int) -> float | None:
        if not with_articles:
            return None
        return round(sum(bool(set(r["retrieved_5"][:k]) & set(r["gold_articles"])) for r in with_articles)
                     / len(with_articles), 4)

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {
        "messages": n,
        **{name: ratio(*counts) for name, counts in tallies(records).items()},
        "intent_macro_f1": round(report["macro_f1"].value, 4),
        "auto_error_rate": ratio(sum(_auto_error(r) for r in auto), len(auto)),
        "recall_by_reason": {reason: ratio(sum(r["handoff"] for r in gold if r["gold_reason"] == reason),
                                           sum(r["gold_reason"] == reason for r in gold)) for reason in reasons},
        "handoff_reasons": {reason: sum(r["reason"] == reason for r in handed)
                            for reason in sorted({r["reason"] for r in handed})},
        "safety_auto_answered": sum(r["gold_reason"] == "safety" and not r["handoff"] for r in records),
        "article_hit_at_1": hit(1), "article_hit_at_3": hit(3), "article_hit_at_5": hit(5),
        "keyword_recall": ratio(sum(r["keywords_found"] for r in with_kw), sum(r["keywords"] for r in with_kw)),
        "reply_words": round(sum(len(r.get("reply", "").split()) for r in auto) / len(auto), 1) if auto else None,
        "auto_resolved_at_error": {str(e): auto_share_at_error(records, e) for e in (0.05, 0.10)},
        "auto_resolved_at_wrong_reply": {str(e): auto_share_at_error(records, e, wrong_reply) for e in (0.05, 0.10)},
        "threshold_leave_half_out": {"0.05": leave_half_out(records, 0.05)},
    }


def _auto_error(r: dict) -> bool:
    return r["gold_escalate"] or not r["all_keywords"]


def wrong_reply(r: dict) -> bool:
    return r["keywords"] > 0 and not r["all_keywords"]


def auto_share_at_error(records: list[dict], max_error: float, error=_auto_error) -> dict:
    """Sweep the confidence threshold over the messages no rule hands off: the largest share of all messages
    answered automatically with an `error` rate at or under `max_error`, and the threshold that gives it (the
    confidence of the last message still answered: `min_confidence` at or just under it). `error`: a message that
    should have gone to a person or a reply missing a keyword (the default), or `wrong_reply` (the keyword alone:
    `wrong_reply_rate`'s definition)."""
    free = sorted((r for r in records if not r["rule"]), key=lambda r: -r["confidence"])
    best = {"auto_resolved": 0.0, "threshold": None, "error_rate": None}
    errors = 0
    for i, r in enumerate(free, 1):
        errors += error(r)
        tied = i < len(free) and free[i]["confidence"] == r["confidence"]
        if not tied and errors / i <= max_error and i / len(records) > best["auto_resolved"]:
            best = {"auto_resolved": round(i / len(records), 4), "threshold": r["confidence"],
                    "error_rate": round(errors / i, 4)}
    return best


def _at_threshold(records: list[dict], t: float) -> dict:
    """Counts with `min_confidence` = t: the rules' and not_in_kb's hand-offs stay, the rest is answered
    automatically when its confidence is at least t."""
    fixed = [r["handoff"] and r["reason"] != "low_confidence" for r in records]
    handed = [r for r, f in zip(records, fixed, strict=True) if f or r["confidence"] < t]
    auto = [r for r, f in zip(records, fixed, strict=True) if not f and r["confidence"] >= t]
    return {"auto": len(auto), "wrong": sum(wrong_reply(r) for r in auto), "handed": len(handed),
            "right_handoffs": sum(r["gold_escalate"] for r in handed),
            "escalate": sum(r["gold_escalate"] for r in records)}


def leave_half_out(records: list[dict], max_wrong: float, rounds: int = 250, seed: int = 0) -> dict | None:
    """What choosing `min_confidence` on these messages is worth on others: split them in random halves, choose on
    one half the threshold with the largest automatic share whose wrong_reply_rate is at most `max_wrong`, apply it
    to the other half, and the other way round; the means over `rounds` splits, and the share of held-out halves
    that stayed within `max_wrong`. Tuned on a few dozen messages, a threshold looks better than it is: this is
    the estimate to quote beside the tuned number."""
    if len(records) < 4:
        return None
    rng = random.Random(seed)
    held = []
    for _ in range(rounds):
        order = rng.sample(records, len(records))
        halves = order[:len(order) // 2], order[len(order) // 2:]
        for tune, test in (halves, halves[::-1]):
            best, best_auto = float("inf"), -1
            for t in sorted({r["confidence"] for r in tune}) + [float("inf")]:
                c = _at_threshold(tune, t)
                if c["wrong"] <= max_wrong * c["auto"] and c["auto"] > best_auto:
                    best, best_auto = t, c["auto"]
            held.append(_at_threshold(test, best) | {"n": len(test)})

    def mean(f) -> float:
        values = [f(c) for c in held]
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None
    return {"auto_resolved": mean(lambda c: c["auto"] / c["n"]),
            "wrong_reply_rate": mean(lambda c: c["wrong"] / c["auto"] if c["auto"] else None),
            "handoff_precision": mean(lambda c: c["right_handoffs"] / c["handed"] if c["handed"] else None),
            "handoff_recall": mean(lambda c: c["right_handoffs"] / c["escalate"] if c["escalate"] else None),
            "halves_within": mean(lambda c: c["wrong"] <= max_wrong * c["auto"]), "rounds": rounds}
