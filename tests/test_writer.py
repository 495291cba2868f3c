"""The marketing writer: the catalogue, its fact check (every kind of violation planted), regeneration and flagging,
recommendations under their rules, and the `slm write` / `slm recommend` commands."""

import json
import re

import pytest
from test_kb import ScriptedLM, WordEmbedder, _tiny_bert
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.kb.catalogue import check_facts, load_catalogue
from slmkit.kb.recommend import recommend
from slmkit.kb.write import (
    Brief,
    brand_examples,
    brand_records,
    build_messages,
    pick_examples,
    split_subject,
    summarize,
    write_texts,
)

CSV = (
    "sku,name,category,price_eur,key_features,warranty_years,in_stock\n"
    "KB-PRO2,Kettleby Pro 2 espresso machine,espresso_machine,649.00,58 mm portafilter; PID temperature"
    " control 88-96 °C; 2.0 L removable water tank; steam wand; auto-off after 15/30/60 min,2,true\n"
    "KB-PRO2D,Kettleby Pro 2 Dual espresso machine,espresso_machine,1149.00,dual boiler for brewing and"
    " steaming; 58 mm portafilter; brew pressure gauge,2,false\n"
    "KB-G40,Burr grinder G40,grinder,189.00,40 mm conical steel burrs; 40 grind settings; 250 g"
    " hopper,1,true\n"
    "KB-TMP58,Calibrated tamper 58 mm,accessory,39.00,58 mm flat stainless steel base; fits Pro 2 and"
    " Pro 2 Dual,2,true\n"
    "KB-KNK,Knock box,accessory,29.00,removable rubber knock bar; dishwasher-safe bin,1,true\n"
    "KB-BN,House Espresso blend 1 kg,coffee,27.90,whole beans; medium-dark roast; notes of"
    " chocolate,0,true\n"
)


@pytest.fixture
def catalogue(tmp_path):
    path = tmp_path / "catalogue.csv"
    path.write_text(CSV)
    return load_catalogue(path)


class RepliesLM(ScriptedLM):
    """Answers each call with the next reply in the list (the last one repeats)."""

    def __init__(self, replies):
        super().__init__(replies[0])
        self.replies = list(replies)

    def stream_chat(self, messages, params):
        self.reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        yield from super().stream_chat(messages, params)


def test_catalogue_rows_and_errors(tmp_path, catalogue):
    assert len(catalogue) == 6 and catalogue["kb-pro2"].features[1] == "PID temperature control 88-96 °C"
    assert catalogue["KB-PRO2D"].in_stock is False and catalogue["KB-G40"].line == 4
    # names as people write them: SKU, full, short and model codes; the longest match wins ("Pro 2 Dual")
    assert [p.sku for p in catalogue.mentioned("The Pro 2 Dual beats the Pro 2; add a G40.")] == \
        ["KB-PRO2D", "KB-PRO2", "KB-G40"]
    assert catalogue.mentioned("a professional setup") == []
    with pytest.raises(ValueError, match="no product with SKU 'KB-X'"):
        catalogue["KB-X"]
    bad = tmp_path / "bad.csv"
    for body, message in [(CSV.replace("189.00", "cheap"), "bad.csv:4: price_eur 'cheap' is not a number"),
                          (CSV.replace(",1,true\nKB-TMP58", ",one,true\nKB-TMP58"), "bad.csv:4: warranty_years"),
                          (CSV.replace("2,false", "2,maybe"), "bad.csv:3: in_stock 'maybe' must be true or false"),
                          (CSV + CSV.splitlines()[1] + "\n", "bad.csv:8: SKU 'KB-PRO2' appears twice"),
                          ("sku,name\nA,B\n", "bad.csv:1: missing column(s) category")]:
        bad.write_text(body)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_catalogue(bad)
    with pytest.raises(ValueError, match="no such catalogue file"):
        load_catalogue(tmp_path / "none.csv")


