"""Startup a person can follow: what a model replica is loading (from where, how many weight files
and bytes), how long it took and where the time went (`phase`), and, when it fails, one line naming
the model and the cause before the traceback. Download progress of Hugging Face Hub sources is
huggingface_hub's own progress bar. Must not import torch.
"""
from __future__ import annotations

import contextvars
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from deployments.sources import SourceError, resolve_source

# Under "ray.serve": in a replica only that logger's records reach the replica log and the console of
# `serve run` (Serve sets it up; other loggers stay at Python's WARNING default).
logger = logging.getLogger("ray.serve.modelhub.models")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelLoadError(RuntimeError):
    """A model replica could not load its model; the message is one line naming the model and cause."""


class LoadClock:
    """Where one model load's time went: each `lap(name)` books the time since the previous lap (or
    the start) to phase `name`; a phase named twice adds up."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        """'loaded in 4.2 s (imports 1.31 s, weights 1.02 s, other 0.05 s)'; without laps just the total."""
        total = time.monotonic() - self.started
        if not self.phases:
            return f"loaded in {total:.1f} s"
        rest = total - sum(self.phases.values())
        parts = [*self.phases.items(), *([("other", rest)] if rest >= 0.005 else [])]
        return f"loaded in {total:.1f} s ({', '.join(f'{name} {s:.2f} s' for name, s in parts)})"


# The clock of the load running in this context. Model threads run the load's steps in a copy of the
# caller's context (threads.py), so `phase` reaches the clock from there too.
_clock: contextvars.ContextVar[Optional[LoadClock]] = contextvars.ContextVar("modelhub_load_clock", default=None)


def phase(name: str) -> None:
    """Ends phase `name` of the model load under way (imports, weights, ...); outside one, nothing."""
    clock = _clock.get()
    if clock is not None:
        clock.lap(name)


@contextmanager
def loading(cfg: Any) -> Iterator[None]:
    """Wraps a replica's model load: logs the start and the time taken (split by the phases the load
    reports), and turns any failure into a ModelLoadError whose one-line message comes first in
    the log and in Serve's error."""
    logger.info("model %s (%s): loading from %s [%s]", cfg.id, cfg.kind, cfg.source, describe_weights(cfg.source))
    clock = LoadClock()
    token = _clock.set(clock)
    try:
        yield
    except Exception as exc:
        summary = f"model {cfg.id!r} ({cfg.kind}) failed to load from {cfg.source!r}: {type(exc).__name__}: {exc}"
        summary = " ".join(summary.split())   # one line, whatever the cause's message holds
        logger.error("%s", summary, exc_info=exc)
        raise ModelLoadError(summary) from None
    finally:
        _clock.reset(token)
    logger.info("model %s (%s): %s", cfg.id, cfg.kind, clock.summary())


def describe_weights(source: str) -> str:
    """'3 weight files, 540.2 MB' for a local source; what happens for the others."""
    try:
        resolved = resolve_source(source)
    except SourceError as exc:
        return f"not found: {exc}"
    if resolved.kind == "builtin":
        return "built in code, random weights"
    if resolved.kind == "hub":
        return "from the Hugging Face Hub or its local cache; download progress follows"
    if resolved.kind == "gguf":
        return f"1 GGUF file, {_mb(os.path.getsize(os.path.join(resolved.path, resolved.gguf_file)))}"
    files = [os.path.join(root, f) for root, _, names in os.walk(resolved.path) for f in names
             if f.endswith(WEIGHT_SUFFIXES)]
    return f"{len(files)} weight file{'s' if len(files) != 1 else ''}, {_mb(sum(map(os.path.getsize, files)))}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
