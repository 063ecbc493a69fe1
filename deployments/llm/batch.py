"""The running batch: one left-padded KV cache shared by all running sequences.

Why left-padded merging rather than a slot cache: a plain HF model takes one `cache_position`
for the whole batch, so per-row positions need either custom attention kernels or padding.
Left padding keeps every row's newest token in the last column, so one decode step for the
whole batch is a single ordinary forward (input [B, 1], a 2-D attention mask and per-row
position_ids) that works for any decoder-only AutoModelForCausalLM. A new sequence is prefilled
on its own (no padding inside a forward, so no fully-masked rows) and merged in by padding the
shorter cache on the left; a finished row is dropped with index_select and the columns that have
become padding for every row are trimmed. Merge and trim copy the cache, which costs far less
than the model step on the models this engine serves.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import DynamicCache

from deployments.llm.sequence import Sequence


class RunningBatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.seqs: list[Sequence] = []
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None   # [B, T] 1 = real token, 0 = padding

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def padded_tokens(self, extra_rows: int = 0, extra_width: int = 0) -> int:
        """Cache size in tokens (padding included) if `extra_rows` of `extra_width` joined."""
        return (len(self) + extra_rows) * max(self.width, extra_width)

    def add(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Merges rows with their own cache (same width among themselves) into the batch."""
        if self.cache is None:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            return
        width = max(self.width, mask.shape[1])
        _pad_left(self.cache, width - self.width)
        _pad_left(cache, width - mask.shape[1])
        self.mask = torch.cat([_padded(self.mask, width), _padded(mask, width)], dim=0)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.seqs.extend(seqs)

    def step_inputs(self) -> dict:
        """Model inputs for decoding one token in every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        positions = torch.tensor([[s.num_tokens - 1] for s in self.seqs], device=self.device)
        tokens = torch.tensor([[s.last_token] for s in self.seqs], device=self.device)
        return {"input_ids": tokens, "attention_mask": self.mask, "position_ids": positions,
                "past_key_values": self.cache}

    def remove_finished(self) -> None:
        self.remove(lambda s: s.finished)

    def remove(self, gone) -> None:
        """Drops the rows whose sequence `gone(seq)` is true."""
        keep = [i for i, s in enumerate(self.seqs) if not gone(s)]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.seqs, self.cache, self.mask = [], None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask = self.mask.index_select(0, idx)
        lead = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # all-padding columns
        self.mask = self.mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]


def _pad_left(cache: DynamicCache, n: int) -> None:
    if n <= 0:
        return
    for layer in cache.layers:
        layer.keys = _zeros_before(layer.keys, n)
        layer.values = _zeros_before(layer.values, n)


def _zeros_before(t: torch.Tensor, n: int) -> torch.Tensor:
    b, h, _, d = t.shape
    return torch.cat([t.new_zeros(b, h, n, d), t], dim=2)


def _padded(mask: torch.Tensor, width: int) -> torch.Tensor:
    n = width - mask.shape[1]
    return mask if n <= 0 else torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)