def test_a_faithful_text_passes(catalogue):
    pro = catalogue["KB-PRO2"]
    text = ("Subject: Meet the Pro 2\n\nThe Kettleby Pro 2 brings a 58mm portafilter, PID control from 88 to 96 °C, "
            "a 2.0 L tank and a 30-minute auto-off, for €649.00 with a two-year warranty. Pair it with our "
            "G40 grinder (€189). Spring offer: 10% off with code SPRING10. In stock now.")
    assert check_facts(text, catalogue, [pro], brief="10% off with code SPRING10") == []


@pytest.mark.parametrize("claim,kind", [
    ("Only €599 for the Pro 2!", "price"),  # a price the catalogue does not give
    ("The Pro 2 costs 649 euros; the G40 costs 649 euros.", "price"),  # the right price for the wrong product
    ("The Pro 2 comes with a 3-year warranty.", "warranty"),
    ("Warranty: 5 years.", "warranty"),  # 5 occurs nowhere for the product, and it is a warranty term
    ("The G40 grinder: a 2-year guarantee.", "warranty"),  # the Pro 2's term on the G40 (it has 1 year)
    ("A 60 mm portafilter.", "figure"),  # 60 occurs in its features, but as minutes
    ("A 45-minute auto-off.", "figure"),  # a hyphenated figure keeps its unit ("30-minute" is the fact's 30 min)
    ("Heats up in 45 seconds.", "figure"),
    ("Brews 4 cups at once.", "figure"),
    ("It has a dual boiler.", "feature"),  # the Pro 2 Dual's, not the Pro 2's
    ("Use code SPRING24 today.", "code"),  # an offer the brief never made
    ("Free shipping on the Pro 2!", "offer"),
    ("Ask about our bundle deal.", "offer"),
    ("A triple boiler inside.", "figure"),  # counts in words are figures too
    ("Dear [Customer Name], enjoy.", None),  # not a fact: the writer flags placeholders itself (below)
])
def test_each_kind_of_violation_is_caught(catalogue, claim, kind):
    found = check_facts(claim, catalogue, [catalogue["KB-PRO2"]], brief="10% off with code SPRING10")
    if kind is None:
        assert found == []
    else:
        assert kind in {v.kind for v in found}, found


def test_an_invented_product_of_the_brand(catalogue):
    found = check_facts("Meet the Kettlebrite, our best drink.", catalogue, [catalogue["KB-PRO2"]], brand="Kettleby")
    assert [v.kind for v in found] == ["product"]
    assert check_facts("Kettleby quality: the Kettleby Pro 2 and its kettle.", catalogue, [catalogue["KB-PRO2"]],
                       brand="Kettleby") == []


def test_stock_claims(catalogue):
    assert [v.kind for v in check_facts("The Pro 2 Dual ships today.", catalogue)] == ["stock"]
    assert [v.kind for v in check_facts("The Pro 2 is sold out.", catalogue)] == ["stock"]
    assert check_facts("The Pro 2 Dual is currently out of stock.", catalogue) == []


def test_writer_regenerates_until_the_facts_hold_and_flags_what_never_does(catalogue):
    pro = catalogue["KB-PRO2"]
    lm = RepliesLM(["Subject: Hi\n\nThe Pro 2 for €599.", "Subject: Hi\n\nThe Pro 2 for €649.00, 58 mm portafilter."])
    [text] = write_texts(lm, catalogue, [pro], Brief(), n=1, retries=2)
    assert (text.attempts, text.flagged, text.first_draft_violations) == (2, False, 1)
    assert text.subject == "Hi" and text.text == "The Pro 2 for €649.00, 58 mm portafilter."
    seeds = [p["seed"] for p in [lm.sampling_params(seed=s) for s in (0, 1)]]
    assert seeds == [0, 1]
    # every attempt invents a figure: the last one comes back flagged, with what is wrong
    bad = write_texts(RepliesLM(["Subject: Hi\n\nDear [Name], a 3-year warranty."]), catalogue, [pro], Brief(), n=2,
                      retries=1)
    assert [t.attempts for t in bad] == [2, 2] and all(t.flagged for t in bad)
    assert {v["kind"] for v in bad[0].violations} == {"warranty", "placeholder"}
    # unusable without a false fact: a loop, or the prompt copied out
    [loop] = write_texts(RepliesLM(["Subject: Hi\n\nThe Pro 2 is great. The Pro 2 is great. The Pro 2 is great."]),
                         catalogue, [pro], Brief(), n=1, retries=0)
    assert [v["kind"] for v in loop.violations] == ["repetition"]
    [echo] = write_texts(RepliesLM(["Subject: Hi\n\nThe product facts:\n- Pro 2"]), catalogue, [pro], Brief(),
                         n=1, retries=0)
    assert [v["kind"] for v in echo.violations] == ["echo"]
    summary = summarize([text, *bad])
    assert summary == {"outputs": 3, "flagged": 2, "attempts": 6, "first_draft_violations_per_100": 166.7,
                       "flagged_violations_per_100": 133.3}
    with pytest.raises(ValueError, match="kind must be one of email, description"):
        build_messages("poem", [pro], Brief())
    with pytest.raises(ValueError, match="at least one product"):
        write_texts(lm, catalogue, [], Brief())


