"""The quickstart corpus: this Python's own standard library source (every install has it, no download), and a
fixed sample of its test files that training never sees.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

STDLIB_EXCLUDE = ["*/test/*", "*/tests/*", "*/idle_test/*", "*/site-packages/*", "*/__pycache__/*"]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def unseen_code_sample(n_files: int = 40, seed: int = 0, start: int = 0) -> list[Path]:
    """Python files the model never trains on: a fixed sample of the stdlib's own test suite (`start` skips the
    first files of the fixed order, for samples that do not overlap)."""
    test_dir = stdlib_dir() / "test"
    files = sorted(p for p in test_dir.glob("test_*.py") if p.is_file())
    random.Random(seed).shuffle(files)
    return sorted(files[start:start + n_files])

