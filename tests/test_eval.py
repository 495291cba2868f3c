"""The evaluation harness: task files, every task kind, best-of-n, resume, the report card and `slm eval`."""

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import tiny_model_dir

from slmkit.eval import metrics as M
from slmkit.eval.harness import build_prompt, doctest_program, evaluate
from slmkit.eval.tasks import Task, fewshot_examples, load_task, select
from slmkit.lm.base import LM
from slmkit.sampling import SamplingParams
from slmkit.tokenizer import train_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\nThe capital of France is Paris.\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([TEXT] * 30, vocab_size=300)
    torch.manual_seed(0)  # a module fixture runs before the per-test seed: seed its initialisation here
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", tok, train_on=TEXT, steps=120)


@pytest.fixture(scope="module")
def lm(model_dir):
    from slmkit.lm import load_lm
    return load_lm(str(model_dir))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHOICE_ITEMS = [
    {"question": "The capital of France is", "choices": ["Paris.", "Rome.", "a b c"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a * b * b * a"], "answer": 0},
    {"question": "print(add(2,", "choices": [" 3))", " 7))", " q"], "answer": 0},
    {"question": "The capital", "choices": [" of France", " city"], "answer": 1},
]


# --- metrics ---------------------------------------------------------------------------------------------------

def test_wilson_interval_and_numeric_answers():
    m = M.proportion(8, 10)
    assert m.value == 0.8 and m.low == pytest.approx(0.4902, abs=1e-3) and m.high == pytest.approx(0.9433, abs=1e-3)
    assert M.proportion(0, 5).low == 0 and M.proportion(5, 5).high == 1
    assert M.extract_number("so 3 + 4 = 7 apples.\n#### 1,200") == "1200"
    assert M.extract_number("The answer is $18.00.") == "18"
    assert M.extract_number("we get 5 and then -2.5") == "-2.5"
    assert M.extract_number("no digits") is None
    assert M.normalize_text("  Paris. ") == "paris"
    assert M.extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"


def test_classification_report_counts():
    r = M.classification_report(["a", "a", "b", "c"], ["a", "b", "b", "a"], ["a", "b", "c"])
    assert r["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert r["accuracy"].value == 0.5
    assert r["per_class"]["b"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert r["macro_f1"].value == pytest.approx((0.5 + 2 / 3 + 0) / 3)


def test_bootstrap_ratio_is_seeded_and_brackets_the_value():
    a = M.ratio_of_sums([1, 2, 3, 10], [2, 2, 2, 2])
    assert a.value == 2.0 and a.low < 2.0 < a.high and a == M.ratio_of_sums([1, 2, 3, 10], [2, 2, 2, 2])


# --- task files ------------------------------------------------------------------------------------------------

def test_task_files_yaml_and_jsonl(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", CHOICE_ITEMS)
    (tmp_path / "mc.yaml").write_text("name: mc\nkind: choice\ndata: mc.jsonl\nprompt: 'Q: {question}'\n")
    task = load_task(tmp_path / "mc.yaml")
    assert task.kind == "choice" and len(task.items) == 4 and task.render(task.items[0]).startswith("Q: The")
    assert load_task(data).kind == "choice"  # guessed from the fields
    write_jsonl(tmp_path / "cls.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    cls = load_task(tmp_path / "cls.jsonl")
    assert cls.kind == "classify" and cls.labels == ["a", "b"] and cls.verbalizers == {"a": "a", "b": "b"}


def test_bad_task_files_name_the_line_and_field(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_task(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "idx.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(ValueError, match=r"idx.jsonl:1: `answer` must be the index"):
        load_task(tmp_path / "idx.jsonl")
    (tmp_path / "t.yaml").write_text("kind: choice\ndata: idx.jsonl\nprompts: x\n")
    with pytest.raises(ValueError, match="unknown task field.*prompts"):
        load_task(tmp_path / "t.yaml")
    write_jsonl(tmp_path / "tpl.jsonl", CHOICE_ITEMS)
    task = load_task(tmp_path / "tpl.jsonl", prompt="{missing}")
    with pytest.raises(ValueError, match="field 'missing'"):
        task.render(task.items[0])
    with pytest.raises(FileNotFoundError, match="not a built-in task"):
        load_task("no-such-task")


def test_subsets_and_fewshot_are_seeded_and_never_include_the_item():
    items = [{"id": str(i), "question": f"q{i}", "answer": str(i), "g": i % 2} for i in range(30)]
    assert select(items, 5, seed=1) == select(items, 5, seed=1) != select(items, 5, seed=2)
    assert [x["id"] for x in select(items, 5, 1)] == sorted([x["id"] for x in select(items, 5, 1)], key=int)
    task = Task("t", "generate", items, num_fewshot=3, fewshot_group="g")
    for item in items:
        shots = fewshot_examples(task, item, seed=0)
        assert len(shots) == 3 and item not in shots and all(s["g"] == item["g"] for s in shots)
    # the same examples for every item of a group (a shared prefix), except where the item itself was drawn
    assert fewshot_examples(task, items[20], 0) == fewshot_examples(task, items[22], 0) or \
        items[20] in fewshot_examples(task, items[22], 0) or items[22] in fewshot_examples(task, items[20], 0)


def test_raw_and_chat_prompts(lm):
    items = [{"id": "1", "question": "2+2?", "answer": "4"}, {"id": "2", "question": "3+3?", "answer": "6"}]
    task = Task("t", "generate", items, prompt="Q: {question}\nA:", num_fewshot=1, preamble="Arithmetic.\n\n",
                system="Be brief.")
    assert build_prompt(task, items[0], 0, chat=False) == "Arithmetic.\n\nQ: 3+3?\nA: 6\n\nQ: 2+2?\nA:"
    messages = build_prompt(task, items[0], 0, chat=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Arithmetic.\n\nQ: 3+3?\nA:" and messages[2]["content"] == "6"


# --- task kinds on a real (tiny) model ----------------------------------------------------------------------------

def test_score_many_batches_exactly_like_one_at_a_time(lm):
    pairs = [(it["question"], " " + c) for it in CHOICE_ITEMS for c in it["choices"]]
    batched = lm.score_many(pairs)
    for (ctx, cont), s in zip(pairs, batched, strict=True):
        one = lm.score(ctx, cont)
        assert s.logprob == pytest.approx(one.logprob, abs=1e-4) and s.is_greedy == one.is_greedy


def test_multiple_choice_acc_and_acc_norm_follow_their_definitions(lm):
    task = Task("mc", "choice", [dict(x) for x in CHOICE_ITEMS])
    result = evaluate(lm, task, progress=False)
    acc = acc_norm = 0
    for item in CHOICE_ITEMS:
        lps = [lm.score(item["question"], " " + c).logprob for c in item["choices"]]
        acc += int(np.argmax(lps)) == item["answer"]
        acc_norm += int(np.argmax([lp / len(c) for lp, c in zip(lps, item["choices"], strict=True)])) == item["answer"]
    assert result.metrics["acc"].value == acc / 4 and result.metrics["acc_norm"].value == acc_norm / 4
    assert result.metrics["acc"].n == 4 and result.metrics["acc"].low <= result.metrics["acc"].value


def test_perplexity_scores_every_token_once_whatever_the_stride(lm):
    text = TEXT * 6  # longer than the tiny model's 64-token window
    task = Task("ppl", "perplexity", [{"id": "d", "text": text}])
    n_tokens = len(lm.tokenizer.encode(text))
    results = [evaluate(lm, Task("ppl", "perplexity", [{"id": "d", "text": text}], stride=s), progress=False)
               for s in (8, 32, 63)]
    for r in results:
        assert r.records[0]["tokens"] == n_tokens and r.records[0]["bytes"] == len(text.encode())
    bpb = [r.metrics["bits_per_byte"].value for r in results]
    assert all(math.isfinite(b) for b in bpb) and bpb[0] <= bpb[2] + 0.05  # more context never hurts much
    short = Task("ppl", "perplexity", [{"id": "s", "text": TEXT}])
    r = evaluate(lm, short, progress=False)
    ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(TEXT)
    expected = -float(lm.logprobs(ids).token_logprobs.sum()) / math.log(2) / len(TEXT.encode())
    assert r.metrics["bits_per_byte"].value == pytest.approx(expected, rel=1e-5)
    del task


def test_model_bits_per_byte_scores_every_token_once_in_sliding_windows(lm):
    from slmkit.eval.perplexity import text_bits_per_byte, token_bits_per_byte
    model, tok = lm.model, lm.tokenizer
    docs = [tok.encode(TEXT * 5, add_bos=True), tok.encode(TEXT, add_bos=True)]
    n_bytes = len((TEXT * 6).encode())
    runs = [token_bits_per_byte(model, docs, n_bytes, seq_len=32, stride=s) for s in (32, 16, 5)]
    assert {r["tokens"] for r in runs} == {sum(len(d) - 1 for d in docs)}  # bos is context, never scored
    assert runs[1]["bits_per_byte"] != runs[0]["bits_per_byte"]  # the overlap changes the context
    with torch.no_grad():  # a document within one window: exactly the full forward's loss
        logits = model(torch.tensor([docs[1][:-1]]))[0]
        nats = torch.nn.functional.cross_entropy(logits, torch.tensor(docs[1][1:]), reduction="sum").item()
    one = token_bits_per_byte(model, [docs[1]], len(TEXT.encode()), seq_len=64, stride=16)
    assert one["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert text_bits_per_byte(model, tok, [TEXT], seq_len=64)["bits_per_byte"] == pytest.approx(one["bits_per_byte"])
    with pytest.raises(ValueError, match="stride"):
        token_bits_per_byte(model, docs, n_bytes, seq_len=32, stride=33)


def test_classification_with_fewshot_and_a_report(lm, tmp_path):
    items = [{"text": "The capital of France", "label": "geo"}, {"text": "def add(a, b)", "label": "code"},
             {"text": "print(add(2, 3))", "label": "code"}, {"text": "Paris", "label": "geo"}]
    task = Task("cls", "classify", items, prompt="{text}\nKind:", num_fewshot=2,
                verbalizers={"geo": "geography", "code": "python code"})
    r = evaluate(lm, task, progress=False)
    assert set(r.metrics) == {"accuracy", "macro_f1", "accuracy_sum_logprob"}
    assert sum(map(sum, r.details["confusion"])) == 4 and r.details["labels"] == ["code", "geo"]


class ScriptedLM(LM):
    """A fake LM whose answers are scripted per prompt and sample: tests the scoring, not a model."""

    name = "scripted"

    def __init__(self, answers):
        self.answers = answers  # prompt substring -> list of completions (one per sample)
        self.calls = 0

    def generate(self, prompts, params=None, heal=False):
        prompts = [prompts] if isinstance(prompts, str) else prompts
        self.calls += len(prompts)
        out = []
        for p in prompts:
            key = next(k for k in self.answers if k in p)
            options = self.answers[key]
            out.append(options[0] if params.temperature == 0 else options[params.seed % 1000 % len(options)])
        return out

    def generate_chat(self, messages, params=None):  # like RemoteLM: the server applies the chat template
        return self.generate(messages[-1]["content"], params)[0]

    def stream_ids(self, prompt_ids, params, first_allowed) -> Iterator[int]:
        raise NotImplementedError


GSM = [{"id": "a", "question": "Tom has 3 apples and buys 4.", "answer": "7"},
       {"id": "b", "question": "Half of 30?", "answer": "15"}]


def test_generation_numeric_scoring_and_best_of_n_by_vote():
    lm = ScriptedLM({"Tom": ["3+4=7. The answer is 7."] + ["It is 8"] * 3,
                     "Half": ["30/2 = 14"] + ["#### 15"] * 2 + ["about 16"]})
    task = Task("gsm", "generate", [dict(x) for x in GSM], scoring="numeric")
    greedy = evaluate(lm, task, progress=False)
    assert greedy.metrics["exact_match"].value == 0.5 and greedy.records[0]["extracted"] == ["7"]
    many = evaluate(lm, task, samples=4, progress=False)
    assert many.records[0]["extracted"] == ["7", "8", "8", "8"] and many.records[1]["extracted"][1:3] == ["15", "15"]
    assert many.metrics["best_of_1"].value == 0.5  # first samples: 7 (right), 14 (wrong)
    assert many.metrics["best_of_4"].value == 0.5  # vote: 8 (wrong), 15 (right)
    assert many.metrics["oracle_4"].value == 1.0


def test_best_of_n_by_verifier_picks_what_the_verifier_likes(lm):
    answers = {"capital": [" Rome.", " q q q", " Paris.", " Rome."]}
    items = [{"id": "c", "question": "The capital of France is", "answer": "Paris"}]
    task = Task("v", "generate", items, scoring="regex", pattern=r"(\w+)\.")
    r = evaluate(ScriptedLM(answers), task, samples=4, select_by="verifier", verifier=lm, progress=False)
    scores = r.records[0]["verifier"]
    assert len(scores) == 4 and scores[2] == max(scores)  # the tiny model was trained on "...France is Paris."
    assert r.metrics["best_of_4"].value == 1.0 and r.metrics["best_of_1"].value == 0.0


PROBLEM = {"id": "P/0", "entry_point": "double",
           "prompt": 'def double(x):\n    """Twice x.\n    >>> double(2)\n    4\n    """\n',
           "test": "def check(f):\n    assert f(3) == 6\n    assert f(-1) == -2\n"}


def test_code_pass_at_k_in_the_sandbox_and_selection_by_docstring_examples():
    right, wrong, loop = "    return 2 * x\n", "    return x + 2\n", "    while True:\n        pass\n"
    lm = ScriptedLM({"double": [wrong, loop, right, wrong]})
    task = Task("code", "code", [dict(PROBLEM)], prompt="{prompt}", timeout_s=2)
    greedy = evaluate(lm, task, progress=False)
    assert greedy.metrics["pass@1"].value == 0.0
    r = evaluate(lm, task, samples=4, select_by="execute", progress=False)
    assert r.records[0]["correct"] == [False, False, True, False]
    assert r.records[0]["status"][1] == "timeout"
    # x + 2 passes the docstring's example (double(2) == 4) but not the hidden tests: selection sees only examples
    assert r.records[0]["examples_pass"] == [True, False, True, True]
    assert r.metrics["pass@1"].value == pytest.approx(0.25) and r.metrics["best_of_4"].value == 0.0
    assert "sys.exit" not in doctest_program(PROBLEM["prompt"], right, "double")  # an early exit is a failure


def test_code_answers_that_exit_early_or_hide_in_a_main_block_fail():
    # wrong answers that used to pass: exit 0 before check() runs, or exit 0 from inside the function
    early = "    return x + 2\nimport sys\nsys.exit(0)\n"
    inside = "    import os\n    os._exit(0)\n"
    main_block = "    return x + 2\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n"
    right_with_main = "    return 2 * x\nif __name__ == '__main__':\n    raise SystemExit(0)\n"
    lm = ScriptedLM({"double": [early, inside, main_block, right_with_main]})
    task = Task("code", "code", [dict(PROBLEM)], prompt="{prompt}", timeout_s=5)
    r = evaluate(lm, task, samples=4, progress=False)
    assert r.records[0]["correct"] == [False, False, False, True]
    assert r.records[0]["error"][0].startswith("[slmkit sandbox] the program exited with code 0")


def test_code_tasks_refuse_without_the_network_namespace(monkeypatch):
    from slmkit.eval import sandbox
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation(network=False, tmpfs=False))
    monkeypatch.delenv("SLMKIT_ALLOW_UNSANDBOXED", raising=False)
    lm = ScriptedLM({"double": ["    return 2 * x\n"]})
    task = Task("code", "code", [dict(PROBLEM)], prompt="{prompt}", timeout_s=5)
    with pytest.raises(ValueError, match="--allow-unsandboxed"):
        evaluate(lm, task, progress=False)
    assert evaluate(lm, task, progress=False, allow_unsandboxed=True).metrics["pass@1"].value == 1.0


def test_chat_answers_with_a_code_block_are_run():
    reply = "Here it is:\n```python\ndef double(x):\n    return x * 2\n```"
    lm = ScriptedLM({"double": [reply]})
    r = evaluate(lm, Task("code", "code", [dict(PROBLEM)], prompt="{prompt}"), chat=True, progress=False)
    assert r.metrics["pass@1"].value == 1.0 and r.settings["chat"] is True


def test_resume_skips_finished_items(tmp_path):
    items = [{"id": str(i), "question": f"Half of {2 * i}?", "answer": str(i)} for i in range(6)]
    answers = {f"Half of {2 * i}?": [f"#### {i}"] for i in range(6)}
    records = tmp_path / "records.jsonl"

    class Crashing(ScriptedLM):
        def generate(self, prompts, params=None, heal=False):
            if self.calls >= 2:
                raise KeyboardInterrupt
            return super().generate(prompts, params)

    task = Task("half", "generate", items, scoring="numeric")
    with pytest.raises(KeyboardInterrupt):
        evaluate(Crashing(answers), task, records_file=records, batch=2, progress=False)
    assert len(records.read_text().splitlines()) == 2
    with open(records, "a") as f:
        f.write('{"id": "torn')  # a crash in the middle of a write
    again = ScriptedLM(answers)
    r = evaluate(again, task, records_file=records, batch=2, progress=False)
    assert again.calls == 4 and r.metrics["exact_match"].value == 1.0 and r.metrics["exact_match"].n == 6
    other = ScriptedLM(answers)  # different settings: nothing is reused
    evaluate(other, task, records_file=records, batch=2, seed=1, progress=False)
    assert other.calls == 6


# --- the report card ---------------------------------------------------------------------------------------------

def test_report_card_and_cli(model_dir, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app
    write_jsonl(tmp_path / "mc.jsonl", CHOICE_ITEMS)
    write_jsonl(tmp_path / "text.jsonl", [{"text": TEXT}, {"text": TEXT[::-1]}])
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks",
                                      f"{tmp_path / 'mc.jsonl'},{tmp_path / 'text.jsonl'}:stride=16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    model = data["models"][0]
    assert set(model["tasks"]) == {str(tmp_path / "mc.jsonl"), str(tmp_path / "text.jsonl") + ":stride=16"}
    eff = model["efficiency"]
    assert eff["parameters"] > 1000 and eff["decode_tokens_per_s"] > 0 and eff["peak_rss_bytes"] > 0
    assert eff["latency_p95_s"] >= eff["latency_p50_s"] > 0
    md = (out / "report.md").read_text()
    assert "| acc |" in md and "bits_per_byte" in md and "decode tokens/s" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "src=\"http" not in page
    assert (out / "quality_vs_speed.png").stat().st_size > 1000
    # --resume reuses every record; a bad option is a clear error
    again = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", str(tmp_path / "mc.jsonl"), "-o", str(out),
                                     "--resume", "--no-efficiency"])
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "python:limt=3", "-o", str(out)])
    assert bad.exit_code == 2 and "unknown task option 'limt'" in bad.output


def test_sampling_params_reach_the_model(lm):
    task = Task("g", "generate", [{"id": "x", "question": "def add", "answer": "nothing"}], max_new_tokens=5,
                stop=["\n"])
    r = evaluate(lm, task, progress=False)
    text = r.records[0]["completions"][0]
    assert "\n" not in text and text == lm.generate("def add", SamplingParams(max_new_tokens=5, temperature=0,
                                                                               stop=["\n"]))[0]


# --- the real benchmarks, through the same code paths (registry packages; no model needed) ----------------------

class ReferenceLM(ScriptedLM):
    """Answers each benchmark item with its reference solution: the harness must then score 100%."""

    def __init__(self, by_prompt):
        super().__init__({})
        self.by_prompt = by_prompt

    def generate(self, prompts, params=None, heal=False):
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return [next(v for k, v in self.by_prompt.items() if p.endswith(k)) for p in prompts]


@pytest.mark.download
@pytest.mark.slow
def test_humaneval_reference_solutions_all_pass_in_the_sandbox():
    from conftest import pulled
    pulled("humaneval")
    task = load_task("humaneval")
    lm = ReferenceLM({it["prompt"]: it["canonical_solution"] for it in task.items})
    r = evaluate(lm, task, progress=False, batch=64)
    assert r.metrics["pass@1"].n == 164 and r.metrics["pass@1"].value == 1.0, r.details


@pytest.mark.download
def test_gsm8k_reference_solutions_score_exactly():
    from conftest import pulled
    pulled("gsm8k")
    task = load_task("gsm8k", num_fewshot=2)
    lm = ReferenceLM({task.render(it): " " + it["solution"] for it in task.items})
    r = evaluate(lm, task, limit=300, progress=False, batch=100)
    assert r.metrics["exact_match"].value == 1.0 and r.metrics["exact_match"].n == 300
    # and the few-shot prompt holds two other solved problems
    prompt = build_prompt(task, task.items[0], 0, chat=False)
    assert prompt.count("Question:") == 3 and prompt.count("####") == 2


@pytest.mark.download
def test_mmlu_prompts_and_subject_grouped_examples():
    from conftest import pulled
    pulled("mmlu")
    task = load_task("mmlu", num_fewshot=2)
    item = next(it for it in task.items if it["subject"] == "astronomy")
    prompt = build_prompt(task, item, 0, chat=False)
    assert prompt.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert prompt.count("\nAnswer:") == 3 and prompt.endswith("D. " + item["choices"][3] + "\nAnswer:")
    assert len(task.items) == 14042 and task.continuations(item) == ["A", "B", "C", "D"]


def test_harness_and_model_bits_per_byte_are_one_sliding_window_scorer(lm):
    """A perplexity task through the LM interface and token_bits_per_byte on the bare model plan the same windows
    (eval.perplexity.sliding_windows) and agree."""
    from slmkit.eval.perplexity import sliding_windows, token_bits_per_byte
    texts = [TEXT * 4, TEXT]
    result = evaluate(lm, Task("ppl", "perplexity", [{"id": str(i), "text": t} for i, t in enumerate(texts)],
                               stride=20), progress=False)
    docs = [[lm.tokenizer.bos_id] + lm.tokenizer.encode(t) for t in texts]
    n_bytes = sum(len(t.encode()) for t in texts)
    direct = token_bits_per_byte(lm.model, docs, n_bytes, seq_len=lm.max_length - 1, stride=20)
    assert result.metrics["bits_per_byte"].value == pytest.approx(direct["bits_per_byte"], rel=1e-5)
    assert result.details["tokens"] == direct["tokens"] == sum(len(d) - 1 for d in docs)
    assert result.metrics["bits_per_byte"].low < result.metrics["bits_per_byte"].value  # the interval stays
    windows = sliding_windows(100, 64, 20)
    assert [(s, e, n) for s, e, n in windows] == [(0, 64, 63), (20, 84, 20), (40, 100, 16)]
    assert sum(n for *_, n in windows) == 99