CLEAN_EMAILS = [  # in the styles a person writes them: Title Case subjects, greetings, sign-offs, a P.S.
    "Subject: Spring Into Better Espresso\n\nDear coffee lovers,\n\nMeet the Kettleby Pro 2 espresso machine: a 58 mm "
    "portafilter, PID temperature control from 88 to 96 °C and a 2.0 L removable water tank. Steam milk with its "
    "steam wand, and let auto-off switch it off after 15, 30 or 60 minutes.\n\nThis spring, take 10% off everything "
    "with code SPRING10.\n\nHappy brewing,\nThe Kettleby Team",
    "Subject: Your Mornings, Upgraded\n\nHi there!\n\nSavour every cup. The Pro 2 is in stock now for €649.00, with a "
    "two-year warranty. Baristas at home love its PID temperature control.\n\nCheers,\nKettleby",
    "Subject: Chocolate Notes For Home Coffee Lovers\n\nHello,\n\nOur House Espresso blend 1 kg: whole beans, a "
    "medium-dark roast with notes of chocolate, €27.90. Grind it fresh on the Burr grinder G40.\n\nWarm regards,\n"
    "The Kettleby team\nP.S. 10% off with SPRING10 this spring.",
]


@pytest.mark.parametrize("text", CLEAN_EMAILS)
def test_faithful_emails_in_every_style_pass_the_whole_check(catalogue, text):
    products = [catalogue["KB-PRO2"] if "Pro 2" in text else catalogue["KB-BN"]]
    [written] = write_texts(RepliesLM([text]), catalogue, products, Brief(notes="spring: 10% off everything with "
                                                                                "code SPRING10"), n=1, retries=0)
    assert written.violations == []


@pytest.mark.parametrize("body,kind,claim", [  # each from what SmolLM2-135M wrote (docs/benchmark-logs/writer-*.jsonl)
    ("A single origin Japanese roast, brewed on the Pro 2.", "name", "Japanese"),  # an origin no fact gives
    ("Try our Daily Essentials lineup with the Pro 2.", "name", "Daily Essentials"),  # an invented product line
    ("Spremer's Kitchen loves the Pro 2.", "name", "Spremer's Kitchen"),  # no English word, first in its sentence
    ("Sterne, please try the Pro 2.", "name", "Sterne"),
    ("The Pro 2 is sold on Amazon.", "name", "Amazon"),
    ("His name is Emma, and she loves the Pro 2.", "name", "Emma"),
    ("CALL TO HOME COFFERLOADERS\nThe Pro 2.", "name", "COFFERLOADERS"),  # capitals: only a non-word is a name
    ("The Pro 2. #BestCoffee", "hashtag", "#BestCoffee"),
    ("The Pro 2, from @kettleby_shop.", "hashtag", "@kettleby_shop"),
    ("", "empty", "Hi"),  # a subject and nothing after it
])
def test_names_the_facts_do_not_give_are_flagged(catalogue, body, kind, claim):
    [written] = write_texts(RepliesLM([f"Subject: Hi\n\n{body}"]), catalogue, [catalogue["KB-PRO2"]], Brief(), n=1,
                            retries=0)
    assert {"kind": kind, "claim": claim} in [{k: v[k] for k in ("kind", "claim")} for v in written.violations], \
        written.violations


