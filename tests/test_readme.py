"""The README's commands, run: documented commands cannot rot.

README.md is read when the test runs. Every command of its ```bash blocks (`\\` continuations joined, comments
dropped) is either run through the CLI, in README order and with the names the README uses, or listed in
NOT_RUN with the reason; a command that is neither fails the test, so a new README command must be handled here.

The commands run in a temporary working directory that holds what they expect to find (WORLD_FILES: docs/, a
tickets.jsonl, chat records, ...), with $SLMKIT_CACHE pointing at a cache in which `smollm2-135m-instruct` and
the benchmarks are tiny stand-ins (so no 135M model runs and nothing is downloaded). Budgets and lengths are cut
to tiny by appending TINY options (a later option wins over the README's) and by REWRITES; both are keyed by
command, not by README line, so a new command of a known kind needs nothing new here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent

# Commands the test cannot run, by the words they start with, and why.
NOT_RUN = {
    ("make", "demo"): "creates a virtualenv and trains for 10 minutes; `slm quickstart` is tests/test_quickstart.py",
    ("make", "test"): "the whole test suite, this test included",
    ("torchrun",): "launches DDP / FSDP worker processes; tests/test_train.py runs both",
    ("slm", "train", "--objective", "mlm"): "TINY's decoder shape (--set n_kv_heads=...) is no encoder's; "
                                            "tests/test_mlm.py runs `slm train --objective mlm` on a tiny encoder",
    ("slm", "serve"): "a server that runs until stopped; tests/test_serve.py serves the same app",
    ("slm", "plan"): "measures the machine first (a minute of micro-benchmarks); tests/test_plan.py runs the "
                     "command on a given calibration and the calibration itself on quick shapes",
    ("slm", "quickstart", "vision"): "trains for 8 minutes; tests/test_vision.py runs run_vision_quickstart on tiny "
                                     "shapes and a few steps",
    ("slm", "generate", "runs/quickstart-vision/model"): "asks the model `slm quickstart vision` trains; "
                                                         "tests/test_vision.py runs generate --image on a tiny one",
    ("slm", "quickstart"): "prepares the whole standard library first (minutes); tests/test_quickstart.py runs it",
    ("slm", "generate", "http://localhost:8080/v1"): "needs an OpenAI-compatible server on port 8080; "
                                                     "tests/test_remote_lm.py runs the remote backend",
    ("slm", "generate", "--large"): "needs a small base/tuned pair with SmolLM2's tokenizer (benchmarks/upscale.py "
                                    "builds it); tests/test_upscale.py runs the command on tiny models",
    ("lm_eval",): "runs hellaswag from the Hugging Face hub; tests/test_lm_eval_adapter.py runs lm-eval offline",
    ("python", "-m", "slmkit.eval.lm_eval.adapter", "--install-hook"): "writes a .pth file into this "
                                                                       "environment's site-packages",
}

# README commands that fail today, by their first words: run anyway, and reported as expected failures. One that
# starts to pass fails the test, so the entry gets removed.
KNOWN_FAILURES: dict[tuple[str, ...], str] = {}

# Two optimizer steps on tiny batches, in fp32 (bf16 is slow on CPUs without native support, which `auto` may pick).
BUDGET = ["--max-steps", "2", "--batch-size", "2", "--precision", "fp32"]
# A tiny shape for models trained from scratch (the README's own --set values still have to parse).
SHAPE = ["--set", "dim=32", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2",
         "--set", "hidden_dim=64"]
# --no-compile: compiling takes minutes on 2 cores, and --no-compile still proves that the flag exists
TRAIN = ["--seq-len", "32", "--eval-every", "0", "--no-compile"]
# Appended to every command of a kind (its first words after `slm`): a later option wins over the README's.
TINY = {
    ("train",): [*BUDGET, *SHAPE, *TRAIN],
    ("distill",): [*BUDGET, "--seq-len", "32", "--on-policy-tokens", "8"],
    ("finetune",): [*BUDGET, "--seq-len", "64"],
    ("teacher-cache",): ["--seq-len", "32"],
    ("eval-fim",): ["--limit", "3", "--max-new-tokens", "8"],
    ("teacher-text",): ["--seq-len", "32", "--prompt-tokens", "8", "--max-tokens", "128"],
    ("synth",): ["--max-new-tokens", "16"],
    ("generate",): ["--max-new-tokens", "8"],
    ("chat",): ["--max-new-tokens", "8"],
    ("kb", "ask"): ["--max-new-tokens", "8"],
    ("embed-train",): ["--max-steps", "1", "--batch-size", "2", "--max-length", "16"],
    ("rerank-train",): ["--max-steps", "1", "--batch-size", "2", "--max-length", "32", "--negatives", "1"],
    ("kb", "eval"): ["--max-new-tokens", "8"],
    ("kb", "synth"): ["--n", "3", "--max-new-tokens", "8"],
    # --no-efficiency: measuring speed and memory starts a fresh process per model (~10 s each on 2 cores);
    # tests/test_eval.py runs it
    ("eval",): ["--limit", "1", "--no-efficiency"],
    ("classify", "train"): ["--epochs", "2"],
    ("classify", "prune"): ["--epochs", "1", "--generations", "1", "--population", "4"],
}
# Rewrites of single words: (the option the word follows, or None for any word; pattern; replacement, None to drop
# the word; why).
REWRITES = [
    (None, r"^\.\.\.$", None, "the README elides the rest of the options; TINY supplies a budget"),
    ("--tasks", r"(?<=limit=)\d+", "1", "per-task limits"),
    ("--tasks", r"[^,]+", r"\g<0>:max_new_tokens=8", "a tiny random model never stops before the task's length"),
]
# Options that need an optional extra: without it installed the command is not run (`make test` installs all).
EXTRAS = {("--backend", "llamacpp"): "llama_cpp", ("--format", "onnx"): "onnxscript"}
# What stdin holds for an interactive command.
STDIN = {("chat",): "hello\n/exit\n", ("support", "chat"): "How much is shipping?\nI want a real person\n"}
# Shell variables the README uses, relative to the working directory.
VARIABLES = {"LIB": "lib", "KEY": "test-key"}

STAND_IN = "smollm2-135m-instruct"  # the pulled model the README uses, here a tiny slmkit model
TEXT = ("def parse_args(argv):\n    return [a for a in argv if a]\n\n\nclass Config:\n    name = 'tiny'\n\n"
        "What is the capital of France? The capital of France is Paris.\n")


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(the command as the README writes it, its words) for each command in the ```bash blocks."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1]
                continue
            line, pending = pending + line, ""
            words = shlex.split(line, comments=True)
            if words:
                commands.append((shlex.join(words), words))
    return commands


def _match(table: dict, words: list[str]):
    """The entry of `table` whose key the words start with (longest first), or None."""
    for key in sorted(table, key=len, reverse=True):
        if tuple(words[:len(key)]) == key:
            return key
    return None


def _has_pair(argv: list[str], pair: tuple[str, str]) -> bool:
    return any(tuple(argv[i:i + 2]) == pair for i in range(len(argv) - 1))


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _kind(words: list[str]) -> tuple[str, ...]:
    return tuple(words[1:3]) if words[1] in ("data", "classify", "kb", "support") else (words[1],)


def _expand(word: str) -> str:
    def value(m):
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"the README uses ${name}: give it a tiny value in VARIABLES")
        return VARIABLES[name]
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", value, word)


def tiny_argv(words: list[str]) -> list[str]:
    """The arguments to run a README `slm` command with (after `slm`)."""
    argv = []
    for before, word in zip(words, words[1:], strict=False):
        word = _expand(word)
        for option, pattern, replacement, _why in REWRITES:
            if option in (None, before) and re.search(pattern, word):
                word = None if replacement is None else re.sub(pattern, replacement, word)
            if word is None:
                break
        if word is not None:
            argv.append(word)
    kind = _match(TINY, list(_kind(words)))
    if kind == ("train",) and {"--init", "--init-from"} & set(words):
        return argv + [*BUDGET, *TRAIN]  # a continued model keeps its shape: no SHAPE
    return argv + (TINY[kind] if kind else [])


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) > 20, "no ```bash blocks found: has the README's format changed?"
    unhandled = [text for text, words in commands if not _match(NOT_RUN, words) and words[0] != "slm"]
    assert not unhandled, f"README commands neither run nor listed in NOT_RUN: {unhandled}"
    for _, words in commands:
        if words[0] == "slm" and not _match(NOT_RUN, words):
            tiny_argv(words)  # every shell variable has a value


# --- the world the commands expect ---------------------------------------------------------------------------

def _stand_in_model(path: Path, tokenizer, provenance: dict | None = None) -> Path:
    import dataclasses

    import torch

    from slmkit.formats.hf_dir import save_model_dir
    from slmkit.model.config import model_config
    from slmkit.model.llama import Transformer
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        model_config("nano", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=256),
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id)
    return save_model_dir(Transformer(cfg).eval(), path, tokenizer, provenance=provenance)


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _prose(i: int) -> str:
    words = ["model", "data", "token", "small", "train", "byte", "loss", "step", "code", "text", "run", "fast"]
    return " ".join(words[(i * 7 + j * 3) % len(words)] + str((i * j) % 11) for j in range(90)) + ".\n"


INTENTS = {"play_music": ["Play some jazz by Miles Davis", "Put on my running playlist", "Play the new album"],
           "get_weather": ["Will it rain in Paris tomorrow", "What is the weather like today", "Is it cold outside"]}


def _intent_rows():
    return [{"text": t, "label": label} for label, texts in INTENTS.items() for t in texts]


WORLD_FILES = {  # what the README's commands read, by the names they use
    "docs/guide.md": lambda: "# Guide\n\n" + "".join(_prose(i) for i in range(6)),
    "docs/api/reference.md": lambda: "# Reference\n\nWrite to ops@example.com.\n" + "".join(_prose(i) for i in
                                                                                            range(6, 12)),
    "tickets.jsonl": lambda: [{"body": f"Ticket {i}: " + _prose(20 + i)} for i in range(8)],
    "chat.jsonl": lambda: [{"messages": [{"role": "user", "content": f"Say {w}"},
                                         {"role": "assistant", "content": w}]} for w in ("yes", "no", "maybe", "ok")],
    "train.jsonl": _intent_rows,
    "dev.jsonl": _intent_rows,
    "few.jsonl": _intent_rows,
    "questions.jsonl": lambda: [  # kb-python's format, for `slm kb eval`
        {"id": "q1", "question": "Where do I write?", "answer": "ops@example.com", "answer_keywords": ["ops@"],
         "topics": ["reference"], "answerable": True},
        {"id": "q2", "question": "How tall is the moon?", "answer": "", "answer_keywords": [], "topics": [],
         "answerable": False}],
    "help-center/shipping.md": lambda: "# Shipping\n\nShipping to Norway costs €19.95 and takes 5-8 days.\n",
    "help-center/returns.md": lambda: "# Returns\n\nReturn any product within 30 days for a refund.\n",
    "messages.jsonl": lambda: [  # ../shared/data/support's format, for `slm support eval`
        {"id": "m1", "message": "How much is shipping to Norway?", "intent": "shipping",
         "answer_articles": ["shipping.md"], "answer_keywords": ["€19.95"], "escalate": False, "escalate_reason": ""},
        {"id": "m2", "message": "Can I talk to a real person?", "intent": "other", "answer_articles": [],
         "answer_keywords": [], "escalate": True, "escalate_reason": "asks_for_human"}],
    "catalogue.csv": lambda: (  # the marketing writer's catalogue
        "sku,name,category,price_eur,key_features,warranty_years,in_stock\n"
        "KB-PRO2,Kettleby Pro 2 espresso machine,espresso_machine,649.00,58 mm portafilter; steam wand,2,true\n"
        "KB-BN-HOUSE,House Espresso blend 1 kg,coffee,27.90,whole beans; medium-dark roast,0,true\n"
        "KB-TMP58,Calibrated tamper 58 mm,accessory,39.00,58 mm flat base; fits Pro 2,2,true\n"
        "KB-KNK,Knock box,accessory,29.00,removable rubber knock bar,1,true\n"),
    "brand-emails.jsonl": lambda: [  # the brand's own copy, for `slm brand-records` (its catalogue above)
        {"sku": "KB-PRO2", "subject": "Meet the Pro 2", "body": "Dear coffee lovers,\n\nThe Kettleby Pro 2 espresso "
         "machine has a 58 mm portafilter and a steam wand. This spring, 10% off everything with code SPRING10."}],
    "new.jsonl": lambda: [{"text": "Play something relaxing"}, {"text": "Do I need an umbrella"}],
    "problems.jsonl": lambda: [{"text": "Tom has 3 apples and buys 2 more. How many apples does he have?",
                                "answer": "5"}, {"text": "A box holds 4 pens. How many pens are in 2 boxes?",
                                                 "answer": "8"}],
    "lib/pkg/__init__.py": lambda: TEXT * 8,
    "lib/pkg/util.py": lambda: "".join(f"def f{i}(x):\n    return x * {i}\n\n\n" for i in range(60)),
    "lib/tools.py": lambda: "".join(f"class C{i}:\n    value = {i}\n\n\n" for i in range(60)),
}

BENCHMARKS = {  # the records slmkit.eval.benchmarks writes, a few each
    "mmlu": [{"id": f"anatomy/{i}", "subject": "anatomy", "question": f"Question {i}?",
              "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(4)],
    "gsm8k": [{"id": f"gsm8k/{i}", "question": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}",
               "answer": str(2 * i)} for i in range(4)],
    "humaneval": [{"id": f"HumanEval/{i}", "prompt": f"def add{i}(x):\n    \"\"\"x + {i}\"\"\"\n",
                   "canonical_solution": f"    return x + {i}\n", "entry_point": f"add{i}",
                   "test": f"def check(f):\n    assert f(1) == {1 + i}\n"} for i in range(4)],
}


def _example_file(rel: str, commands: list[list[str]]) -> None:
    """A README-named file of examples/ as the repository has it, reading tiny data instead of ../shared/data."""
    if rel.endswith(".json"):  # plain data (the support intents): as it is
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_text((REPO / rel).read_text(encoding="utf-8"), encoding="utf-8")
        return
    spec = yaml.safe_load((REPO / rel).read_text(encoding="utf-8"))
    path = Path(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "source" in spec:  # an instruction mixture: every task the commands name or hold out, plus two to train on
        words = [w for c in commands for w in c]
        named = {m for w in words for m in re.findall(r"heldout/(\w+)\.yaml", w)}
        globs = list(spec.get("holdout") or []) + [g for c in commands for i, w in enumerate(c[:-1])
                                                   if w == "--holdout-tasks" for g in c[i + 1].split(",")]
        tasks = sorted(named | {g.replace("*", "x") for g in globs} | {"subtask001_tiny_copy", "subtask002_tiny_say"})
        _write_jsonl(path.parent / "instructions.jsonl",
                     [{"task": t, "instruction": "Repeat the word.", "input": w, "output": w, "explanation": "Copy it."}
                      for t in tasks for w in ("red", "blue", "green", "black")])
        spec.update(source="instructions.jsonl", eval_per_task=2)
    if "data" in spec:  # a task file: records of its labels
        labels = spec.get("labels") or ["yes", "no"]
        rows = [{"text": f"request {i} about {label}", "label": label} for label in labels for i in range(2)]
        for key in ("data", "fewshot_data"):
            if key in spec:
                _write_jsonl(path.parent / f"{Path(rel).stem}-{key}.jsonl", rows)
                spec[key] = f"{Path(rel).stem}-{key}.jsonl"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def build_world(root: Path, commands: list[list[str]]) -> None:
    """Everything the commands expect to exist, under the working directory `root` and $SLMKIT_CACHE."""
    from slmkit.hub import SOURCE_RECORD, SOURCES, cache_dir, source_dir
    from slmkit.recipes.convert import export_model
    from slmkit.tokenizer import train_tokenizer
    for rel, content in WORLD_FILES.items():
        value = content()
        if isinstance(value, list):
            _write_jsonl(root / rel, value)
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(value, encoding="utf-8")
    for rel in sorted({m for c in commands for w in c for m in re.findall(r"(?<![\w/])examples/[\w/.-]+", w)}):
        _example_file(rel, commands)

    # the pulled model: tiny, instruction-tuned like SmolLM2-135M-Instruct, in the layout `slm pull` leaves
    texts = [TEXT * 4, *(_prose(i) for i in range(20)), *(f"{t} music weather" for ts in INTENTS.values() for t in ts)]
    tok = train_tokenizer(texts * 2, vocab_size=512)
    model_dir = _stand_in_model(source_dir(STAND_IN), tok, {"instruction_tuned": True})
    (model_dir / SOURCE_RECORD).write_text(json.dumps({"name": STAND_IN, "kind": "model"}))
    # the GGUF file `slm import` is shown with, and the quickstart's model that `make demo` leaves
    for word in {w for c in commands for w in c if w.endswith(".gguf") and c[1] == "import"}:
        quant = re.search(r"\.(Q\d_\d|Q8_0|F16|F32)\.gguf$", word, flags=re.I)
        export_model(model_dir, root / word, fmt="gguf", quant=quant.group(1).lower() if quant else "f32")
    _stand_in_model(root / "runs" / "quickstart" / "run" / "model", tok)
    _stand_in_encoder(source_dir("minilm-l6-v2"))
    for name, records in BENCHMARKS.items():
        assert SOURCES[name].kind == "dataset"
        _write_jsonl(cache_dir() / "datasets" / name / "test.jsonl", records)
        (cache_dir() / "datasets" / name / SOURCE_RECORD).write_text(json.dumps({"name": name, "kind": "dataset"}))


def _stand_in_encoder(path: Path) -> None:
    """A tiny BERT in the layout `slm pull minilm-l6-v2` leaves: WordPiece with [CLS]/[SEP] added by tokenizer.json."""
    from conftest import write_wordpiece

    from slmkit.formats.encoder_dir import save_encoder_dir
    from slmkit.hub import SOURCE_RECORD
    from slmkit.model.encoder import Encoder, EncoderConfig
    from slmkit.tokenizer import load_tokenizer
    words = sorted({w.strip("?.,").lower() for w in (TEXT + " " + " ".join(_prose(i) for i in range(5))).split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "?", ".", ","])}
    write_wordpiece(path, vocab)
    model = Encoder(EncoderConfig(vocab_size=len(vocab), dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                  max_positions=64))
    save_encoder_dir(model, path, tokenizer=load_tokenizer(path / "tokenizer.json"))
    (path / SOURCE_RECORD).write_text(json.dumps({"name": "minilm-l6-v2", "kind": "embedding"}))


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slmkit.cli import app
    commands = readme_commands(README.read_text(encoding="utf-8"))
    to_run = [(text, words) for text, words in commands if words[0] == "slm" and not _match(NOT_RUN, words)]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    build_world(work, [[_expand(w) for w in words] for _, words in to_run])

    runner = CliRunner()
    failures, expected, not_run = [], [], []
    for text, words in to_run:
        argv = tiny_argv(words)
        missing = [module for pair, module in EXTRAS.items() if _has_pair(argv, pair) and not _importable(module)]
        if missing:
            not_run.append(f"{text} (needs {', '.join(missing)})")
            continue
        result = runner.invoke(app, argv, input=STDIN.get(_match(STDIN, list(_kind(words)))))
        problem = None
        if result.exit_code != 0:
            lines = [line.strip(" │╭╮╰╯─") for line in result.output.splitlines()]  # typer's error box too
            problem = ([line for line in lines if line] or [repr(result.exception)])[-1]
        else:
            written = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("-o", "--out")]
            if not all(Path(p).exists() for p in written):
                problem = f"exited 0 but did not write {written}"
        known = _match(KNOWN_FAILURES, words)
        if problem:
            line = f"{text}\n    ran: slm {shlex.join(argv)}\n    -> {problem}"
            (expected if known else failures).append(line + (f"\n    known: {KNOWN_FAILURES[known]}" if known else ""))
        elif known:
            failures.append(f"{text}\n    passes now: remove it from KNOWN_FAILURES")
    assert not failures, "README commands that fail:\n" + "\n".join(failures)
    if expected:
        pytest.xfail("known README failures:\n" + "\n".join(expected))
    if not_run:
        pytest.skip("README commands not run, an optional extra is missing: " + "; ".join(not_run))
