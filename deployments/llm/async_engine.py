"""Runs an LLMEngine on its own thread and streams each request's chunks to asyncio.

The replica's event loop never runs the model: requests and aborts go into an inbox the engine
thread drains between steps, and each step's outputs come back with one call_soon_threadsafe.
A consumer that falls behind gets the queued chunks merged into one (fewer Ray messages per token),
and under load each stream waits a little to gather more tokens per chunk (max_chunks_per_s): each
chunk costs the replica CPU that the engine step then lacks (bench/README.md, "Engine").
A stream that is closed early (client gone) aborts its sequences at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Optional

import torch

from deployments.errors import EngineUnavailableError, InvalidRequestError, OverloadedError
from deployments.llm.built_engine import EngineLoad
from deployments.llm.engine import LLMEngine
from deployments.llm.request import EngineRequest
from deployments.types import ChoiceDelta, GenerateChunk

logger = logging.getLogger(__name__)


def _engine_stopped() -> EngineUnavailableError:
    """For requests to an engine whose thread stopped (under TP, after a failed step): Serve is
    replacing the replica."""
    return EngineUnavailableError("This model's engine stopped; its replica is being replaced. Retry shortly.",
                                  retry_after_s=10)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, max_in_flight_seqs: int, stream_interval_s: float = 0.0,
                 max_chunks_per_s: float = 0.0, metrics: Optional[Any] = None, ranks: Optional[Any] = None,
                 late_admission: bool = True, step_timeout_s: float = 300.0):
        self.engine = engine
        if late_admission and ranks is None:   # under TP every rank must see the same adds at step start
            engine.arrivals = self._arrivals
        self.ranks = ranks                # tp.RankGroup: the other ranks of a tensor-parallel replica
        self.metrics = metrics            # metrics.EngineMetrics, recorded after each step
        self.max_in_flight_seqs = max_in_flight_seqs
        self.stream_interval_s = stream_interval_s
        self.max_chunks_per_s = max_chunks_per_s
        self.step_timeout_s = step_timeout_s
        self._step_started: Optional[float] = None   # monotonic start of the step running now
        self._in_flight_seqs = 0
        self._stopped = False   # set by the engine thread as it ends, before it fails every request
        self._load = EngineLoad()   # replaced whole by the engine thread, read by any
        self._keys = itertools.count()
        self._inbox: deque = deque()
        self._wakeup = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    @property
    def num_in_flight_seqs(self) -> int:
        return self._in_flight_seqs

    def load(self) -> EngineLoad:
        """The engine's load as of its last step or inbox drain (published by the engine thread, so
        reading it never races the scheduler; requests posted during a step show up after it)."""
        return self._load

    def stats(self) -> dict[str, int]:
        """Occupancy: sequences running and waiting in the engine, and in flight here."""
        load = self._load
        return {"running": load.running_seqs, "waiting": load.waiting_seqs, "in_flight_seqs": self._in_flight_seqs}

    def grammars(self) -> Any:
        """A structured.Grammars over the engine's tokenizer, vocabulary and stop tokens."""
        from deployments.llm.structured import Grammars
        return Grammars.for_engine(self.engine)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def check_health(self) -> None:
        """Raises (failing the replica's health check, so Serve replaces it) when the engine thread
        died or one step has run past step_timeout_s (a wedged loop)."""
        if not self.is_alive():
            raise RuntimeError("LLM engine thread died")
        started = self._step_started
        if started is not None and time.monotonic() - started > self.step_timeout_s:
            raise RuntimeError(f"LLM engine step running for over {self.step_timeout_s:g} s")
        if self.ranks is not None:
            self.ranks.check()

    async def generate(self, req: EngineRequest) -> AsyncIterator[GenerateChunk]:
        nseqs = len(req.prompts) * req.params.n
        if nseqs > self.max_in_flight_seqs:   # could never be admitted: retrying would loop forever
            raise InvalidRequestError(
                f"This request asks for {nseqs} sequences (prompts x n), more than this model ever holds at once "
                f"({self.max_in_flight_seqs}: engine.max_num_seqs + engine.max_waiting).",
                param="n" if req.params.n > 1 else "prompt", code="limit_exceeded")
        if self._in_flight_seqs + nseqs > self.max_in_flight_seqs:
            raise OverloadedError("Too many requests are queued for this model; retry shortly.")
        # The engine's own key for this request: ids that callers send (an x-request-id a client
        # chose) may repeat across concurrent requests, and two requests must never share state.
        req.request_id = f"e{next(self._keys)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[req.request_id] = (asyncio.get_running_loop(), queue)
        if not self.is_alive():   # after registering: a thread that stops from here on fails this queue too
            self._queues.pop(req.request_id, None)
            raise _engine_stopped()
        self._in_flight_seqs += nseqs
        self._post(("add", req))
        done, first = False, True
        try:
            while not done:
                chunk = await self._next(queue, wait=not first)
                first = False
                done = chunk.usage is not None
                yield chunk
        finally:
            self._in_flight_seqs -= nseqs
            self._queues.pop(req.request_id, None)
            if not done:
                self._post(("abort", req.request_id))

    def stream_interval(self) -> float:
        """Seconds a stream waits after a token to gather more into its chunk."""
        load = len(self._queues) / self.max_chunks_per_s if self.max_chunks_per_s else 0.0
        return max(self.stream_interval_s, load)

    async def _next(self, queue: asyncio.Queue, wait: bool) -> GenerateChunk:
        """The next chunk: everything queued, merged. After the first chunk (which goes at once: time
        to first token is never traded away) it may wait stream_interval() to gather more."""
        items = [await queue.get()]
        interval = self.stream_interval() if wait else 0.0
        if interval > 0 and not _is_last(items[-1]):
            deadline = asyncio.get_running_loop().time() + interval
            while not _is_last(items[-1]):   # the last chunk ends the wait: a finished stream never lingers
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        while not queue.empty() and not _is_last(items[-1]):
            items.append(queue.get_nowait())
        for item in items:
            if isinstance(item, BaseException):
                raise item
        return merge_chunks(items)

    def _post(self, msg) -> None:
        self._inbox.append(msg)
        self._wakeup.set()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        """The engine thread. A failed step fails its requests and the loop goes on. Anything else that
        ends the loop (a bug in the bookkeeping between steps, or a lost tensor-parallel rank) stops
        the engine: every request waiting on it gets a 503 at once, and the health check then fails
        so Serve replaces the replica. No request waits on a thread that is gone."""
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException:
            logger.exception("the engine thread stopped on an unexpected error; failing every request in flight")
        finally:
            self._stopped = True
            self._deliver([(rid, _engine_stopped()) for rid in list(self._queues)])

    def _loop(self) -> None:
        # torch applies its thread count to a new thread at the thread's first ATen parallel op, but
        # oneDNN (the linear layers) reads OpenMP's own, which Ray sets to the replica's num_cpus
        torch.set_num_threads(torch.get_num_threads())
        while True:
            self._drain_inbox()
            self._load = self.engine.load()   # after each step, add and abort
            if not self.engine.has_work():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            started = self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or device failure: fail the requests, keep serving
                logger.exception("engine step failed; failing the requests in flight")
                if self.ranks is not None:
                    # the ranks may be out of step now (most likely one was lost): stop, so the health
                    # check fails and Serve replaces the replica; the requests in flight get the 503 that
                    # later ones get, since retrying is what works
                    self._fail_all(_engine_stopped())
                    return
                self._fail_all(exc)
                continue
            finally:
                self._step_started = None
            if self.metrics is not None:   # before delivery: a finished request is already counted
                self.metrics.record_step(self.engine, outputs, started, time.monotonic())
            self._deliver([(req.request_id, chunk) for req, chunk in outputs])

    def _arrivals(self) -> None:
        """Called by the engine thread while a step's forward runs (late admission): moves the
        requests posted since the step began into the engine. Stops at an abort, which must wait for
        the step to end."""
        while self._inbox and self._inbox[0][0] == "add":
            self._add(self._inbox.popleft()[1])

    def _drain_inbox(self) -> None:
        while self._inbox:
            op, arg = self._inbox.popleft()
            if op == "add":
                self._add(arg)
            else:
                self.engine.abort(arg)

    def _add(self, req: EngineRequest) -> None:
        """A request that fails to enter the engine fails alone; the engine thread goes on."""
        try:
            self.engine.add(req)
        except Exception as exc:
            logger.exception("adding a request to the engine failed; failing that request only")
            self.engine.abort(req.request_id)
            self._deliver([(req.request_id, exc)])

    def _deliver(self, items) -> None:
        by_loop: dict = {}
        for rid, chunk in items:
            target = self._queues.get(rid)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], chunk))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, exc: Exception) -> None:
        rids = self.engine.request_ids()
        for rid in rids:
            self.engine.abort(rid)
        self._deliver([(rid, exc) for rid in rids])


def _put_all(batch) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _is_last(item) -> bool:
    return isinstance(item, BaseException) or item.usage is not None


def merge_chunks(chunks: list[GenerateChunk]) -> GenerateChunk:
    """Joins consecutive chunks of one request: per choice, texts concatenate and logprobs and token ids extend."""
    if len(chunks) == 1:
        return chunks[0]
    merged: dict[int, ChoiceDelta] = {}
    for chunk in chunks:
        for d in chunk.choices:
            merged.setdefault(d.index, ChoiceDelta(d.index)).extend(d)
    return GenerateChunk(sorted(merged.values(), key=lambda d: d.index), chunks[-1].usage, chunks[-1].usage_so_far)
