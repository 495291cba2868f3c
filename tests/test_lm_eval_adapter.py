"""The lm-eval adapter: lm-eval's own pipeline, run on a slmkit model, agrees with slmkit's harness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from conftest import tiny_model_dir  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from slmkit.eval.lm_eval.adapter import PTH_TEXT, SlmkitEvalLM, hook_path, install_hook, main  # noqa: E402
from slmkit.lm import load_lm  # noqa: E402
from slmkit.sampling import SamplingParams  # noqa: E402
from slmkit.tokenizer import train_tokenizer  # noqa: E402

FACTS = [("the cat sat on the", "mat"), ("the dog ran to the", "park"), ("a bird sang in the", "tree"),
         ("the fish swam in the", "lake"), ("my aunt baked a", "cake"), ("the boy kicked the", "ball"),
         ("the girl read a", "book"), ("we drank hot", "tea"), ("the sun is very", "bright"),
         ("the king sat on his", "throne"), ("the cow ate green", "grass"), ("the ship sailed on the", "sea"),
         ("the frog jumped into the", "pond"), ("the baby drank warm", "milk"), ("the farmer drove a", "tractor"),
         ("the bee made sweet", "honey"), ("the wind blew the", "leaves"), ("the owl hoots at", "night"),
         ("the chef cut the", "onion"), ("the clock struck", "twelve")]
TEXT = " ".join(f"{q} {a}." for q, a in FACTS) + "\n"
TASK = "tiny_mc_lmeval"


def mc_items() -> list[dict]:
    """Four choices per fact; every fifth item is labelled with a wrong choice, so acc cannot reach 1."""
    rng = np.random.default_rng(0)
    objects = [a for _, a in FACTS]
    items = []
    for i, (question, answer) in enumerate(FACTS):
        others = [o for o in objects if o != answer]
        choices = [answer, *rng.choice(others, size=3, replace=False).tolist()]
        rng.shuffle(choices)
        label = choices.index(answer) if i % 5 else (choices.index(answer) + 1) % 4
        items.append({"question": question, "choices": [c + "." for c in choices], "answer": label})
    return items


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)  # module-scoped: runs before the per-test seed fixture
    tok = train_tokenizer([TEXT] * 30, vocab_size=320)
    return tiny_model_dir(tmp_path_factory.mktemp("lmeval") / "m", tok, train_on=TEXT, steps=300)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The same items as an lm-eval task (YAML + JSONL) and as a slmkit task."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "tiny_mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in mc_items()))
    (d / "tiny_mc.yaml").write_text(json.dumps({"name": "tiny-mc", "kind": "choice", "data": "tiny_mc.jsonl"}))
    lm_eval_dir = d / "lm_eval"
    lm_eval_dir.mkdir()
    # lm-eval loads local JSONL through datasets' "json" builder; data_files paths are not relative to the YAML.
    (lm_eval_dir / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "tiny_mc.jsonl"}
  cache_dir: {d / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""")
    return d


def run_lm_eval(lm, task_dir):
    return lm_eval.simple_evaluate(model=SlmkitEvalLM(lm), tasks=[TASK], log_samples=True,
                                   task_manager=TaskManager(include_path=str(task_dir / "lm_eval")))


def test_multiple_choice_matches_slmkit_scores_and_harness(model_dir, task_dir):
    lm = load_lm(str(model_dir))
    out = run_lm_eval(lm, task_dir)
    metrics = out["results"][TASK]
    assert 0 < metrics["acc,none"] < 1  # the model learned some facts; the mislabelled items it gets "wrong"

    # per-item log-likelihoods are slmkit's own scores, with lm-eval's " " + choice convention
    samples = out["samples"][TASK]
    assert len(samples) == len(FACTS)
    for sample in samples:
        doc = sample["doc"]
        got = [float(ll) for ll, _ in sample["filtered_resps"]]
        want = [lm.score(doc["question"], " " + c).logprob for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)

    from slmkit.eval.harness import evaluate
    from slmkit.eval.tasks import load_task
    ours = evaluate(lm, load_task(task_dir / "tiny_mc.yaml"))
    assert ours.metrics["acc"].value == metrics["acc,none"]
    assert ours.metrics["acc_norm"].value == metrics["acc_norm,none"]


