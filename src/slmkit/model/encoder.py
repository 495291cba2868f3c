"""A bidirectional transformer encoder: BERT and RoBERTa (Devlin et al. 2019; Liu et al. 2019), as transformers
builds them, so their model directories load both ways (all-MiniLM-L6-v2 is a BERT: `slm pull minilm-l6-v2`).

    ids -> word + position + token-type embeddings -> LayerNorm -> n x [ self-attention -> add & LayerNorm ->
           GELU MLP -> add & LayerNorm ] -> hidden states (batch, seq, dim)     (+ MaskedLMHead -> logits)

Post-norm (the LayerNorm after each residual add), learned absolute positions and exact-erf GELU, as in the HF
classes. The two flavours differ only in positions: BERT numbers them 0..T-1; RoBERTa numbers real tokens from
pad_token_id + 1 and gives padding pad_token_id (so its table has max_positions + pad + 1 rows), and has one token
type. Module names are transformers' own (embeddings.word_embeddings, encoder.layer.N.attention.self.query, ...),
so a state dict maps to theirs by a prefix. Padding is a key mask in scaled_dot_product_attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

FLAVOURS = ("bert", "roberta")


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 1536
    max_positions: int = 512  # tokens per sequence (RoBERTa's table holds pad_token_id + 1 more rows)
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    dropout: float = 0.1  # hidden and attention dropout while training (BERT's and RoBERTa's 0.1)
    flavour: str = "bert"  # bert | roberta
    mlm_head: bool = False  # a masked-LM head on top (RoBERTa's pretraining objective)

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown encoder flavour {self.flavour!r}; choose one of {', '.join(FLAVOURS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_positions", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"encoder {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"encoder dim {self.dim} is not divisible by n_heads {self.n_heads}")

    @property
    def position_rows(self) -> int:
        return self.max_positions + (self.pad_token_id + 1 if self.flavour == "roberta" else 0)

    def to_hf(self) -> dict:
        arch = {("bert", False): "BertModel", ("bert", True): "BertForMaskedLM",
                ("roberta", False): "RobertaModel", ("roberta", True): "RobertaForMaskedLM"}
        return {"architectures": [arch[self.flavour, self.mlm_head]], "model_type": self.flavour,
                "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "intermediate_size": self.hidden_dim, "hidden_act": "gelu",
                "max_position_embeddings": self.position_rows, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.norm_eps, "pad_token_id": self.pad_token_id,
                "hidden_dropout_prob": self.dropout, "attention_probs_dropout_prob": self.dropout,
                "position_embedding_type": "absolute", "initializer_range": 0.02}

    @classmethod
    def from_hf(cls, hf: dict) -> EncoderConfig:
        flavour = hf.get("model_type")
        if flavour not in FLAVOURS:
            raise ValueError(f"config.json: model_type {flavour!r} is not an encoder slmkit reads (bert, roberta)")
        if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("config.json: only GELU encoders with absolute positions are supported "
                             f"(hidden_act {hf.get('hidden_act')!r}, positions {hf.get('position_embedding_type')!r})")
        pad = hf.get("pad_token_id", 0 if flavour == "bert" else 1)
        rows = hf["max_position_embeddings"]
        archs = hf.get("architectures") or []
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"], hidden_dim=hf["intermediate_size"],
                   max_positions=rows - (pad + 1 if flavour == "roberta" else 0),
                   type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
                   pad_token_id=pad, dropout=hf.get("hidden_dropout_prob", 0.1), flavour=flavour,
                   mlm_head=any(a.endswith("ForMaskedLM") for a in archs))

    def to_dict(self) -> dict:
        return asdict(self)


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.position_rows, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.flavour == "roberta":  # real tokens count from pad + 1; padding sits at pad
            real = (ids != self.cfg.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.cfg.pad_token_id
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def forward(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        x = self.word_embeddings(ids) + self.position_embeddings(self.positions(ids)) \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (b, 1, 1, t): True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, t, d)


class AddNorm(nn.Module):
    """dense, dropout, add the residual, LayerNorm: how each BERT sub-layer ends (HF's *Output classes)."""

    def __init__(self, cfg: EncoderConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AddNorm(cfg, cfg.dim)


class Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.hidden_dim)


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, key_mask), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class Layers(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))


class MaskedLMHead(nn.Module):
    """dense, GELU, LayerNorm, then scores over the vocabulary with the word embeddings (tied) plus a bias."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(F.gelu(self.dense(h))), word_embeddings, self.bias)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Layers(cfg)
        self.lm_head = MaskedLMHead(cfg) if cfg.mlm_head else None
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (batch, seq, dim) of `ids` (batch, seq); `attention_mask` (batch, seq) is 1/True for
        real tokens and 0/False for padding (None: no padding)."""
        key_mask = None if attention_mask is None else attention_mask.bool()
        x = self.embeddings(ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x

    def forward_pruned(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, keep,
                       token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward under a length schedule (one fraction of the tokens kept per layer; model/length_drop.py):
        (hidden states, mask of the tokens kept), both shorter than `ids` where tokens were dropped."""
        from slmkit.model.length_drop import pruned_forward
        return pruned_forward(self, ids, attention_mask, keep, token_type_ids)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise ValueError("this encoder has no masked-LM head (config mlm_head is false)")
        return self.lm_head(hidden, self.embeddings.word_embeddings.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """One vector per sequence: the mean of its real tokens' hidden states (sentence-transformers' pooling),
    L2-normalised so dot products are cosine similarities."""
    m = attention_mask.to(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


# ---- presets: the encoder shapes `slm train --objective mlm --preset NAME` builds -------------------------------
# All RoBERTa-flavoured with a masked-LM head (what MLM pretraining from scratch trains); vocab_size, pad_token_id
# and max_positions are set by the training run from its tokenizer and --seq-len. enc-mini is all-MiniLM-L6-v2's
# shape (MiniLM-L6-H384), roberta-base RoBERTa-base's (125M parameters with its 50k vocabulary).
ENCODER_PRESETS: dict[str, dict] = {
    "enc-tiny": dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, hidden_dim=512, max_positions=128),
    "enc-micro": dict(vocab_size=8192, dim=256, n_layers=6, n_heads=4, hidden_dim=1024, max_positions=256),
    "enc-mini": dict(vocab_size=30522, dim=384, n_layers=6, n_heads=12, hidden_dim=1536, max_positions=512),
    "roberta-base": dict(vocab_size=50265, dim=768, n_layers=12, n_heads=12, hidden_dim=3072, max_positions=512),
}


def encoder_config(preset: str = "enc-tiny", **overrides) -> EncoderConfig:
    """The EncoderConfig of `preset` reshaped by `overrides` (strings from the command line are typed)."""
    from slmkit.model.config import coerce_field  # here, not at the top, so the presets stay one block
    if preset not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {preset!r}; choose one of: {', '.join(ENCODER_PRESETS)}")
    fields = {"flavour": "roberta", "mlm_head": True, "norm_eps": 1e-5, **ENCODER_PRESETS[preset]}
    for k, v in overrides.items():
        fields[k] = coerce_field(k, v, EncoderConfig)
    return EncoderConfig(**fields)
