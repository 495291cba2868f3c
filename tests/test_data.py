"""Data preparation: ingest, clean, dedup, split, tokenize, meta.json — on tiny files, with a tiny vocab."""

from __future__ import annotations

import csv
import json
import random
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from slmkit.data.clean import clean_text, luhn_ok, normalize, redact
from slmkit.data.dedup import Deduplicator, MinHasher, choose_bands, shingle_hashes
from slmkit.data.ingest import DataError, find_files, read_documents
from slmkit.data.prepare import prepare_dataset
from slmkit.data.tokens import load_meta

VOCAB = 300


def quiet(*_args, **_kwargs):
    pass


def prose(seed: int, words: int = 120) -> str:
    """Distinct pseudo-English text: documents that are not near-duplicates of each other."""
    rng = random.Random(seed)
    vocab = ["data", "model", "train", "token", "small", "language", "the", "a", "of", "and", "learns", "from",
             "text", "code", "every", "byte", "counts", "fast", "slow", "loss", "curve", "batch", "step", "run"]
    return " ".join(rng.choice(vocab) + rng.choice(["", "s", "ed", "ing"]) for _ in range(words)) + ".\n"


def make_corpus(root: Path) -> Path:
    src = root / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "notes.txt").write_text(prose(1), encoding="utf-8")
    (src / "README.md").write_text("# Title\n\n" + prose(2), encoding="utf-8")
    (src / "pkg" / "mod.py").write_text("def add(x, y):\n    return x + y  # " + prose(3), encoding="utf-8")
    with open(src / "records.jsonl", "w", encoding="utf-8") as f:
        for i in range(6):
            f.write(json.dumps({"id": i, "body": prose(10 + i, 40)}) + "\n")
    with open(src / "table.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "content"])
        w.writerow([1, "first cell\nspans two lines " + prose(20, 30)])
        w.writerow([2, prose(21, 30)])
    return src


def prepare(src, out, **kw):
    kw = {"vocab_size": VOCAB, "progress": False, "log": quiet, "val_fraction": 0.2, **kw}
    return prepare_dataset(src if isinstance(src, list) else [src], out, **kw)


def read_bin(out: Path, split: str, meta: dict) -> np.ndarray:
    return np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r")


# ---------------------------------------------------------------------------------------------------
# the whole pipeline


def test_prepare_mixed_folder(tmp_path):
    src = make_corpus(tmp_path)
    out = tmp_path / "ds"
    meta = prepare(src, out, jsonl_field="body", csv_column="content")
    assert load_meta(out) == meta == json.loads((out / "meta.json").read_text())

    assert meta["format"] == "slmkit-tokens" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] <= VOCAB and (meta["bos_id"], meta["eos_id"]) == (1, 2)
    c = meta["cleaning"]
    assert c["documents_in"] == 3 + 6 + 2 and c["skipped_count"] == 0
    assert c["documents_out"] == c["documents_in"] - c["empty"] - c["exact_duplicates"] - c["near_duplicates"]
    assert c["documents_out"] == 11  # all distinct
    assert [Path(s["path"]).name for s in meta["sources"]] == ["README.md", "notes.txt", "mod.py",
                                                               "records.jsonl", "table.csv"]
    assert sum(s["documents"] for s in meta["sources"]) == c["documents_in"]

    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == c["documents_out"]
    assert splits["val"]["documents"] >= 1 and splits["train"]["documents"] >= 1
    for split in ("train", "val"):
        tokens = read_bin(out, split, meta)
        assert len(tokens) == splits[split]["tokens"]
        assert int(tokens.max()) < meta["vocab_size"]
        assert int((tokens == meta["bos_id"]).sum()) == splits[split]["documents"]  # one bos per document
        assert tokens[0] == meta["bos_id"]
    val_text = (out / "val.txt").read_bytes()
    assert len(val_text) == splits["val"]["bytes"]

    # the tokens decode back to exactly the val text (minus the bos markers)
    from slmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    assert tok.sha256 == meta["tokenizer_sha256"]
    val = read_bin(out, "val", meta)
    assert tok.decode([int(t) for t in val if t != meta["bos_id"]]).encode() == val_text

    # the CSV cell with a quoted newline is one document, and train+val text holds it whole
    train = read_bin(out, "train", meta)
    everything = tok.decode([int(t) for t in train]) + val_text.decode()
    assert "first cell\nspans two lines" in everything
    assert not list(tmp_path.glob(".ds.*")), "no temporary folder left behind"


