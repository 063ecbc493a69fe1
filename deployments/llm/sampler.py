"""Per-row sampling vectorised over the batch.

Order, as in OpenAI/vLLM: logit_bias, presence/frequency penalties (over the sequence's output
tokens), vLLM's repetition_penalty (over its prompt and output tokens), allowed_token_ids and bad_words, EOS
and stop_token_ids held back until min_tokens, the grammar's mask (response_format,
structured_outputs, forced tool calls), temperature, then vLLM's min_p and top_k, top_p, then a
draw by inverse CDF (one uniform number per row: a cumsum and a searchsorted, far cheaper on CPU
than drawing a noise value per vocabulary entry). A seeded sequence draws its number from its own
generator, so its output does not depend on its batch mates. temperature == 0 is greedy.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from deployments.llm.sequence import Sequence
from deployments.llm.structured import apply_grammars

_NUCLEUS_CANDIDATES = 512   # top_p looks at this many best tokens first, and sorts everything only if needed


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, eos_ids: Iterable[int] = ()):
        self.vocab_size = vocab_size
        self.device = device
        self.eos_ids = sorted(i for i in eos_ids if 0 <= i < vocab_size)   # held back until min_tokens

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, V] for the next token of each sequence -> token ids [B]."""
        logits = logits[:, : self.vocab_size].to(torch.float32, copy=True)   # the caller's stay raw (logprobs)
        self._apply_bias(logits, seqs)
        self._apply_penalties(logits, seqs)
        self._apply_repetition_penalty(logits, seqs)
        self._allow_only(logits, seqs)
        self._ban_bad_words(logits, seqs)
        self._hold_back_stops(logits, seqs)
        apply_grammars(logits, seqs)
        self._mark_dead_ends(logits, seqs)
        temps = torch.tensor([_or(s.params.temperature, 1.0) for s in seqs], device=logits.device)
        greedy = temps == 0
        if bool(greedy.all()):
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temps.clamp(min=1e-5).unsqueeze(1), dim=-1)
        probs = _min_p_and_top_k(probs, seqs)
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

    def _apply_repetition_penalty(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """vLLM's (and HF's) repetition_penalty: every token already in the prompt or the output has its
        logit divided by the penalty where positive, multiplied where negative."""
        rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        if not rows:
            return
        seen = torch.stack([seqs[r].seen_tokens(logits.shape[1], logits.device) for r in rows])
        index = torch.tensor(rows, device=logits.device)
        penalty = torch.tensor([seqs[r].params.repetition_penalty for r in rows], device=logits.device).unsqueeze(1)
        sub = logits[index]
        logits[index] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)

    def _allow_only(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """vLLM's allowed_token_ids: every other token of the row is masked out. Row by row: one fill and
        a gather and scatter of the allowed few is cheaper than a [rows, vocab] mask (bench/README.md)."""
        for row, s in enumerate(seqs):
            if s.params.allowed_token_ids:
                ids = s.allowed_tokens(logits.shape[1], logits.device)
                kept = logits[row, ids]
                logits[row] = float("-inf")
                logits[row, ids] = kept

    def _ban_bad_words(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """vLLM's bad_words: a token that would complete a bad word is masked out."""
        _mask_cells(logits, [(r, t) for r, s in enumerate(seqs) if s.params.bad_word_ids for t in s.bad_word_bans()])

    def _hold_back_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: EOS (unless ignore_eos) and stop_token_ids cannot be drawn before that many tokens."""
        _mask_cells(logits, [(r, t) for r, s in enumerate(seqs) if len(s.output_ids) < s.params.min_tokens
                             for t in (s.params.stop_token_ids + ([] if s.params.ignore_eos else self.eos_ids))])

    @staticmethod
    def _mark_dead_ends(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """A row whose masks exclude every token (a grammar against bans, or allowed_token_ids against
        bad_words) has nothing to draw: its sequence is marked, for the engine to fail that
        request alone, and its row made finite so the batch's arithmetic stays finite."""
        if not any(s.matcher is not None or s.params.allowed_token_ids or s.params.bad_word_ids or s.params.logit_bias
                   for s in seqs):
            return   # raw logits are finite: only masks can exclude every token
        dead = torch.isneginf(logits.amax(dim=-1))
        if bool(dead.any()):
            for r in dead.nonzero().flatten().tolist():
                seqs[r].no_token_left = True
            logits[dead] = 0.0

    def _uniform(self, seqs: list[Sequence]) -> torch.Tensor:
        u = torch.rand(len(seqs))
        for row, s in enumerate(seqs):
            if s.generator is not None:
                u[row] = torch.rand(1, generator=s.generator)[0]
        return u.to(self.device)


def _mask_cells(logits: torch.Tensor, cells: list[tuple[int, int]]) -> None:
    """Sets each (row, token) cell to -inf; tokens past the logits' width (ids the model has no
    logit for) are skipped."""
    cells = [(r, t) for r, t in cells if t < logits.shape[1]]
    if cells:
        rows, ids = zip(*cells)
        logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = float("-inf")


def _or(value: Optional[float], default: float) -> float:
    return default if value is None else value


def _min_p_and_top_k(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """vLLM's min_p (drop tokens less likely than min_p x the likeliest) and top_k (keep the k likeliest;
    ties at the k-th are kept), renormalised for top_p. Rows that set neither are left as they are."""
    min_p = [s.params.min_p for s in seqs]
    top_k = [s.params.top_k if 0 < s.params.top_k < probs.shape[1] else 0 for s in seqs]
    if not any(min_p) and not any(top_k):
        return probs
    floor = torch.zeros(len(seqs), 1, device=probs.device)
    if any(min_p):
        floor = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=probs.device).unsqueeze(1)
    if any(top_k):
        k = torch.tensor(top_k, device=probs.device)
        kth = probs.topk(max(top_k), dim=-1).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        floor = torch.maximum(floor, torch.where(k.unsqueeze(1) > 0, kth, torch.zeros_like(kth)))
    kept = probs.masked_fill(probs < floor, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


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
