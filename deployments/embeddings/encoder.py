"""Pure sentence-transformers encoding: tokenize with checks, then encode length-sorted
sub-batches under a token budget. Knows nothing of Ray or HTTP; imported only in replicas.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

from deployments.config import EmbeddingEngineConfig
from deployments.errors import InvalidRequestError
from deployments.sources import resolve_source
from deployments.types import truncation_length
from deployments.torch_utils import pick_device, pick_dtype, set_threads


class Encoder:
    def __init__(self, model: Any, cfg: EmbeddingEngineConfig):
        self.model = model
        self.cfg = cfg
        self.tokenizer = model.tokenizer
        self.max_length = int(model.max_seq_length or self.tokenizer.model_max_length)
        self.dim = int(model.get_embedding_dimension())
        self.normalizes = any(type(m).__name__ == "Normalize" for m in model)
        self._prefix, self._suffix = _special_tokens_around(self.tokenizer)

    @classmethod
    def load(cls, source: str, cfg: EmbeddingEngineConfig) -> "Encoder":
        from sentence_transformers import SentenceTransformer
        set_threads(cfg.num_threads)
        resolved = resolve_source(source)
        if resolved.kind not in ("dir", "hub"):
            raise ValueError(f"embedding source must be a directory or HF id, got {source!r}")
        device = pick_device(cfg.device)
        model = SentenceTransformer(resolved.path, device=str(device), trust_remote_code=cfg.trust_remote_code)
        if device.type == "cuda":
            model = model.to(pick_dtype(cfg.dtype, device, gpu_default=torch.float16))
        return cls(model.eval(), cfg)

    # ------------------------------------------------------------------ tokenization (event loop)

    def tokenize(self, inputs: list[Union[str, list[int]]], keep: Optional[int] = None) -> list[list[int]]:
        """Token ids of each input, framed by the model's special tokens. `keep` (vLLM's
        truncate_prompt_tokens): each input's first `keep` tokens, special tokens included (-1: the
        model's maximum); otherwise an input over the maximum is a 400 unless the config truncates."""
        keep = self._check_keep(keep)
        texts = [(i, self.cfg.query_prefix + x if self.cfg.query_prefix else x)
                 for i, x in enumerate(inputs) if isinstance(x, str)]
        out: list[list[int]] = [[] for _ in inputs]
        if texts:
            enc = self.tokenizer([t for _, t in texts], add_special_tokens=True, truncation=False)["input_ids"]
            for (i, _), ids in zip(texts, enc):
                out[i] = ids
        vocab = len(self.tokenizer)
        for i, x in enumerate(inputs):
            if isinstance(x, list):
                bad = [t for t in x if not 0 <= t < vocab]
                if bad:
                    raise InvalidRequestError(f"Invalid token in input: {bad[0]}. Minimum value is 0, maximum "
                                              f"value is {vocab - 1} (inclusive).", param="input")
                out[i] = self._prefix + list(x) + self._suffix
        if keep is not None:
            return [self._cut(ids, keep) for ids in out]
        return [self._fit(ids, i) for i, ids in enumerate(out)]

    def _check_keep(self, keep: Optional[int]) -> Optional[int]:
        if keep is None:
            return None
        keep = truncation_length(keep, self.max_length, "maximum length")
        framing = len(self._prefix) + len(self._suffix)
        if keep <= framing:
            raise InvalidRequestError(f"truncate_prompt_tokens ({keep}) leaves no room for text beside this model's "
                                      f"{framing} special tokens.", param="truncate_prompt_tokens",
                                      code="invalid_value")
        return keep

    def _fit(self, ids: list[int], index: int) -> list[int]:
        if len(ids) <= self.max_length:
            return ids
        if not self.cfg.truncate:
            raise InvalidRequestError(
                f"Input {index} has {len(ids)} tokens; this model's maximum is {self.max_length}. "
                "Shorten it (or enable truncation in the model config).", param="input",
                code="context_length_exceeded")
        return self._cut(ids, self.max_length)

    def _cut(self, ids: list[int], keep: int) -> list[int]:
        """The first `keep` tokens, the closing special tokens kept (as the tokenizer's own truncation
        keeps [CLS] ... [SEP])."""
        if len(ids) <= keep:
            return ids
        tail = len(self._suffix)
        return ids[: keep - tail] + ids[len(ids) - tail:]

    # ------------------------------------------------------------------ encoding (worker thread)

    @torch.inference_mode()
    def encode(self, token_lists: list[list[int]]) -> np.ndarray:
        """float32 [len(token_lists), dim], in input order."""
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        out = np.empty((len(token_lists), self.dim), dtype=np.float32)
        for chunk in self._budget_chunks(order, token_lists):
            feats = self._features([token_lists[i] for i in chunk])
            emb = self.model(feats)["sentence_embedding"]
            out[chunk] = emb.float().cpu().numpy()
        return out

    def _budget_chunks(self, order: list[int], token_lists: list[list[int]]):
        chunk: list[int] = []
        for i in order:  # ascending length: the newest item is the longest, so padding = len * rows
            if chunk and len(token_lists[i]) * (len(chunk) + 1) > self.cfg.max_batch_tokens:
                yield chunk
                chunk = []
            chunk.append(i)
        if chunk:
            yield chunk

    def _features(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        feats = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            feats["token_type_ids"] = torch.zeros_like(ids)
        return {k: v.to(self.model.device) for k, v in feats.items()}

    def shorten(self, vectors: np.ndarray, dimensions: int) -> np.ndarray:
        """Matryoshka truncation, re-normalised when the model normalises."""
        out = np.ascontiguousarray(vectors[:, :dimensions])
        if self.normalizes:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def _special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [CLS] ... [SEP]), so
    token-id inputs are framed exactly as text inputs are."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []
