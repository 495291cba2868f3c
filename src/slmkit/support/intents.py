"""Intent without training data: the message's embedding against each intent's description (zero-shot), for a
team that has written down its intents but labelled no messages yet. With labelled messages, train a classifier
(`slm classify train`) and give its directory instead: anything with `predict(texts) -> [(label, confidence)]`
serves.

    intents = DescribedIntents(load_embedder("minilm-l6-v2"), {"shipping": "zones, costs, delivery options", ...})
    intents.predict(["How much is delivery to Norway?"])   # [("shipping", 0.41)]

The confidence is a softmax over the cosine similarities at a temperature of 0.05 (sharp enough that the
best-matching description dominates; not calibrated: a trained classifier's temperature-scaled confidence is).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class DescribedIntents:
    def __init__(self, embedder, descriptions: dict[str, str], temperature: float = 0.05):
        if not descriptions:
            raise ValueError("no intents: give at least one {label: description}")
        self.labels = list(descriptions)
        self.embedder, self.temperature = embedder, temperature
        self._vectors = embedder.embed([f"{label.replace('_', ' ')}: {text}" for label, text in descriptions.items()])

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        sims = self.embedder.embed(texts) @ self._vectors.T
        probs = torch.softmax(sims / self.temperature, dim=-1)
        conf, idx = probs.max(dim=-1)
        return [(self.labels[int(i)], float(c)) for i, c in zip(idx, conf, strict=True)]


def read_descriptions(path: str | Path) -> dict[str, str]:
    """{label: description} from a JSON object file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such intents file (a JSON object: intent -> description)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path}: must be a JSON object mapping each intent to its description (strings)")
    return data


def load_intents(spec: str | Path | None, embedder):
    """The intent model `spec` names: a classifier directory (`slm classify train`), or a JSON file of intent
    descriptions read zero-shot with `embedder`."""
    if not spec:
        raise ValueError("give the intents: a classifier directory (`slm classify train`) or a JSON file of intent "
                         "descriptions (e.g. examples/support-intents.json)")
    path = Path(spec)
    if path.is_dir():
        from slmkit.classify.head import Classifier
        return Classifier.load(path)
    return DescribedIntents(embedder, read_descriptions(path))
