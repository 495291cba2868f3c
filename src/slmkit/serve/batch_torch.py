"""`TorchBatch`: continuous batching over slmkit's own model, the engine's batched decoder for a `TorchLM`.

Every running row keeps its keys and values in one row of a SlotKVCache (each row at its own position), so a
decoding step is one (n, 1) forward pass for all n rows: the weights are read once per step for all of them.
Speculative decoding feeds each row a block of drafted tokens instead, (n, T), and rolls rejected ones back.
With a draft model (`DraftedBatch`), the draft's rows sit beside the target's, in a SlotKVCache of their own.
A prompt that shares its beginning with a recent one starts from that one's keys and values (PrefixCache).
With LoRA adapters loaded side by side (`lm.adapters`, model/multi_lora.py), each row runs its own: the adapter
bank gets the running rows' adapters before every forward pass.
"""

from __future__ import annotations

import torch

from slmkit.lm.torch_lm import TorchLM
from slmkit.model.decode import KVCache, PrefixCache, SlotKVCache


class TorchBatch:
    """Rows of slmkit's model decoding together through a SlotKVCache (the interface: engine.batch_decoder)."""

    def __init__(self, lm: TorchLM, max_batch: int, prefix_cache_mb: float = 0):
        self.model = lm.model
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = SlotKVCache(self.model.cfg, max_batch, self.model.cfg.max_seq_len, device=self.device,
                                 dtype=self.dtype)
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.adapters = getattr(lm, "adapters", None)  # an AdapterBank, or None: every row is the base
        self.row_adapter = [0] * max_batch  # each row's adapter slot

    @property
    def n_active(self) -> int:
        return self.cache.n_active

    @n_active.setter
    def n_active(self, n: int) -> None:
        self.cache.n_active = n

    def prefill(self, row: int, ids: list[int], adapter: int = 0) -> torch.Tensor:
        """The prompt `ids` into `row`, through adapter slot `adapter` (0: the base); its next-token logits."""
        if adapter and self.adapters is None:
            raise ValueError("this model has no adapters loaded")
        # The prompt runs through a cache of its own, then is copied into its row: the running rows are untouched.
        single = KVCache(self.model.cfg, 1, len(ids), device=self.device, dtype=self.dtype)
        hit = self.prefixes.longest(ids, tag=adapter) if self.prefixes is not None else None
        if hit is not None:
            self.prefixes.fill(single, hit[1], hit[0])
        new = ids[single.length:]
        logits = self._forward(torch.tensor([new], device=self.device), single, adapter)[0, -1].float().cpu()
        self.cache.load_row(row, single)
        self.row_adapter[row] = adapter
        if self.prefixes is not None:
            self.prefixes.store(ids, single, tag=adapter)
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        self.cache.n_active = len(tokens)
        x = torch.tensor([[t] for t in tokens], device=self.device)
        rows = torch.tensor(self.row_adapter[:len(tokens)], device=self.device) if self.adapters is not None else 0
        return self._forward(x, self.cache, rows)[:, -1].float().cpu()

    def decode_many(self, blocks: list[list[int]]) -> torch.Tensor:
        """Row i's tokens blocks[i] (its last token, then the tokens drafted after it) in one (n, T) forward pass,
        T the longest block; (n, T, vocab) logits, row i's first len(blocks[i]) of them its own. A shorter block
        is padded with its last token: the padding's keys sit after the row's real tokens, which never attend to
        them, and `rollback` drops them with the rejected drafts."""
        T = max(len(b) for b in blocks)
        self.cache.n_active = len(blocks)
        x = torch.tensor([b + b[-1:] * (T - len(b)) for b in blocks], device=self.device)
        rows = torch.tensor(self.row_adapter[:len(blocks)], device=self.device) if self.adapters is not None else 0
        return self._forward(x, self.cache, rows).float().cpu()

    def room(self) -> int:
        """The longest block every active row can take: positions left in the fullest row."""
        return self.cache.max_len - int(self.cache.lengths[:self.cache.n_active].max())

    def rollback(self, drop: list[int]) -> None:
        """Forget the last drop[i] positions of row i (drafted tokens its target rejected, the padding)."""
        self.cache.rollback(drop)

    def _forward(self, x: torch.Tensor, cache, adapter_rows) -> torch.Tensor:
        if self.adapters is None:
            return self.model(x, cache=cache)
        self.adapters.rows = adapter_rows
        try:
            return self.model(x, cache=cache)
        finally:
            self.adapters.rows = None  # anything else the model runs (embeddings) is the base

    def move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)
        self.row_adapter[dst] = self.row_adapter[src]


class DraftedBatch(TorchBatch):
    """The target's TorchBatch with a draft model's alongside, row for row (the engine's batched decoder for a
    `SpeculativeLM` whose draft is another slmkit model): prefill, move_row and n_active act on both; the rest is
    the target's, and `draft` is the draft's own TorchBatch, which the engine feeds and rolls back itself. The
    draft keeps no prefix cache: its prompts are cheap to recompute, and `prefix_cache_mb` stays the target's."""

    def __init__(self, target: TorchLM, draft: TorchLM, max_batch: int, prefix_cache_mb: float = 0):
        super().__init__(target, max_batch, prefix_cache_mb)
        self.draft = TorchBatch(draft, max_batch)

    @TorchBatch.n_active.setter  # the target's getter
    def n_active(self, n: int) -> None:
        self.cache.n_active = n
        self.draft.n_active = n

    def prefill(self, row: int, ids: list[int], adapter: int = 0) -> torch.Tensor:
        logits = super().prefill(row, ids, adapter)
        self.draft.prefill(row, ids)  # the draft has no adapters: a row's drafts come from the base draft
        return logits

    def move_row(self, src: int, dst: int) -> None:
        super().move_row(src, dst)
        self.draft.move_row(src, dst)
