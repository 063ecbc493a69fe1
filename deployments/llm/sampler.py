"""Per-row sampling vectorised over the batch.

Order, as in OpenAI/vLLM: logit_bias, presence/frequency penalties (over the sequence's output
tokens), the grammar's mask (response_format, forced tool calls), temperature, top_p, then a draw by inverse CDF (one uniform number per row: a cumsum and
a searchsorted, far cheaper on CPU than drawing a noise value per vocabulary entry). A seeded
sequence draws its number from its own generator, so its output does not depend on its batch
mates. temperature == 0 is greedy.
"""
from __future__ import annotations

from typing import Optional

import torch

from deployments.llm.sequence import Sequence
from deployments.llm.structured import apply_grammars

_NUCLEUS_CANDIDATES = 512   # top_p looks at this many best tokens first, and sorts everything only if needed


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, V] for the next token of each sequence -> token ids [B]."""
        logits = logits[:, : self.vocab_size].to(torch.float32, copy=True)   # the caller's stay raw (logprobs)
        self._apply_bias(logits, seqs)
        self._apply_penalties(logits, seqs)
        apply_grammars(logits, seqs)
        temps = torch.tensor([_or(s.params.temperature, 1.0) for s in seqs], device=logits.device)
        greedy = temps == 0
        if bool(greedy.all()):
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temps.clamp(min=1e-5).unsqueeze(1), dim=-1)
        top_p = [_or(s.params.top_p, 1.0) for s in seqs]
        if any(p < 1.0 for p in top_p):
            probs = _top_p(probs, torch.tensor(top_p, device=logits.device))
        cdf = probs.cumsum(dim=-1)
        target = self._uniform(seqs).unsqueeze(1) * cdf[:, -1:]
        sampled = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _apply_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [(r, s) for r, s in enumerate(seqs) if s.params.logit_bias]
        if not rows:
            return
        row_idx = torch.cat([torch.full((len(s.params.logit_bias),), r) for r, s in rows]).to(logits.device)
        ids = torch.cat([s.bias_tensors()[0] for _, s in rows]).to(logits.device)
        vals = torch.cat([s.bias_tensors()[1] for _, s in rows]).to(logits.device)
        logits.index_put_((row_idx, ids), vals, accumulate=True)
        banned = vals <= -100                      # -100 bans the token outright
        if bool(banned.any()):
            logits[row_idx[banned], ids[banned]] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs)
                if s.output_ids and (s.params.presence_penalty or s.params.frequency_penalty)]
        if not rows:
            return
        counts = torch.zeros(len(rows), logits.shape[1], device=logits.device)
        for k, row in enumerate(rows):
            ids = torch.tensor(seqs[row].output_ids, device=logits.device)
            counts[k].scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
        freq = torch.tensor([seqs[r].params.frequency_penalty for r in rows], device=logits.device)
        pres = torch.tensor([seqs[r].params.presence_penalty for r in rows], device=logits.device)
        index = torch.tensor(rows, device=logits.device)
        logits[index] -= counts * freq.unsqueeze(1) + (counts > 0).float() * pres.unsqueeze(1)

    def _uniform(self, seqs: list[Sequence]) -> torch.Tensor:
        u = torch.rand(len(seqs))
        for row, s in enumerate(seqs):
            if s.generator is not None:
                u[row] = torch.rand(1, generator=s.generator)[0]
        return u.to(self.device)


def _or(value: Optional[float], default: float) -> float:
    return default if value is None else value


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero out the tail beyond each row's nucleus (always keeping the most likely token).

    Exact: the nucleus is found among the best few hundred tokens when their mass reaches top_p
    (the usual case), and by a full sort of the vocabulary otherwise."""
    k = min(_NUCLEUS_CANDIDATES, probs.shape[1])
    values, order = probs.topk(k, dim=-1)
    if bool((values.sum(dim=-1) < top_p).any()):
        values, order = probs.sort(dim=-1, descending=True)
    outside = (values.cumsum(dim=-1) - values) > top_p.unsqueeze(1)
    return torch.zeros_like(probs).scatter_(-1, order, values.masked_fill(outside, 0.0))


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, Optional[tuple]]:
    """Log-probabilities of the chosen tokens under the model (before sampling adjustments),
    plus the top-k alternatives when k > 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen, (logp.topk(k, dim=-1) if k > 0 else None)


def make_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen
