"""EleutherAI lm-evaluation-harness support: the slmkit model type (adapter.py) and its registry hook (hook.py)."""