def test_an_email_needs_its_subject_line_and_sources_cover_demonyms_and_british_spelling(catalogue):
    [no_subject] = write_texts(RepliesLM(["The Pro 2 for €599."]), catalogue, [catalogue["KB-PRO2"]], Brief(), n=1,
                               retries=0)
    assert [v["kind"] for v in no_subject.violations] == ["format", "price"]  # and the rest is checked too
    [description] = write_texts(RepliesLM(["The Pro 2 is great."]), catalogue, [catalogue["KB-PRO2"]], Brief(),
                                kind="description", n=1, retries=0)
    assert description.violations == []
    from slmkit.kb.grounding import unsupported_names
    assert unsupported_names("Subject: Colourful Flavour\nA fine Ethiopian coffee, Kenyan too.",
                             "Ethiopia Yirgacheffe; Kenya AA", title_lines=1) == []
    assert [v.claim for v in unsupported_names("An Ethiopian coffee.", "Kenya AA")] == ["Ethiopian"]


def test_brand_records_teach_the_writers_prompt_and_refuse_copy_that_breaks_a_fact(tmp_path, catalogue):
    examples = tmp_path / "brand.jsonl"
    good = {"sku": "KB-G40", "subject": "Grind Fresh", "body": "Dear coffee lovers,\n\nThe Burr grinder G40 has "
            "40 mm conical steel burrs and 40 grind settings.\n\nHappy grinding,\nThe Kettleby Team"}
    examples.write_text(json.dumps(good) + "\n" + json.dumps({"kind": "description", "skus": ["KB-KNK"],
                                                              "body": "A removable rubber knock bar."}) + "\n")
    brief = Brief(words=40)
    records = brand_records(catalogue, examples, brief)
    assert [r["messages"][:2] for r in records] == [build_messages("email", [catalogue["KB-G40"]], brief),
                                                    build_messages("description", [catalogue["KB-KNK"]], brief)]
    assert records[0]["messages"][2] == {"role": "assistant", "content": "Subject: Grind Fresh\n\n" + good["body"]}
    for bad, message in [({**good, "body": "The G40 has 60 settings."}, "brand.jsonl:1: the text breaks the "
                                                                        "writer's check: figure: '60'"),
                         ({**good, "body": "Loved in Milan."}, "brand.jsonl:1: .*name: 'Milan'"),
                         ({**good, "subject": ""}, "brand.jsonl:1: an e-mail example needs its \"subject\""),
                         ({**good, "sku": "KB-NONE"}, "brand.jsonl:1: .*catalogue.csv: no product with SKU 'KB-NONE'"),
                         ({"body": "x"}, "brand.jsonl:1: an example needs \"sku\"")]:
        examples.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            brand_records(catalogue, examples, brief)


