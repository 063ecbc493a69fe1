"""The running batch: the sequences decoding now, row i of the KV cache (kv_cache.py) for the i-th.

It keeps the rows and the cache in step: sequences join with their cache rows and leave with them.
The cache tensors themselves are changed only in kv_cache.py.
"""
from __future__ import annotations

from typing import Union

import torch
from transformers import DynamicCache

from deployments.llm.kv_cache import KVCache, SlotKVCache
from deployments.llm.sequence import Sequence


class RunningBatch:
    def __init__(self, device: torch.device, kv: Union[KVCache, SlotKVCache, None] = None):
        self.device = device
        self.seqs: list[Sequence] = []
        self.kv = kv if kv is not None else KVCache()

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def cache(self) -> Union[DynamicCache, SlotKVCache, None]:
        return self.kv.cache

    @property
    def width(self) -> int:
        return self.kv.width

    def add(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Merges rows with their own cache (same width among themselves) into the batch."""
        self.kv.merge(cache, mask)
        self.seqs.extend(seqs)

    def step_inputs(self) -> dict:
        """Model inputs for decoding one token in every row."""
        mask = self.kv.add_column()
        positions = torch.tensor([[s.num_tokens - 1] for s in self.seqs], device=self.device)
        tokens = torch.tensor([[s.last_token] for s in self.seqs], device=self.device)
        return {"input_ids": tokens, "attention_mask": mask, "position_ids": positions,
                "past_key_values": self.kv.cache}

    def remove_finished(self) -> None:
        self.remove(lambda s: s.finished)

    def remove(self, gone) -> None:
        """Drops the rows whose sequence `gone(seq)` is true."""
        keep = [i for i, s in enumerate(self.seqs) if not gone(s)]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.seqs = []
            self.kv.clear()
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.kv.keep_rows(torch.tensor(keep, device=self.device))
