"""Output processing: what a sampled token does to its sequence (stop, length, EOS, grammar end),
the logprob entries (token text and bytes, top alternatives), and each step's per-request chunk of
deltas (streamed text held back at stop strings, echo of the prompt, finish reasons).

Runs on the engine thread; no model work here beyond reading the logits it is given.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from deployments.errors import InvalidRequestError
from deployments.llm.detokenizer import TokenText
from deployments.llm.request import EngineRequest
from deployments.llm.sampler import compute_logprobs
from deployments.llm.sequence import Sequence, Status
from deployments.types import ChoiceDelta, GenerateChunk, RankedLogprob, TokenLogprob, constraint_param


class OutputProcessor:
    def __init__(self, model: Any, tokenizer: Any, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids(model, tokenizer)
        self.token_text = TokenText(tokenizer)

    def take(self, seq: Sequence, token: int) -> None:
        """Appends a sampled token to `seq` and finishes it where the token ends it."""
        seq.output_ids.append(token)
        p = seq.params
        if seq.matcher is not None:
            seq.matcher.accept_token(token)
        may_stop = len(seq.output_ids) >= p.min_tokens   # vLLM: no stop of any kind before min_tokens
        stop_token = token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos)
        if (stop_token and may_stop) or (seq.matcher is not None and seq.matcher.is_terminated()):
            seq.finish("stop")   # a stop token's text is not part of the output (vLLM's default)
        elif seq.stop.append(seq.detok.push(token), check=may_stop):
            seq.finish("stop")
        elif len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    # ------------------------------------------------------------------ logprobs

    def token_logprobs(self, logits, tokens, seqs, rows) -> None:
        """Adds to each of seqs[rows] the logprob entry of its sampled token (from `logits`)."""
        idx = torch.tensor(rows, device=logits.device)
        k = max(seqs[r].params.logprobs for r in rows)
        chosen, top = compute_logprobs(logits.index_select(0, idx), tokens.index_select(0, idx), k)
        for j, r in enumerate(rows):
            seq = seqs[r]
            alts = [] if top is None else list(zip(top.indices[j].tolist(), top.values[j].tolist()))
            seq.pending_logprobs.append(self.logprob(int(tokens[r]), float(chosen[j]), alts[: seq.params.logprobs],
                                                     seq.params.return_tokens_as_token_ids))

    def prompt_logprobs(self, tokens: list[int], logits: torch.Tensor, targets: torch.Tensor,
                        k: int, as_ids: bool = False) -> list[TokenLogprob]:
        if not tokens:
            return []
        chosen, top = compute_logprobs(logits, targets, k)
        out = []
        for j, token in enumerate(tokens):
            alts = [] if top is None else list(zip(top.indices[j].tolist(), top.values[j].tolist()))
            out.append(self.logprob(token, float(chosen[j]), alts, as_ids))
        return out

    def ranked_logprobs(self, tokens: list[int], logits: torch.Tensor, targets: torch.Tensor,
                        k: int) -> list[list[RankedLogprob]]:
        """vLLM's prompt_logprobs entries: each token's own logprob and rank, then the k likeliest
        tokens (the token itself once, if it is among them). Ranks count strictly likelier tokens, so
        they are read off the logits, which order a row as its log-softmax does."""
        if not tokens:
            return []
        chosen, top = compute_logprobs(logits, targets, k)
        raw = logits.float()
        ranks = (raw > raw.gather(-1, targets.unsqueeze(-1))).sum(-1) + 1
        out = []
        for j, token in enumerate(tokens):
            entry = [RankedLogprob(token, float(chosen[j]), int(ranks[j]), self.token_text(token)[0])]
            if top is not None:
                entry += [RankedLogprob(t, lp, r, self.token_text(t)[0]) for r, (t, lp) in
                          enumerate(zip(top.indices[j].tolist(), top.values[j].tolist()), 1) if t != token]
            out.append(entry)
        return out

    def logprob(self, token: int, logprob: Optional[float], alts: list[tuple[int, float]],
                as_ids: bool = False) -> TokenLogprob:
        """A logprob entry: the token's text (vLLM's return_tokens_as_token_ids: "token_id:<id>", so
        that tokens whose text is not valid UTF-8 stay apart) and raw bytes, and its alternatives'."""
        text, raw = self._text(token, as_ids)
        top = [(*self._text(t, as_ids), lp) for t, lp in alts]
        return TokenLogprob(text, logprob, raw, [(t, lp, b) for t, b, lp in top])

    def _text(self, token: int, as_ids: bool) -> tuple[str, list[int]]:
        text, raw = self.token_text(token)
        return (f"token_id:{token}", raw) if as_ids else (text, raw)

    # ------------------------------------------------------------------ chunks

    def chunk(self, req: EngineRequest) -> Union[GenerateChunk, Exception]:
        """What `req` streams after this step: its error, or its choices' deltas (usage once done)."""
        if req.error is not None:
            return req.error
        deltas = []
        for s in req.seqs:
            delta = self._delta(req, s)
            if delta is not None:
                deltas.append(delta)
        if req.finished:
            return GenerateChunk(deltas, req.usage())
        return GenerateChunk(deltas, usage_so_far=req.usage() if req.params.continuous_usage else None)

    def _delta(self, req: EngineRequest, s: Sequence) -> Optional[ChoiceDelta]:
        text = s.stop.take_ready(final=s.finished)
        logprobs, s.pending_logprobs = s.pending_logprobs, []
        if s.params.echo and s.choice_index not in req.echo_sent and s.status is not Status.WAITING:
            req.echo_sent.add(s.choice_index)
            text = self.tokenizer.decode(s.prompt_ids, skip_special_tokens=s.params.skip_special_tokens) + text
            logprobs = (s.echo_logprobs or []) + logprobs
        ids = _new_token_ids(s)
        if not text and not logprobs and not ids and (not s.finished or s.finish_reported):
            return None   # a finished choice reports its finish once, not at every step of its siblings
        s.finish_reported = s.finished
        reason = s.finish_reason if s.finished and s.finish_reason != "abort" else None
        delta = ChoiceDelta(s.choice_index, text, logprobs if s.params.logprobs is not None else None, reason)
        delta.prompt_logprobs, s.prompt_logprobs = s.prompt_logprobs, None   # once, on the first delta
        if s.params.return_token_ids:
            delta.token_ids = ids
            delta.prompt_token_ids = None if s.prompt_ids_sent else list(s.prompt_ids)
            s.prompt_ids_sent = True
        return delta


def _new_token_ids(s: Sequence) -> list[int]:
    """return_token_ids: the output tokens not yet sent (stop tokens included, text held back or not)."""
    if not s.params.return_token_ids:
        return []
    ids, s.ids_sent = s.output_ids[s.ids_sent:], len(s.output_ids)
    return ids


def no_token_left(seq: Sequence) -> InvalidRequestError:
    """The 400 for a sequence whose own constraints exclude every token it could generate next."""
    spec = getattr(seq.owner, "grammar_spec", None)
    if spec is not None:
        param = constraint_param(spec)
        what = f"every token the '{param}' constraint allows"
    elif seq.params.allowed_token_ids:
        param, what = "allowed_token_ids", "every token 'allowed_token_ids' lists"
    else:
        param, what = "logit_bias", "every token"
    return InvalidRequestError(f"No token can be generated next: {what} is excluded by this request's 'logit_bias' "
                               "bans or 'bad_words'.", param=param, code="invalid_parameter_combination")


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
