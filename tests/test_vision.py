"""The LLaVA-style vision model: data, the splice, LLaVA's stages, the model directory, `slm generate --image`,
image_url parts through the official OpenAI client, and the chat page's image attachment (tiny models, few steps)."""

import base64
import json

import numpy as np
import pytest
import torch
from conftest import live_server
from typer.testing import CliRunner

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from slmkit.data.vision import (  # noqa: E402
    chance,
    digit_split,
    make_examples,
    qa_items,
    read_image,
    write_png,
)
from slmkit.model.vit import VisionConfig, VisionTower, splice  # noqa: E402

TINY_DECODER = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=128)
TINY_VISION = dict(dim=32, n_layers=1, n_heads=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`run_vision_quickstart` on tiny shapes: a few steps per stage, a few held-out questions."""
    from slmkit.recipes.vision import run_vision_quickstart
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vision") / "qs"
    logs = []
    report = run_vision_quickstart(out, n_train=40, n_test=10, max_eval=12, decoder=TINY_DECODER, vision=TINY_VISION,
                                   max_steps=4, batch_size=8, threads=None, log=logs.append)
    return out, report, logs


@pytest.fixture(scope="module")
def lm(run):
    from slmkit.lm import load_lm
    return load_lm(str(run[0] / "model"))


def test_data_is_deterministic_with_a_held_out_split():
    a, b = make_examples("train", 12), make_examples("train", 12)
    assert [e.caption for e in a] == [e.caption for e in b] and all(
        np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    test = make_examples("test", 12)
    train_digits = [e for e in a if e.kind == "digit"]
    test_digits = [e for e in test if e.kind == "digit"]
    assert len(train_digits) + len(test_digits) == 1797 and 0.15 < len(test_digits) / 1797 < 0.25
    assert [digit_split(i) for i in range(5)] == [digit_split(i) for i in range(5)]
    rendered_train = [e.image for e in a if e.kind != "digit"]
    rendered_test = [e.image for e in test if e.kind != "digit"]
    assert {e.kind for e in a if e.kind != "digit"} == {"shape", "count", "bars", "stripes"}
    assert not any(np.array_equal(x, y) for x in rendered_train for y in rendered_test)
    assert make_examples("train", 12, seed=1)[-1].caption != a[-1].caption or not np.array_equal(
        make_examples("train", 12, seed=1)[-1].image, a[-1].image)
    shape = next(e for e in a if e.kind == "shape")
    assert shape.caption.split()[1] in ("red", "green", "blue", "yellow")
    assert [q["answer"] for q in shape.qa] == [shape.caption.split()[2], shape.caption.split()[1],
                                              shape.caption.split(" at the ")[1]]
    assert all(q["answer"] in q["options"] for e in a + test for q in e.qa)
    items = qa_items([shape])
    assert chance(items) == pytest.approx((1 / 3 + 1 / 4 + 1 / 4) / 3)
    with pytest.raises(ValueError, match="split 'dev'"):
        make_examples("dev", 1)
    assert a[0].image.shape == (32, 32, 3) and a[0].image.dtype == np.uint8


def _tiny(seed=0):
    from slmkit.model.config import ModelConfig
    from slmkit.model.llama import Transformer
    torch.manual_seed(seed)
    decoder = Transformer(ModelConfig(vocab_size=50, **TINY_DECODER))
    tower = VisionTower(VisionConfig(text_dim=32, image_token_id=7, **TINY_VISION))
    return decoder, tower


def test_image_embeddings_change_the_decoders_output():
    decoder, tower = _tiny()
    ex = make_examples("train", 4, digits=False)
    ids = torch.tensor([[1, 3, 7, 4, 5]])
    out = []
    for image in (ex[0].image, ex[1].image):
        x, idx = splice(decoder, ids, tower(tower.pixels(image)), 7)
        assert x.shape == (1, 5 - 1 + tower.cfg.n_patches, 32)
        assert idx[0, :2].tolist() == [0, 1] and (idx[0, 2:2 + 16] == -1).all() and idx[0, -2:].tolist() == [3, 4]
        out.append(decoder(ids, embeds=x)[0, -1])
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # another image, another next-token distribution
    x, idx = splice(decoder, ids, None, 7)  # no image: the ids' own embeddings
    assert torch.equal(decoder(ids, embeds=x), decoder(ids))
    with pytest.raises(ValueError, match="exactly one image token"):
        splice(decoder, torch.tensor([[7, 7, 1]]), tower(tower.pixels(ex[0].image)), 7)


def test_stage_1_trains_the_projector_with_the_decoder_frozen():
    from slmkit.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from slmkit.train.vision import StageConfig, encode_turns, train_stage, turn_loss
    ex = make_examples("train", 8, digits=False)
    tok = train_tokenizer([e.caption for e in ex] * 3, vocab_size=300, special_tokens=SPECIAL_TOKENS + ["<image>"])
    decoder, tower = _tiny()
    decoder = type(decoder)(type(decoder.cfg)(vocab_size=tok.vocab_size, **{**TINY_DECODER, "max_seq_len": 128}))
    tower.cfg.image_token_id = tok._id("<image>")
    turns = encode_turns(tok, [("<image>\nDescribe the image.", e.caption, e.image) for e in ex])
    from slmkit.train.vision import trainable
    trainable("align", decoder, tower)
    turn_loss(decoder, tower, turns, tok.pad_id).backward()
    assert tower.projector.fc1.weight.grad.abs().sum() > 0  # through the frozen decoder to the projector
    assert all(p.grad is None for p in [*decoder.parameters(), *tower.vit.parameters()])  # frozen: no gradient
    dec0 = {k: v.clone() for k, v in decoder.state_dict().items()}
    proj0 = tower.projector.fc2.weight.clone()
    summary = train_stage(StageConfig("align", max_steps=3, batch_size=4, warmup_steps=1), decoder, tower, turns,
                          tok.pad_id, log=lambda m: None)
    assert summary["steps"] == 3
    assert all(torch.equal(v, decoder.state_dict()[k]) for k, v in dec0.items())
    assert not torch.equal(proj0, tower.projector.fc2.weight)
    vit0 = tower.vit.patch.weight.clone()
    clip = train_stage(StageConfig("clip", max_steps=3, batch_size=8, warmup_steps=1), decoder, tower, turns,
                       tok.pad_id, log=lambda m: None)
    assert clip["steps"] == 3 and not torch.equal(vit0, tower.vit.patch.weight)  # CLIP's loss trains the ViT
    assert all(torch.equal(v, decoder.state_dict()[k]) for k, v in dec0.items())
    vit0 = tower.vit.patch.weight.clone()
    train_stage(StageConfig("instruct", max_steps=2, batch_size=4, warmup_steps=1), decoder, tower, turns,
                tok.pad_id, log=lambda m: None)
    assert torch.equal(vit0, tower.vit.patch.weight)  # stage 2 keeps the ViT frozen, as LLaVA does
    assert not any(torch.equal(v, decoder.state_dict()[k]) for k, v in dec0.items() if k.endswith("q_proj.weight"))


def test_quickstart_writes_the_report_and_resumes(run):
    out, report, logs = run
    saved = json.loads((out / "report.json").read_text())
    for field in ("accuracy", "text_only_accuracy", "chance"):
        assert 0 <= saved[field] <= 1
    lines = (out / "data" / "test" / "questions.jsonl").read_text().splitlines()
    assert saved["questions"] == len(lines) == 12
    assert saved["chance"] == pytest.approx(sum(1 / len(_options(line)) for line in lines) / 12)
    assert list(saved["stages"]) == ["text", "clip", "align", "instruct"]
    assert [s["steps"] for s in saved["stages"].values()] == [4, 4, 4, 4]
    assert "| **all** | 12 |" in (out / "report.md").read_text()
    files = sorted(p.name for p in (out / "model").iterdir())
    assert {"vision.json", "vision.safetensors", "model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    from slmkit.recipes.vision import run_vision_quickstart
    again = []
    second = run_vision_quickstart(out, n_train=40, n_test=10, max_eval=12, decoder=TINY_DECODER, vision=TINY_VISION,
                                   max_steps=4, batch_size=8, threads=None, log=again.append)
    assert sum("done, reusing it" in m for m in again) == 4
    assert {k: second[k] for k in ("accuracy", "text_only_accuracy")} == {k: report[k] for k in
                                                                          ("accuracy", "text_only_accuracy")}
    with pytest.raises(ValueError, match="budget must be positive"):
        run_vision_quickstart(out, minutes=0)


def _options(line: str) -> list:
    """The options of a held-out question, found again from the generator (questions.jsonl keeps the answer)."""
    q = json.loads(line)["question"]
    for ex in make_examples("train", 5):
        for item in ex.qa:
            if item["question"] == q:
                return item["options"]
    raise AssertionError(q)


def test_model_directory_round_trip(run, lm, tmp_path):
    from slmkit.formats.vision_dir import load_vision_dir, save_vision_dir
    from slmkit.lm import load_lm
    from slmkit.lm.vision_lm import VisionLM
    assert isinstance(lm, VisionLM) and lm.instruction_tuned
    decoder, tower, tok = load_vision_dir(run[0] / "model")
    save_vision_dir(decoder, tower, tmp_path / "copy", tok)
    again = load_lm(str(tmp_path / "copy"))
    image = make_examples("test", 3, digits=False)[0].image
    e1, e2 = lm.image_embeddings([image]), again.image_embeddings([image])
    assert torch.equal(e1, e2)
    greedy = lm.sampling_params(max_new_tokens=6, temperature=0.0)
    assert lm.answer(image, "What shape is it?", greedy) == again.answer(image, "What shape is it?", greedy)
    # the decoder alone is an ordinary model directory, as transformers and llama.cpp would read it
    from slmkit.formats.hf_dir import load_model_dir
    assert load_model_dir(run[0] / "model").cfg.dim == 32
    (tmp_path / "copy" / "vision.json").write_text(json.dumps({**tower.cfg.to_dict(), "colour": 1}))
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"):
        load_lm(str(tmp_path / "copy"))


def test_generate_with_an_image(run, lm, tmp_path):
    from slmkit.cli import app
    out = run[0]
    line = json.loads((out / "data" / "test" / "questions.jsonl").read_text().splitlines()[0])
    image = out / "data" / "test" / line["image"]
    r = CliRunner().invoke(app, ["generate", str(out / "model"), "--image", str(image), line["question"],
                                 "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    greedy = lm.sampling_params(max_new_tokens=6)
    assert r.stdout.strip() == lm.answer(image, line["question"], greedy).strip()
    (tmp_path / "notes.txt").write_text("not a picture")
    r = CliRunner().invoke(app, ["generate", str(out / "model"), "--image", str(tmp_path / "notes.txt"), "Hi?"])
    assert r.exit_code == 2 and "notes.txt: not an image Pillow can read" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["generate", str(out / "model"), "--image", str(tmp_path / "missing.png"), "Hi?"])
    assert r.exit_code == 2 and "missing.png: no such image file" in r.stderr
    r = CliRunner().invoke(app, ["generate", str(out / "model"), "--backend", "hf", "--image", str(image), "Hi?"])
    assert r.exit_code == 2 and "has no vision part" in r.stderr
    assert read_image(write_png(np.zeros((40, 20, 3), np.uint8))).shape == (32, 32, 3)


def _data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(write_png(image)).decode()


def test_openai_client_asks_about_an_image(lm, run):
    openai = pytest.importorskip("openai")
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    ex = make_examples("test", 4, digits=False)[1]  # a count image
    question = ex.qa[0]["question"]
    engine = Engine(lm, max_batch=4, max_queue=8)
    try:
        with live_server(create_app(engine, "vision")) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(model="vision", temperature=0, max_tokens=6, messages=[
                {"role": "user", "content": [{"type": "text", "text": question},
                                             {"type": "image_url", "image_url": {"url": _data_url(ex.image)}}]}])
            greedy = lm.sampling_params(max_new_tokens=6, temperature=0.0)
            assert reply.choices[0].message.content == lm.answer(ex.image, question, greedy)
            # the image changes the answer's distribution, so some image gives another answer than no image
            text_only = client.chat.completions.create(model="vision", temperature=0, max_tokens=6,
                                                       messages=[{"role": "user", "content": question}])
            assert text_only.choices[0].message.content == lm.answer(None, question, greedy)
            for url, msg in (("https://example.com/a.png", "must be a data: URL"),
                             ("data:image/png;base64,!!!", "does not decode"),
                             ("data:image/png;base64," + base64.b64encode(b"text").decode(), "not an image")):
                with pytest.raises(openai.BadRequestError, match=msg) as e:
                    client.chat.completions.create(model="vision", messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}}]}])
                assert e.value.body["param"].startswith("messages.0.content.0.image_url")
            two = [{"type": "image_url", "image_url": {"url": _data_url(ex.image)}}] * 2
            with pytest.raises(openai.BadRequestError, match="one image per request"):
                client.chat.completions.create(model="vision", messages=[{"role": "user", "content": two}])
            with pytest.raises(openai.BadRequestError, match="1 <image> tokens for 0 images"):
                client.chat.completions.create(model="vision", messages=[{"role": "user", "content": "<image> hi"}])
    finally:
        engine.close()


def test_a_text_only_model_refuses_images(tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import tiny_model_dir

    from slmkit.lm import load_lm
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    from slmkit.tokenizer import train_tokenizer
    tok = train_tokenizer(["hello there"] * 20, vocab_size=300)
    lm = load_lm(str(tiny_model_dir(tmp_path / "m", tok, steps=0)))
    engine = Engine(lm, max_batch=2, max_queue=4)
    image = make_examples("test", 1, digits=False)[0].image
    try:
        with live_server(create_app(engine, "text")) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="this model has no vision part") as e:
                client.chat.completions.create(model="text", messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": "hi"}]}])
            assert e.value.body["param"] == "messages.0.content.0"
    finally:
        engine.close()


def test_chat_page_attaches_an_image(browser, lm, run, tmp_path):
    from slmkit.serve.app import create_app
    from slmkit.serve.engine import Engine
    ex = make_examples("test", 2, digits=False)[0]
    png = tmp_path / "shape.png"
    png.write_bytes(write_png(ex.image))
    question = "What colour is the shape?"
    engine = Engine(lm, max_batch=2, max_queue=4)
    page = browser
    try:
        with live_server(create_app(engine, "vision")) as base:
            page.call("Page.navigate", url=base + "/")
            page.wait_for(f"location.href.startsWith({json.dumps(base)}) && document.readyState === 'complete'"
                          " && document.querySelector('#model-name')?.textContent === 'vision'",
                          what="the page to load")
            page.set_value("#temperature", "0")
            page.set_value("#max-tokens", "6")
            root = page.call("DOM.getDocument")["root"]["nodeId"]
            node = page.call("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
            page.call("DOM.setFileInputFiles", nodeId=node, files=[str(png)])
            page.wait_for("document.querySelector('#attachment').textContent === 'shape.png'", what="the attachment")
            page.type_into("#prompt", question)
            page.js("document.querySelector('#send').click()")
            page.wait_for("document.querySelector('#messages .msg.assistant')?.dataset.state === 'done'",
                          what="the reply")
            reply = page.js("document.querySelector('#messages .msg.assistant .content').textContent")
            greedy = lm.sampling_params(max_new_tokens=6, temperature=0.0)
            assert reply == lm.answer(ex.image, question, greedy)
            assert page.js("document.querySelector('#messages .msg.user img.thumb').src").startswith(
                "data:image/png;base64,")
            assert page.js("document.querySelector('#attachment').textContent") == ""  # sent: no longer attached
            errors = [e["params"]["exceptionDetails"] for e in page.events if e["method"] == "Runtime.exceptionThrown"]
            assert not errors, errors
    finally:
        engine.close()


def test_a_stage_resumes_exactly_from_its_checkpoint(tmp_path):
    from slmkit.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from slmkit.train.vision import StageConfig, encode_turns, train_stage
    ex = make_examples("train", 6, digits=False)
    tok = train_tokenizer([e.caption for e in ex] * 3, vocab_size=300, special_tokens=SPECIAL_TOKENS + ["<image>"])
    turns = encode_turns(tok, [("<image>\nDescribe the image.", e.caption, e.image) for e in ex])

    def fresh():
        decoder, tower = _tiny()
        decoder = type(decoder)(type(decoder.cfg)(vocab_size=tok.vocab_size, **{**TINY_DECODER, "max_seq_len": 128}))
        tower.cfg.image_token_id = tok._id("<image>")
        return decoder, tower

    cfg = dict(max_steps=4, batch_size=4, warmup_steps=1, log_every=1, save_every_s=0)
    d1, t1 = fresh()
    train_stage(StageConfig("instruct", **cfg), d1, t1, turns, tok.pad_id, log=lambda m: None)

    def killed(message):  # the run dies after step 2's checkpoint, during step 3
        if "step 3:" in message:
            raise KeyboardInterrupt

    d2, t2 = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_stage(StageConfig("instruct", **cfg), d2, t2, turns, tok.pad_id, ckpt=tmp_path / "c", log=killed)
    d3, t3 = fresh()  # a new process: the weights come back from the checkpoint
    logs = []
    train_stage(StageConfig("instruct", **cfg), d3, t3, turns, tok.pad_id, ckpt=tmp_path / "c", log=logs.append)
    assert any("resuming stage instruct at step 2" in m for m in logs)
    for k, v in d1.state_dict().items():
        assert torch.allclose(v, d3.state_dict()[k], atol=1e-6), k
    assert torch.allclose(t1.projector.fc2.weight, t3.projector.fc2.weight, atol=1e-6)


def test_quickstart_kind_errors_are_one_line(tmp_path):
    from slmkit.cli import app
    r = CliRunner().invoke(app, ["quickstart", "pictures", "--out", str(tmp_path / "q")])
    assert r.exit_code == 2 and "unknown quickstart 'pictures'; choose code or vision" in r.stderr
    r = CliRunner().invoke(app, ["quickstart", "vision", "--out", str(tmp_path / "q"), "--preset", "micro"])
    assert r.exit_code == 2 and "--preset and --set shape the code quickstart's model" in r.stderr
    r = CliRunner().invoke(app, ["quickstart", "vision", "--out", str(tmp_path / "q"), "--minutes", "0"])
    assert r.exit_code == 2 and "budget must be positive" in r.stderr
    assert not (tmp_path / "q").exists()


def test_read_image_refuses_what_it_cannot_or_should_not_decode(tmp_path):
    import io

    from PIL import Image
    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, "PNG")
    with pytest.raises(ValueError, match="the image: 5000x5000 pixels is more than this reader decodes"):
        read_image(big.getvalue())
    with pytest.raises(ValueError, match="x.png: not an image Pillow can read"):
        read_image(b"\x89PNG broken", name="x.png")
    (tmp_path / "a.png").write_bytes(write_png(np.full((32, 32, 3), 7, np.uint8)))
    assert (read_image(tmp_path / "a.png") == 7).all()
