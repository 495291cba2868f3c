"""A cross-encoder: an encoder (model/encoder.py) reading a query and a passage together, scored by a head on the
first token ([CLS] / <s>), as transformers' BertForSequenceClassification / RobertaForSequenceClassification with
num_labels=1 compute it (sentence-transformers' CrossEncoder format):

    [CLS] query [SEP] passage [SEP] -> encoder -> h[:, 0] -> dense -> tanh -> out -> one score (a logit)

BERT calls the dense + tanh its pooler (`bert.pooler.dense`) and `out` its classifier (`classifier`); RoBERTa
calls them `classifier.dense` and `classifier.out_proj`. One module computes both; formats/reranker_dir.py maps
the names. Dropout sits where transformers puts it (before `out`, and before RoBERTa's dense).
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.model.encoder import Encoder, EncoderConfig


class ScoreHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.out = nn.Linear(cfg.dim, 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.roberta = cfg.flavour == "roberta"
        for layer in (self.dense, self.out):  # BERT's initialisation, as Encoder._init
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        if self.roberta:
            first = self.dropout(first)
        return self.out(self.dropout(torch.tanh(self.dense(first)))).squeeze(-1)


class CrossEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, encoder: Encoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else Encoder(cfg)
        self.head = ScoreHead(cfg)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One relevance logit per row of `ids` (batch, seq): higher is more relevant."""
        return self.head(self.encoder(ids, attention_mask, token_type_ids)[:, 0])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
