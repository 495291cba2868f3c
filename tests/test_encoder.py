"""The encoder (model/encoder.py, formats/encoder_dir.py, lm/embedder.py): the same numbers as transformers'
BertModel / BertForMaskedLM / RobertaForMaskedLM both ways, with padding; all-MiniLM-L6-v2's sentence embeddings
as sentence-transformers computes them; `slm embed`."""

import json

import pytest
import torch
from conftest import pulled
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.formats.encoder_dir import load_encoder_dir, save_encoder_dir
from slmkit.model.encoder import Encoder, EncoderConfig, mean_pool

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_positions=24)


def batch(cfg: EncoderConfig, lengths=(24, 17, 5)):
    """Right-padded random ids with their attention mask (pads are cfg.pad_token_id, real ids avoid it)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(lengths), max(lengths)), cfg.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (n,), generator=g)
        mask[r, :n] = 1
    return ids, mask


def close_on_real_tokens(a, b, mask, atol=1e-4):
    m = mask.bool()
    assert (a[m] - b[m]).abs().max().item() <= atol


@pytest.mark.parametrize("flavour", ["bert", "roberta"])
def test_our_masked_lm_directory_loads_in_transformers_with_the_same_logits(tmp_path, flavour):
    torch.manual_seed(0)
    cfg = EncoderConfig(**TINY, flavour=flavour, mlm_head=True, pad_token_id=1 if flavour == "roberta" else 0)
    ours = Encoder(cfg).eval()
    with torch.no_grad():
        ours.lm_head.bias.normal_()  # not zero, so a bias that went missing shows
    save_encoder_dir(ours, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == [{"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}[flavour]]
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "m").eval()
    ids, mask = batch(cfg)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours.mlm_logits(ours(ids, mask))
    close_on_real_tokens(got, want, mask)
    reloaded = load_encoder_dir(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded.mlm_logits(reloaded(ids, mask)), got)


def test_a_transformers_bert_loads_into_ours_with_the_same_hidden_states(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=24)
    for cls in (transformers.BertModel, transformers.BertForMaskedLM):
        theirs = cls(hf_cfg).eval()
        theirs.save_pretrained(tmp_path / cls.__name__)
        ours = load_encoder_dir(tmp_path / cls.__name__)
        assert ours.cfg.mlm_head == (cls is transformers.BertForMaskedLM)
        ids, mask = batch(ours.cfg)
        tt = torch.randint(0, 2, ids.shape)
        with torch.no_grad():
            out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
            hidden = ours(ids, mask, tt)
            close_on_real_tokens(hidden, out.hidden_states[-1], mask)
            if ours.cfg.mlm_head:
                close_on_real_tokens(ours.mlm_logits(hidden), out.logits, mask)


def test_bad_encoder_configs_and_directories_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        EncoderConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown encoder flavour"):
        EncoderConfig(flavour="electra")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an encoder"):
        load_encoder_dir(tmp_path / "llama")


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(h, torch.tensor([[1, 1, 0]]), normalize=False), torch.tensor([[2.0, 0.0]]))


def test_minilm_embeds_like_sentence_transformers_and_slm_embed_prints_the_vectors():
    from slmkit.lm.embedder import Embedder, load_embedder
    path = pulled("minilm-l6-v2")
    texts = ["How do I return an item?", "What is your refund policy?", "The weather is sunny today.",
             "word " * 400]
    emb = load_embedder("minilm-l6-v2")
    assert isinstance(emb, Embedder) and emb.max_length == 256  # sentence_bert_config.json's max_seq_length
    got = emb.embed(texts)
    # sentence-transformers' computation, with transformers: its tokenizer (CLS/SEP, cut at 256), mean, normalise
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    b = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        want = mean_pool(model(**b).last_hidden_state, b["attention_mask"])
    assert (got - want).abs().max().item() <= 1e-4
    sims = got[:3] @ got[:3].T
    assert sims[0, 1] > 0.3 > sims[0, 2]  # the two questions about returns are close, the weather is not

    result = CliRunner().invoke(app, ["embed", "minilm-l6-v2", texts[0], texts[2]])
    assert result.exit_code == 0, result.output
    vectors = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert torch.allclose(torch.tensor(vectors), got[[0, 2]], atol=1e-5)