def test_loglikelihood_rolling_windows(model_dir):
    lm = load_lm(str(model_dir))
    ev = SlmkitEvalLM(lm)
    tok = lm.tokenizer
    doc = "the cat sat on the mat. the dog ran to the park."
    ids = tok.encode(doc)
    assert len(ids) < lm.max_length - 1
    [rolled] = ev.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])
    assert rolled == pytest.approx(float(lm.logprobs([tok.bos_id, *ids]).token_logprobs.sum()), abs=1e-4)

    # Longer than the window: disjoint windows, each conditioned on what precedes it (lm-eval's rule).
    lm.max_length = 16
    words = TEXT.split()
    n_words = next(n for n in range(len(words)) if len(tok.encode(" ".join(words[:n]))) > 38)
    long_doc = " ".join(words[:n_words])
    t = tok.encode(long_doc)
    assert 30 < len(t) <= 45  # three windows, the last one partly filled

    def tail(seq, n):
        return float(lm.logprobs(seq).token_logprobs[-n:].sum())

    last = len(t) - 30  # the third window scores what is left, with a full window of context
    want = tail([tok.bos_id, *t[:15]], 15) + tail(t[14:30], 15) + tail(t[len(t) - 16:], last)
    [rolled] = ev.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_doc,), 0)])
    assert rolled == pytest.approx(want, abs=1e-4)


def test_generate_until_stops_at_the_until_string(model_dir):
    lm = load_lm(str(model_dir))
    ev = SlmkitEvalLM(lm)
    full = lm.generate("the cat", SamplingParams(max_new_tokens=20, temperature=0))[0]
    stop = full.strip()[4:7]
    assert len(stop) == 3 and stop in full
    req = Instance("generate_until", {}, ("the cat", {"until": [stop], "max_gen_toks": 20, "do_sample": False}), 0)
    assert ev.generate_until([req]) == [full[:full.index(stop)]]
    # max_gen_toks bounds the length; no until string
    req = Instance("generate_until", {}, ("the cat", {"until": [], "max_gen_toks": 3}), 0)
    short = ev.generate_until([req])[0]
    assert short and full.startswith(short) and len(short) < len(full)


def test_hook_is_cheap_and_install_hook_writes_a_pth(tmp_path, capsys):
    # The hook runs at every interpreter start-up once installed: it must not pull in lm-eval or torch.
    subprocess.run([sys.executable, "-c", "import slmkit.eval.lm_eval.hook, sys; "
                    "assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules"], check=True)

    pth = tmp_path / "slmkit-lm-eval.pth"
    for _ in range(2):  # idempotent
        main(["--install-hook", "--site-dir", str(tmp_path)])
        assert str(pth) in capsys.readouterr().out
        assert [p.name for p in tmp_path.iterdir()] == [pth.name] and pth.read_text() == PTH_TEXT

    # A site dir holding the .pth: lm-eval's own registry gains "slmkit" (lazily: the adapter is not imported)
    # and keeps its built-in models.
    check = (f"import site, sys; site.addsitedir({str(tmp_path)!r})\n"
             "from lm_eval.api.registry import get_model, model_registry\n"
             "assert get_model('dummy').__name__ == 'DummyLM'\n"
             "assert 'slmkit' in model_registry and 'slmkit.eval.lm_eval.adapter' not in sys.modules\n"
             "assert get_model('slmkit').__module__ == 'slmkit.eval.lm_eval.adapter'\n")
    subprocess.run([sys.executable, "-c", check], check=True)

    for _ in range(2):
        main(["--uninstall-hook", "--site-dir", str(tmp_path)])
        assert not pth.exists()
    assert "no lm_eval hook" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("command", ["python-m", "lm_eval"])
def test_cli_runs_the_task(model_dir, task_dir, tmp_path, command):
    if command == "lm_eval":  # lm-eval's own console script: needs the start-up hook in this environment
        if not hook_path().exists() or hook_path().read_text() != PTH_TEXT:
            install_hook()
        prefix = [str(Path(sys.executable).parent / "lm_eval")]
    else:
        prefix = [sys.executable, "-m", "slmkit.eval.lm_eval.adapter"]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [*prefix, "--model", "slmkit",
           "--model_args", f"path={model_dir},backend=torch,device=cpu,dtype=float32", "--tasks", TASK,
           "--include_path", str(task_dir / "lm_eval"), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"][TASK]
    api = run_lm_eval(load_lm(str(model_dir)), task_dir)["results"][TASK]
    assert cli["acc,none"] == api["acc,none"] and cli["acc_norm,none"] == api["acc_norm,none"]
