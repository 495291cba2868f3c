"""One interface for every language model (base.py) and its backends; `load_lm` (resolve.py) opens any model
argument a user gives."""

from slmkit.lm.base import LM, LogProbs, Score
from slmkit.lm.resolve import BACKENDS, WEIGHTS, generation_backend, load_lm

__all__ = ["BACKENDS", "LM", "LogProbs", "Score", "WEIGHTS", "generation_backend", "load_lm"]
