"""`slm synth`: recipes, sandbox-checked programs, filters, dedup, decontamination and resume."""

import json

import pytest
from conftest import tiny_model_dir
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.distill import synth as S
from slmkit.lm.base import LM

PLANTED = ("Natalia sold clips to forty eight of her friends in April and then she sold half as many clips in May "
           "how many clips did she sell")


class ScriptedTeacher(LM):
    """A teacher whose replies are looked up by a key in the prompt (what a unit test needs to be exact)."""

    name = "scripted"

    def __init__(self, replies: dict[str, str], fail_on_call: int | None = None):
        self.replies, self.calls, self.fail_on_call = replies, [], fail_on_call

    def generate(self, prompts, params=None, heal=False):
        self.calls.append(prompts[0])
        if self.fail_on_call == len(self.calls):
            raise KeyboardInterrupt
        # the key mentioned last: the real seed comes after any worked example in the prompt
        reply = self.replies[max((k for k in self.replies if k in prompts[0]), key=prompts[0].rfind)]
        for stop in params.stop if params else []:
            reply = reply.split(stop)[0]
        return [reply]


def _seeds(tmp_path, records):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_program_recipe_keeps_only_programs_that_run_and_give_the_checked_answer(tmp_path):
    seeds = _seeds(tmp_path, [
        {"text": "apples: 3 bags of 4", "answer": "12"},
        {"text": "pears: 2 + 2", "answer": "5"},
        {"text": "plums: crash"},
        {"text": "figs: forever"},
        {"text": "kiwis: silent"},
        {"text": "dates: unchecked"},
        {"text": "chairs: 8 rows of 12", "answer": "96"},
    ])
    # replies continue the ```python block the prompt opens, up to the closing fence (a stop string)
    teacher = ScriptedTeacher({
        "apples": "bags = 3\nprint(bags * 4)\n```\nThat prints 12.",
        "pears": "print(2 + 2)\n```",
        "plums": "raise ValueError('no')\n```",
        "figs": "while True:\n    pass\n```",
        "kiwis": "x = 1\n```",
        "dates": "boxes = 7\nprint(boxes * 6)\n```",
        "chairs": "rows = 8\nprint(f'There are {rows * 12} chairs.')\n```",
    })
    cfg = S.SynthConfig(recipe="program", teacher="scripted", seeds=seeds, out=str(tmp_path / "out"), timeout_s=2)
    report = S.synthesize(cfg, lm=teacher, progress=False, log=lambda m: None)
    kept = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [(r["answer"], r["checked"]) for r in kept] == [("12", True), ("42", False), ("96", True)]
    assert kept[0]["program"] == "bags = 3\nprint(bags * 4)"
    # one worked example first, then the problem, and the reply starts inside the code block
    prompt = teacher.calls[0]
    assert prompt.index(S.PROGRAM_EXAMPLE[0]) < prompt.index("apples: 3 bags of 4")
    assert prompt.endswith(S.CODE_FENCE)
    assert report["rejected"] == {"program_wrong_answer": 1, "program_failed": 1, "program_timeout": 1,
                                  "program_no_output": 1}
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejected} == set(report["rejected"])


def test_decontamination_removes_a_planted_eval_overlap_and_reports_it(tmp_path):
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(json.dumps({"id": "q7", "question": PLANTED + "?", "answer": "72"}) + "\n")
    seeds = _seeds(tmp_path, [{"text": "clips"}, {"text": "rivers"}])
    teacher = ScriptedTeacher({
        "clips": "Lesson on ratios. Example: " + PLANTED.lower() + " altogether? Answer: 72 clips in total.",
        "rivers": "Lesson on rivers. Rivers carry water from mountains to the sea, shaping valleys on the way.",
    })
    cfg = S.SynthConfig(recipe="textbook", teacher="scripted", seeds=seeds, out=str(tmp_path / "out"),
                        decontaminate=[str(eval_set)])
    report = S.synthesize(cfg, lm=teacher, progress=False, log=lambda m: None)
    assert report["kept"] == 1 and report["rejected"] == {"contaminated": 1}
    [hit] = report["decontamination"]["removed"]
    assert hit["eval_item"].endswith(":q7") and len(hit["ngram"].split()) == 13
    kept = json.loads((tmp_path / "out" / "records.jsonl").read_text())
    assert kept["topic"] == "rivers"


def test_filters_and_duplicates_are_rejected_with_reasons(tmp_path):
    loop = "the model repeats itself. " * 30
    seeds = _seeds(tmp_path, [{"text": s} for s in ["alpha", "beta", "gamma", "delta", "eps"]])
    good = "A fine lesson about photosynthesis: plants turn light, water and carbon dioxide into sugar."
    teacher = ScriptedTeacher({"alpha": good, "beta": good, "gamma": loop, "delta": "ok", "eps": "Ceci est une "
                               "leçon très française: été, hôpital, forêt, élève, château, où, déjà, garçon."})
    cfg = S.SynthConfig(recipe="textbook", teacher="scripted", seeds=seeds, out=str(tmp_path / "out"),
                        min_ascii_letters=0.95)
    report = S.synthesize(cfg, lm=teacher, progress=False, log=lambda m: None)
    assert report["kept"] == 1
    assert report["rejected"] == {"exact_duplicate": 1, "repetitive": 1, "too_short": 1, "language": 1}
    assert S.repetition(loop) > 0.9 and S.repetition(good) == 0.0


