"""Classifiers on a language model: a linear head on its hidden state (head.py) and PET cloze patterns (pet.py)."""
