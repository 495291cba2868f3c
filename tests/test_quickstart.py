import json

import pytest

from slmkit.data.stdlib import unseen_code_sample
from slmkit.recipes.quickstart import QUICKSTART_PRESET, run_quickstart


@pytest.mark.slow
def test_quickstart_runs_end_to_end_on_the_stdlib_and_writes_a_report(tmp_path):
    out = tmp_path / "qs"
    # The default shape (QUICKSTART_PRESET + QUICKSTART_MODEL), cut to 2 layers to keep the test short.
    result = run_quickstart(out, minutes=0.1, model_overrides={"n_layers": 2}, compile=False, eval_every=0)
    report = (out / "report.md").read_text()
    for needle in ("bits per byte", "gzip -9", "xz -9e", "near-duplicates removed", "loss.png", "slm generate",
                   f"`{QUICKSTART_PRESET}` preset, ", "n_layers=2)", "2 layers", "| optimizer, schedule | muon, wsd |",
                   "Greedy with a repeat penalty of 1.3"):
        assert needle in report
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["optimizer"] == "muon" and "greedy_repeat_penalty" in results
    assert results["val"]["xz -9e"] > 1.0 and results["val"]["model"] > 0
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["cleaning"]["near_duplicates"] > 10  # encodings/cp*.py tables
    assert not any("/test/" in s["path"] or "site-packages" in s["path"] for s in meta["sources"])
    assert result["sample"]
    # A second call reuses the finished dataset and model instead of redoing them.
    again = run_quickstart(out, minutes=0.1, model_overrides={"n_layers": 2}, compile=False)
    assert again["results"]["val"]["model"] == pytest.approx(results["val"]["model"])
    serve_with_the_openai_client(out / "run")


def serve_with_the_openai_client(run_dir):
    """The quickstart's model behind `slm serve`'s app answers the official client like local decoding does."""
    openai = pytest.importorskip("openai")
    from test_serve import live_server

    from slmkit.lm import load_lm
    from slmkit.sampling import SamplingParams
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    lm = load_lm(str(run_dir))
    engine = Engine(lm)
    try:
        with live_server(create_app(engine, "quickstart")) as base:
            c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            r = c.completions.create(model="quickstart", prompt="def ", max_tokens=16, temperature=0)
            want = lm.generate("def ", SamplingParams(max_new_tokens=16, temperature=0))[0]
            assert r.choices[0].text == want
            stream = c.completions.create(model="quickstart", prompt="def ", max_tokens=16, temperature=0, stream=True)
            assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want
    finally:
        engine.close()


def test_unseen_code_is_disjoint_from_the_training_sources(tmp_path, monkeypatch):
    """The unseen-code sample shares no file, and no file content, with what `slm quickstart` prepares."""
    import hashlib

    from slmkit.data import prepare
    from slmkit.data.ingest import find_files

    class Prepared(Exception):
        pass

    asked = {}

    def capture(sources, out_dir, **kw):  # the quickstart's own data preparation call, stopped there
        asked.update(sources=sources, exclude=kw.get("exclude"))
        raise Prepared

    monkeypatch.setattr(prepare, "prepare_dataset", capture)
    with pytest.raises(Prepared):
        run_quickstart(tmp_path / "qs", log=lambda message: None)
    training = find_files(asked["sources"], asked["exclude"])
    unseen = unseen_code_sample()
    assert len(unseen) == 40 and len(training) > 100

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert not {p.resolve() for p in unseen} & {f.path.resolve() for f in training}
    assert not {digest(p) for p in unseen} & {digest(f.path) for f in training}
