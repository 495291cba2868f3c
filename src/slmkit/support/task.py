"""The support evaluation as an `slm eval` task kind (`support`), so the report card shows intent_accuracy,
handoff_precision, handoff_recall, auto_resolved and wrong_reply_rate beside the other tasks.

    name: support
    kind: support
    data: messages.dev.jsonl            # ../shared/data/support's format (support/evaluate.py)
    kb: support-kb                      # `slm kb index help-center/ -o support-kb`
    intents: support-intents.json       # descriptions JSON or a classifier directory (`slm classify train`)
    catalogue: catalogue.csv            # optional

The model under evaluation writes the replies (its answer first, the quoted articles after it, as in `slm support
eval --model`); each message is its own conversation, and hand-offs go to an in-memory ticket list (an
evaluation answers nobody). Support sits above eval in the layers (it uses eval's metrics), so eval cannot import
it: the harness calls `register` by name (the "slmkit.task_kinds" entry point in pyproject.toml) the first time a
support task runs; importing the module registers the kind too.
"""

from __future__ import annotations

from slmkit.eval import metrics as M
from slmkit.eval.harness import register_kind
from slmkit.support.assistant import MIN_CONFIDENCE, SupportAssistant
from slmkit.support.evaluate import message_record, support_metrics, tallies
from slmkit.support.intents import load_intents

_ASSISTANTS: dict = {}  # one knowledge base and intent model per task and LM, not one per batch


class _Tickets:
    """A hand-off queue that keeps the tickets in memory: the evaluation counts hand-offs, nobody answers them."""

    def __init__(self):
        self.tickets: list[dict] = []

    def submit(self, **request) -> str:
        self.tickets.append(request)
        return f"eval-{len(self.tickets)}"


def _assistant(lm, task) -> SupportAssistant:
    key = (task.name, task.kb, task.intents, task.catalogue, task.min_similarity, task.min_confidence, id(lm))
    if key not in _ASSISTANTS:
        from slmkit.kb.catalogue import load_catalogue
        from slmkit.kb.index import open_kb
        kb = open_kb(task.kb)
        _ASSISTANTS[key] = SupportAssistant(
            kb, load_intents(task.intents, kb.embedder), queue=_Tickets(), lm=lm,
            catalogue=load_catalogue(task.catalogue) if task.catalogue else None, mode=task.retrieval,
            min_similarity=task.min_similarity,
            min_confidence=MIN_CONFIDENCE if task.min_confidence is None else task.min_confidence,
            sources=task.sources, max_new_tokens=task.max_new_tokens)
    return _ASSISTANTS[key]


def run_support(lm, task, items, **_) -> list[dict]:
    assistant = _assistant(lm, task)
    return [message_record(assistant, item) for item in items]


def score_support(task, records, samples):
    """The five numbers as rates with intervals (those nothing was counted for are left out); the rest of `slm
    support eval`'s results.json (recall by reason, article hit@k, the threshold sweeps) as details."""
    out = {name: M.proportion(count, n) for name, (count, n) in tallies(records).items()
           if n or name == task.main_metric}
    return out, support_metrics(records)


def register() -> None:
    """Plug the `support` kind into the harness (the "slmkit.task_kinds" entry point calls this)."""
    register_kind("support", run_support, score_support)


register()