def test_explain_erases_the_strategy_prompt_and_records_which_one(tmp_path):
    seeds = _seeds(tmp_path, [{"text": "Why is the sky blue?"}])
    teacher = ScriptedTeacher({"sky": "Because air scatters short (blue) wavelengths of sunlight the most."})
    cfg = S.SynthConfig(recipe="explain", teacher="scripted", seeds=seeds, out=str(tmp_path / "out"),
                        strategies=["step-by-step", "direct"], near_dup_threshold=1.0)
    S.synthesize(cfg, lm=teacher, progress=False, log=lambda m: None)
    assert S.STRATEGIES["step-by-step"] in teacher.calls[0] and S.STRATEGIES["direct"] in teacher.calls[1]
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in records + rejected] == ["step-by-step", "direct"]
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]  # no system prompt: erased


def test_an_interrupted_run_resumes_to_the_same_records(tmp_path):
    seeds = _seeds(tmp_path, [{"text": f"topic {i}"} for i in range(5)])
    replies = {f"topic {i}": f"Lesson {i}: " + " ".join(f"word{i}x{j}" for j in range(20)) for i in range(5)}
    full = tmp_path / "full"
    S.synthesize(S.SynthConfig(recipe="textbook", teacher="t", seeds=seeds, out=str(full)),
                 lm=ScriptedTeacher(replies), progress=False, log=lambda m: None)
    part = tmp_path / "part"
    cfg = S.SynthConfig(recipe="textbook", teacher="t", seeds=seeds, out=str(part))
    with pytest.raises(KeyboardInterrupt):
        S.synthesize(cfg, lm=ScriptedTeacher(replies, fail_on_call=4), progress=False, log=lambda m: None)
    assert not (part / "report.json").exists()
    logs = []
    S.synthesize(cfg, lm=ScriptedTeacher(replies), progress=False, log=logs.append)
    assert any("resuming at seed 3" in m for m in logs)
    assert (part / "records.jsonl").read_text() == (full / "records.jsonl").read_text()
    with pytest.raises(FileExistsError):
        S.synthesize(cfg, lm=ScriptedTeacher(replies), progress=False, log=lambda m: None)


def test_cli_synth_with_a_real_model_and_clear_errors(tmp_path):
    from conftest import translation_tokenizer
    tok = translation_tokenizer()
    model = tiny_model_dir(tmp_path / "teacher", tok, train_on="Translate red: rouge. Translate blue: bleu. ")
    (tmp_path / "seeds.txt").write_text("Translate red\nTranslate blue\n")
    r = CliRunner().invoke(app, ["synth", "instruct", "--teacher", str(model), "--seeds", str(tmp_path / "seeds.txt"),
                                 "-o", str(tmp_path / "out"), "--max-new-tokens", "16", "--min-chars", "1",
                                 "--max-repetition", "1.0"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["seeds"] == 2 and report["teacher_tokens"] > 0 and report["teacher_tokens_per_s"] > 0
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": 1}\n')
    r = CliRunner().invoke(app, ["synth", "program", "--teacher", str(model), "--seeds", str(tmp_path / "bad.jsonl"),
                                 "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "bad.jsonl:2" in r.output
    r = CliRunner().invoke(app, ["synth", "poetry", "--teacher", str(model), "--seeds", str(tmp_path / "seeds.txt"),
                                 "-o", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "unknown recipe" in r.output


def test_program_that_exits_early_is_rejected_and_a_main_block_runs(tmp_path):
    # the sandbox's verdict: a program must run to its end; as a script, its __main__ block prints the answer
    seeds = _seeds(tmp_path, [{"text": "eggs: exit early"}, {"text": "hens: main block", "answer": "9"},
                              {"text": "cows: hard exit"}])
    teacher = ScriptedTeacher({
        "eggs": "print(5)\nimport sys\nsys.exit(0)\nprint(6)\n```",
        "hens": "def solve():\n    return 3 * 3\n\nif __name__ == '__main__':\n    print(solve())\n```",
        "cows": "import os\nprint(7, flush=True)\nos._exit(0)\n```",
    })
    cfg = S.SynthConfig(recipe="program", teacher="scripted", seeds=seeds, out=str(tmp_path / "out"), timeout_s=2)
    report = S.synthesize(cfg, lm=teacher, progress=False, log=lambda m: None)
    kept = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in kept] == [("hens: main block", "9")]
    assert report["rejected"] == {"program_failed": 2}


def test_program_recipe_refuses_without_the_network_namespace(tmp_path, monkeypatch):
    from slmkit.eval import sandbox
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation(network=False, tmpfs=False))
    monkeypatch.delenv("SLMKIT_ALLOW_UNSANDBOXED", raising=False)
    seeds = _seeds(tmp_path, [{"text": "hens: main block", "answer": "9"}])
    teacher = ScriptedTeacher({"hens": "hens = 3\neggs = hens * 3\nprint(eggs)\n```"})
    cfg = S.SynthConfig(recipe="program", teacher="scripted", seeds=seeds, out=str(tmp_path / "out"), timeout_s=2)
    with pytest.raises(ValueError, match="--allow-unsandboxed"):
        S.synthesize(cfg, lm=teacher, progress=False, log=lambda m: None)
    assert teacher.calls == []  # refused before asking the teacher anything
    cfg = S.SynthConfig(recipe="program", teacher="scripted", seeds=seeds, out=str(tmp_path / "out2"), timeout_s=2,
                        allow_unsandboxed=True)
    assert S.synthesize(cfg, lm=teacher, progress=False, log=lambda m: None)["kept"] == 1