def test_the_brands_examples_go_first_as_worked_requests_about_other_products(tmp_path, catalogue):
    path = tmp_path / "brand.jsonl"
    rows = [{"sku": "KB-PRO2", "subject": "Pro", "body": "The Pro 2."},
            {"sku": "KB-KNK", "subject": "Knock", "body": "The Knock box."},
            {"sku": "KB-PRO2D", "subject": "Dual", "body": "The Pro 2 Dual."},
            {"kind": "description", "sku": "KB-G40", "body": "The G40."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = brand_examples(catalogue, path, Brief())
    # same kind, not about the product written, its category first
    assert [e.products[0].sku for e in pick_examples(examples, "email", [catalogue["KB-PRO2"]], 2)] == \
        ["KB-PRO2D", "KB-KNK"]
    assert [e.products[0].sku for e in pick_examples(examples, "description", [catalogue["KB-PRO2"]], 5)] == ["KB-G40"]
    lm = RepliesLM(["Subject: Hi\n\nThe Pro 2."])
    write_texts(lm, catalogue, [catalogue["KB-PRO2"]], Brief(), n=1, retries=0, examples=examples, shots=1)
    [chat] = lm.prompts
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert chat[2]["content"] == "Subject: Dual\n\nThe Pro 2 Dual." and "KB-PRO2D" in chat[1]["content"]
    assert chat[3] == build_messages("email", [catalogue["KB-PRO2"]], Brief())[1]


def test_prompt_lists_only_the_products_facts_and_the_brief(catalogue):
    messages = build_messages("description", [catalogue["KB-G40"]], Brief(audience="baristas", notes="free beans"))
    user = messages[1]["content"]
    assert "Burr grinder G40 (SKU KB-G40): price €189.00; warranty 1 year; in stock" in user
    assert "baristas" in user and "Campaign notes: free beans" in user and "Pro 2" not in user
    assert split_subject("**Subject:** Grind better\n\nBody here.") == ("Grind better", "Body here.")
    assert split_subject("No subject line.") == (None, "No subject line.")


def test_recommendations_follow_the_rules(catalogue):
    recs = recommend(catalogue, ["KB-PRO2", "KB-BN"], WordEmbedder(), k=10)
    skus = [r.sku for r in recs]
    assert skus[0] == "KB-TMP58" and recs[0].reason.startswith("Made for your Kettleby Pro 2")  # it fits the machine
    assert "KB-PRO2" not in skus and "KB-BN" not in skus  # not what was bought
    assert "KB-PRO2D" not in skus  # out of stock (and a second espresso machine)
    assert set(skus) == {"KB-TMP58", "KB-G40", "KB-KNK"}
    assert all(r.reason_by == "rule" for r in recs)
    # a model's reason is used when it keeps to the facts, replaced by the rule's when it does not
    good = recommend(catalogue, ["KB-PRO2"], WordEmbedder(), lm=ScriptedLM("It fits your 58 mm portafilter."), k=1)
    assert good[0].reason_by == "model" and good[0].reason == "It fits your 58 mm portafilter."
    bad = recommend(catalogue, ["KB-PRO2"], WordEmbedder(), lm=ScriptedLM("Only €5, fits perfectly."), k=1)
    assert bad[0].reason_by == "rule" and bad[0].violations[0]["kind"] == "price"
    named = recommend(catalogue, ["KB-PRO2"], WordEmbedder(), lm=ScriptedLM("Baristas in Milan love it."), k=1)
    assert named[0].reason_by == "rule" and named[0].violations[0]["claim"] == "Milan"
    with pytest.raises(ValueError, match="no product with SKU 'KB-NONE'"):
        recommend(catalogue, ["KB-NONE"], WordEmbedder())


def test_cli_write_and_recommend(tmp_path, catalogue):
    from conftest import tiny_model_dir, translation_tokenizer
    model = tiny_model_dir(tmp_path / "lm", translation_tokenizer())
    out = tmp_path / "emails.jsonl"
    r = CliRunner().invoke(app, ["write", catalogue.path, "--model", str(model), "--backend", "torch", "--sku",
                                 "KB-G40", "-n", "2", "--retries", "1", "--words", "10", "-o", str(out)])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["variant"] for rec in records] == [0, 1] and all(rec["skus"] == ["KB-G40"] for rec in records)
    for rec in records:  # whatever the tiny model wrote, the record says whether it was checked clean
        assert rec["flagged"] == bool(rec["violations"]) and 1 <= rec["attempts"] <= 2
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["outputs"] == 2 and summary["flagged"] == sum(rec["flagged"] for rec in records)
    examples = tmp_path / "brand.jsonl"
    examples.write_text(json.dumps({"sku": "KB-KNK", "subject": "Knock", "body": "The Knock box."}) + "\n")
    r = CliRunner().invoke(app, ["brand-records", catalogue.path, str(examples), "-o", str(tmp_path / "train.jsonl")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["write", catalogue.path, "--model", str(model), "--backend", "torch", "--sku",
                                 "KB-G40", "-n", "1", "--retries", "0", "--words", "10", "--examples", str(examples)])
    assert r.exit_code == 0, r.output
    [record] = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert record["messages"][-1]["content"] == "Subject: Knock\n\nThe Knock box."
    bert = _tiny_bert(tmp_path / "bert", [p.text() for p in catalogue])
    r = CliRunner().invoke(app, ["recommend", catalogue.path, "--history", "KB-PRO2", "--embedder", str(bert),
                                 "-k", "2"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0]["sku"] == "KB-TMP58" and len(lines) == 2