def test_prepare_is_deterministic(tmp_path):
    src = make_corpus(tmp_path)
    meta1 = prepare(src, tmp_path / "a", jsonl_field="body", csv_column="content")
    meta2 = prepare(src, tmp_path / "b", jsonl_field="body", csv_column="content")
    for name in ("train.bin", "val.bin", "val.txt", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    meta1["config"].pop("out_dir"), meta2["config"].pop("out_dir")
    assert meta1 == meta2


def test_split_independent_of_location_and_at_least_one_val(tmp_path):
    # doc ids are relative to the source root: moving the corpus does not move documents between splits
    for where in ("x", "y/z"):
        root = tmp_path / where / "corpus"
        root.mkdir(parents=True)
        for i in range(4):
            (root / f"doc{i}.txt").write_text(prose(100 + i), encoding="utf-8")
    meta_x = prepare(tmp_path / "x" / "corpus", tmp_path / "dx", val_fraction=0.001)
    meta_y = prepare(tmp_path / "y" / "z" / "corpus", tmp_path / "dy", val_fraction=0.001)
    assert (tmp_path / "dx" / "val.txt").read_bytes() == (tmp_path / "dy" / "val.txt").read_bytes()
    assert meta_x["splits"] == meta_y["splits"] and meta_x["manifest_sha256"] == meta_y["manifest_sha256"]
    # 0.1% of 4 documents rounds to none; the guarantee moves one to val
    assert meta_x["splits"]["val"]["documents"] == 1


def test_existing_tokenizer_and_uint32(tmp_path):
    """A given tokenizer is used as is (here a 70k-word word-level one, so ids need uint32)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from slmkit.tokenizer import load_tokenizer

    words = sorted({w.rstrip(".\n") for i in range(40) for w in prose(i).split()})
    tokens = ["<pad>", "<s>", "</s>", "<unk>", *words, *(f"filler{i}" for i in range(70_000))]
    vocab = {t: i for i, t in enumerate(tokens)}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<pad>", "<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))

    src = make_corpus(tmp_path)
    meta = prepare(src, tmp_path / "ds", tokenizer=tmp_path / "tokenizer.json", jsonl_field="body",
                   csv_column="content")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(vocab)
    assert meta["tokenizer_sha256"] == load_tokenizer(tmp_path / "tokenizer.json").sha256
    assert load_tokenizer(tmp_path / "ds" / "tokenizer").sha256 == meta["tokenizer_sha256"]
    train = read_bin(tmp_path / "ds", "train", meta)
    assert len(train) == meta["splits"]["train"]["tokens"] and train.dtype == np.uint32
    assert train[0] == meta["bos_id"] == 1


# ---------------------------------------------------------------------------------------------------
# dedup


def test_exact_and_near_duplicates_removed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    original = prose(7, 300)
    words = original.split(" ")
    words[150] = "zebra"
    (src / "a.txt").write_text(original, encoding="utf-8")
    (src / "b_copy.txt").write_text(original, encoding="utf-8")  # exact
    (src / "c_edit.txt").write_text(" ".join(words), encoding="utf-8")  # near: one word changed
    (src / "d_other.txt").write_text(prose(8, 300), encoding="utf-8")
    (src / "e_crlf.txt").write_text(original.replace("\n", "\r\n"), encoding="utf-8", newline="")  # exact after clean
    meta = prepare(src, tmp_path / "ds")
    c = meta["cleaning"]
    assert (c["exact_duplicates"], c["near_duplicates"], c["documents_out"]) == (2, 1, 2)
    assert {Path(s["path"]).name: s["kept"] for s in meta["sources"]} == {
        "a.txt": 1, "b_copy.txt": 0, "c_edit.txt": 0, "d_other.txt": 1, "e_crlf.txt": 0}

    meta = prepare(src, tmp_path / "ds2", dedup=False)
    assert meta["cleaning"]["documents_out"] == 5


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    a = np.unique(rng.integers(0, 2**31 - 1, 3000, dtype=np.uint64))
    b = np.unique(np.concatenate([a[:2000], rng.integers(0, 2**31 - 1, 1000, dtype=np.uint64)]))
    true = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
    hasher = MinHasher()
    # many documents over several blocks, in one call, equal the same documents one at a time
    docs = [a, b, a[:5], b[:9000]] + [rng.integers(0, 2**31 - 1, n, dtype=np.uint64) for n in (1, 5000, 7)]
    together = hasher.signatures(docs)
    for i, d in enumerate(docs):
        assert (together[i] == hasher.signatures([d])[0]).all()
        # and equal the definition: min over shingles of (a·x + b) mod (2^31 − 1)
        expected = ((hasher.a.astype(object) * d.astype(object)[None, :] + hasher.b.astype(object))
                    % (2**31 - 1)).min(axis=1)
        assert (together[i] == expected.astype(np.uint32)).all()
    assert abs((together[0] == together[1]).mean() - true) < 0.12


def test_lsh_bands_and_code_near_duplicates():
    bands, rows = choose_bands(0.7)
    assert bands * rows <= 128 and 0.6 < (1 / bands) ** (1 / rows) < 0.8  # the S-curve's middle near 0.7
    # character-map tables like CPython's encodings/cp125x.py: same layout, differing entries
    table = "\n".join(f"    '\\x{i:02x}'     #  0x{i:02X} -> CHAR {i}" for i in range(256))
    variant = table.replace("CHAR 2", "LETTER 2")  # ~10% of lines differ
    unrelated = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * 7}" for i in range(120))
    dedupe = Deduplicator(0.7)
    assert dedupe.check([table, variant, unrelated, table]) == [None, "near", None, "exact"]
    assert len(shingle_hashes("hi")) == 1


# ---------------------------------------------------------------------------------------------------
# clean


def test_normalize_nfc_and_control_characters():
    decomposed = "Cafe\u0301 \u212b"  # e + combining acute; Angstrom sign
    assert not unicodedata.is_normalized("NFC", decomposed)
    assert normalize(decomposed) == "Café Å"
    assert normalize("a\r\nb\rc\n") == "a\nb\nc\n"
    assert normalize("tab\there\x00\x07\x1b[0m\x7f\x85\x0c.") == "tab\there[0m."
    assert normalize("emoji 🙂 and 中文 stay") == "emoji 🙂 and 中文 stay"


def test_cleaning_in_prepare(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes("Cafe\u0301\r\nline\x07two\r".encode())
    (src / "blank.txt").write_text("  \n\x1b\n", encoding="utf-8")  # empty after cleaning
    (src / "b.txt").write_text(prose(1), encoding="utf-8")
    meta = prepare(src, tmp_path / "ds", val_fraction=0.5)
    assert meta["cleaning"]["empty"] == 1 and meta["cleaning"]["documents_out"] == 2
    from slmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "ds" / "tokenizer")
    text = "".join(tok.decode([int(t) for t in read_bin(tmp_path / "ds", s, meta) if t != 1]) for s in ("train", "val"))
    assert "Café\nlinetwo\n" in text and "\r" not in text and "\x07" not in text


PII_TEXT = """Contact john.doe+ml@example.co.uk or (555) 123-4567, +44 20 7946 0958, 555.123.4567.
Server 192.168.10.23 and 2001:db8:85a3::8a2e:370:7334; card 4111 1111 1111 1111, 378282246310005.
"""
NOT_PII = """x = 1234567; y = 12345678901234; big = 4111111111111112  # Luhn fails
version = "3.11.7"; v1.2.3.4; a[1::2]; b[::3]; t = "12:30:45"; ts = 1700000000000
sha = 0x1234567890ab; date = "2021-01-01"; hosts = ["127.0.0.1", "::1", "0.0.0.0"]; z = x @ self.weight
section 8.2.4.44 of the spec; 256.1.1.1; 1.2.3.4.5; mac = "00:1a:2b:3c:4d:5e"; n = 1000000000000000000
"""


def test_pii_redaction():
    text, counts = redact(PII_TEXT)
    assert dict(counts) == {"email": 1, "phone": 3, "ip": 2, "credit_card": 2}
    for leaked in ("john.doe", "123-4567", "7946", "192.168", "8a2e", "4111", "378282"):
        assert leaked not in text
    assert text.count("<EMAIL>") == 1 and text.count("<PHONE>") == 3 and text.count("<IP>") == 2
    assert text.count("<CREDIT_CARD>") == 2
    # numbers in code are left alone
    assert redact(NOT_PII) == (NOT_PII, {})
    assert clean_text(PII_TEXT).text == PII_TEXT  # redaction is opt-in
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_pii_counts_in_meta(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(PII_TEXT + prose(1), encoding="utf-8")
    (src / "b.py").write_text(NOT_PII + prose(2), encoding="utf-8")
    meta = prepare(src, tmp_path / "ds", redact_pii=True, val_fraction=0.5)
    assert meta["cleaning"]["pii"] == {"email": 1, "credit_card": 2, "ip": 2, "phone": 3}


# ---------------------------------------------------------------------------------------------------
# bad inputs: fail (raises, names file and line, leaves nothing behind) or skip (continues, counted)


def _bad_sources(root: Path) -> dict[str, tuple[Path, str, int | None, dict]]:
    """name -> (path, expected text in the message, line or None, prepare kwargs)"""
    root.mkdir(parents=True, exist_ok=True)
    (root / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    lines = [json.dumps({"text": prose(1, 20)}), json.dumps({"text": prose(2, 20)}), '{"text": "unterminated',
             json.dumps({"text": prose(3, 20)})]
    (root / "broken.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = [json.dumps({"text": prose(1, 20)}), json.dumps({"body": "no text field"}), json.dumps({"text": 5}),
             json.dumps(["not", "an", "object"]), '{"text": "lone \\ud800 surrogate"}']
    (root / "fields.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "cols.csv").write_text("id,body\n1,hello\n", encoding="utf-8")
    return {
        "binary": (root / "blob.bin", "binary file", None, {}),
        "utf8": (root / "latin1.txt", "invalid UTF-8", 3, {}),
        "jsonl": (root / "broken.jsonl", "not valid JSON", 3, {}),
        "field": (root / "fields.jsonl", "missing field 'text'", 2, {}),
        "csv": (root / "cols.csv", "no column 'text'", 1, {}),
        "missing": (root / "nope" / "gone.txt", "no such file", None, {}),
    }


@pytest.mark.parametrize("case", ["binary", "utf8", "jsonl", "field", "csv", "missing"])
def test_bad_input_fails_with_location(tmp_path, case):
    path, reason, line, kw = _bad_sources(tmp_path / "bad")[case]
    good = tmp_path / "good.txt"
    good.write_text(prose(1), encoding="utf-8")
    out = tmp_path / "ds"
    with pytest.raises(DataError) as info:
        prepare([good, path], out, **kw)
    message = str(info.value)
    assert path.name in message and reason in message and " — " in message
    if line is not None:
        assert f"{path.name}:{line}:" in message
    assert not out.exists(), "a failed prepare leaves no dataset behind"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []


def test_bad_inputs_skipped_and_counted(tmp_path):
    cases = _bad_sources(tmp_path / "bad")
    good = tmp_path / "good.txt"
    good.write_text(prose(1), encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    logged = []
    paths = [good, tmp_path / "empty.txt"] + [p for p, *_ in cases.values()]
    meta = prepare(paths, tmp_path / "ds", on_error="skip", log=logged.append)
    c = meta["cleaning"]
    skipped = {(Path(s["source"]).name, s["line"]) for s in c["skipped"]}
    assert skipped == {("blob.bin", None), ("latin1.txt", 3), ("broken.jsonl", 3), ("fields.jsonl", 2),
                       ("fields.jsonl", 3), ("fields.jsonl", 4), ("fields.jsonl", 5), ("cols.csv", 1),
                       ("gone.txt", None)}
    assert c["skipped_count"] == len(c["skipped"]) == 9
    assert sum("skipped: " in m for m in logged) == 9
    # the good parts are read: good.txt, empty.txt (counted as empty), 3 lines of broken.jsonl, 1 of fields.jsonl
    assert c["empty"] == 1
    assert c["documents_in"] == 1 + 1 + 3 + 1
    assert load_meta(tmp_path / "ds")["cleaning"]["skipped_count"] == 9


def test_missing_glob_and_nothing_left(tmp_path):
    with pytest.raises(DataError, match="glob matched no files"):
        prepare([str(tmp_path / "*.nothing")], tmp_path / "ds")
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents left"):
        prepare([tmp_path / "blank.txt"], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_interrupted_prepare_keeps_previous_dataset(tmp_path, monkeypatch):
    src = make_corpus(tmp_path)
    out = tmp_path / "ds"
    prepare(src, out, jsonl_field="body", csv_column="content")
    before = (out / "train.bin").read_bytes()

    import slmkit.data.prepare as prep

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_tokenize", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, jsonl_field="body", csv_column="content", seed=1)
    assert (out / "train.bin").read_bytes() == before and load_meta(out)["config"]["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


# ---------------------------------------------------------------------------------------------------
# ingest details


def test_find_files_exclude_glob_and_order(tmp_path):
    root = tmp_path / "lib"
    for rel in ["b.py", "a.py", "test/t.py", "pkg/tests/u.py", "pkg/m.py", "site-packages/x/y.py",
                ".git/config", "__pycache__/a.cpython-311.pyc", "pkg/.hidden.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n", encoding="utf-8")
    exclude = ["*/test/*", "*/tests/*", "site-packages"]
    rels = [f.rel for f in find_files([root], exclude)]
    assert rels == ["a.py", "b.py", "pkg/m.py"]
    rels = [f.rel for f in find_files([str(root / "**" / "*.py")], exclude)]
    assert rels == ["a.py", "b.py", "pkg/m.py"]
    # a file given twice is read once; a file source's id is its name
    files = find_files([root / "a.py", root / "a.py", root], exclude)
    assert [f.rel for f in files] == ["a.py", "b.py", "pkg/m.py"]


def test_csv_rows_and_lines(tmp_path):
    path = tmp_path / "t.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerow(["one\ntwo\nthree", "a"])
        w.writerow(["four", "b"])
    [f] = find_files([path])
    docs = list(read_documents(f))
    assert [(d.text, d.line, d.doc_id) for d in docs] == [("one\ntwo\nthree", 2, "t.csv:2"), ("four", 5, "t.csv:5")]


def test_load_meta_errors(tmp_path):
    with pytest.raises(DataError, match="meta.json: not found"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a slmkit-tokens dataset"):
        load_meta(tmp_path)
    src = make_corpus(tmp_path / "c")
    meta = prepare(src, tmp_path / "ds", jsonl_field="body", csv_column="content")
    with open(tmp_path / "ds" / "train.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"train.bin: \d+ bytes, but meta.json says"):
        load_meta(tmp_path / "ds")
    (tmp_path / "ds" / "val.bin").unlink()
    (tmp_path / "ds" / "train.bin").write_bytes(b"\0\0" * meta["splits"]["train"]["tokens"])
    with pytest.raises(DataError, match="val.bin: missing"):
        load_meta(tmp_path / "ds")


def test_token_dataset_checks_meta_on_open(tmp_path):
    """Opening a dataset checks it: one line naming the file and the field, and what to do."""
    from slmkit.data.tokens import TokenDataset, dataset_tokenizer
    src = make_corpus(tmp_path / "c")
    meta = prepare(src, tmp_path / "ds", jsonl_field="body", csv_column="content")
    ds = TokenDataset(tmp_path / "ds")
    assert ds.meta == meta
    docs = ds.val_documents()  # each document as the format stores it: [bos] + tokens
    assert len(docs) == meta["splits"]["val"]["documents"] and all(d[0] == meta["bos_id"] for d in docs)
    assert sum(docs, []) == ds.val.tolist()
    meta_file = tmp_path / "ds" / "meta.json"

    def broken(**fields):
        meta_file.write_text(json.dumps({**meta, **fields}))
        with pytest.raises(DataError) as e:
            TokenDataset(tmp_path / "ds")
        return str(e.value)

    assert "meta.json: field 'dtype' is 'int8'" in broken(dtype="int8") and "slm data prepare" in broken(dtype="int8")
    assert "field 'vocab_size' is 70,000, more ids than dtype uint16 holds" in broken(vocab_size=70_000)
    assert "field 'splits.val.bytes' is None" in broken(splits={**meta["splits"], "val": {"tokens": 3}})
    message = broken(splits={**meta["splits"], "train": {**meta["splits"]["train"], "tokens": 5}})
    assert "train.bin:" in message and "'splits.train.tokens'" in message and "\n" not in message
    meta_file.write_text("{not json")
    with pytest.raises(DataError, match="meta.json: not valid JSON"):
        TokenDataset(tmp_path / "ds")
    meta_file.unlink()
    with pytest.raises(DataError, match="meta.json: not found — create a token dataset with `slm data prepare`"):
        TokenDataset(tmp_path / "ds")
    # ids read with another tokenizer than the dataset's are garbage: refused
    meta_file.write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(DataError, match="field 'tokenizer_sha256' is 000000000000…, but .*tokenizer is"):
        dataset_tokenizer(tmp_path / "ds")


def test_split_writer_continues_an_interrupted_write(tmp_path):
    from slmkit.data.tokens import SplitCounts, SplitWriter, write_meta
    with SplitWriter(tmp_path / "train.bin", "uint16") as w:
        w.write_documents([[5, 6], [7]], n_bytes=9, sep=1)
        done = SplitCounts(**vars(w.counts))
        w.write([8, 9, 10], n_bytes=3)  # a record the interruption tore
    assert done == SplitCounts(tokens=5, documents=2, bytes=9)
    with SplitWriter(tmp_path / "train.bin", "uint16", done) as w:  # resumes after the last complete record
        w.write([11], n_bytes=1)
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint16).tolist() == [1, 5, 6, 1, 7, 11]
    (tmp_path / "val.bin").write_bytes(b"")
    meta = write_meta(tmp_path, dtype="uint16", vocab_size=12, bos_id=1, eos_id=2, tokenizer_sha256=None,
                      splits={"train": w.counts, "val": SplitCounts()}, note="extra fields follow")
    assert meta["splits"]["train"] == {"tokens": 6, "documents": 3, "bytes": 10} and meta["note"]
    with pytest.raises(DataError, match=r"train.bin: 12 bytes, but meta.json says 7 uint16"):
        write_meta(tmp_path, dtype="uint16", vocab_size=12, bos_id=1, eos_id=2, tokenizer_sha256=None,
                   splits={"train": SplitCounts(tokens=7, bytes=0), "val": SplitCounts()})
    with pytest.raises(DataError, match="fewer than the 99 tokens already written"):
        SplitWriter(tmp_path / "train.bin", "uint16", SplitCounts(tokens=99))


def test_one_jsonl_reader_for_every_file(tmp_path):
    """slmkit.files.iter_jsonl: plain or .gz, BOM and blank lines tolerated, every bad line as file:line: reason."""
    import gzip

    from slmkit.files import JsonlError, iter_jsonl, read_jsonl
    rows = [{"text": "a"}, {"text": "é"}]
    plain = tmp_path / "r.jsonl"
    plain.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(json.dumps(r) for r in rows).encode() + b"\n\n")
    with gzip.open(tmp_path / "r.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_jsonl(plain)) == [(1, rows[0]), (3, rows[1])]
    assert read_jsonl(tmp_path / "r.jsonl.gz") == rows
    bad = tmp_path / "bad.jsonl"
    for content, line, reason in [(b'{"a": 1}\n{"a": \n', 2, "not valid JSON (Expecting value, column 7)"),
                                  (b'{"a": 1}\n\n[1, 2]\n', 3, "expected a JSON object, got list"),
                                  (b'{"a": "caf\xe9"}\n', 1, "invalid UTF-8 (byte 0xe9 at column 11)")]:
        bad.write_bytes(content)
        with pytest.raises(JsonlError, match=rf"^{re.escape(f'{bad}:{line}: {reason}')} — "):
            list(iter_jsonl(bad))
    bad.write_bytes(b'{"a": 1}\n{"torn\n{"a": 3}\n')
    skipped = []
    assert [r["a"] for _, r in iter_jsonl(bad, on_error=skipped.append)] == [1, 3]
    assert [(e.line, e.path) for e in skipped] == [(2, str(bad))]
