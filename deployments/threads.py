"""Which thread a replica runs its model on: one, for loading and every call. No torch here, so the
Serve deployment modules that use it stay light to import.

Why one: libgomp (torch's OpenMP on Linux) keeps a pool of worker threads for each thread that ever
ran a parallel region. Once the pools hold more threads than there are CPUs, every worker sleeps
between regions instead of spinning (GOMP's "throttled" spin count), and each of a forward's
hundreds of parallel regions pays a futex wake-up. Measured on the dev box, the LLM engine at one
stream: 21 tok/s after loading on a thread that stays, 26-30 after loading on one that ends.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from typing import Any, Callable


def on_passing_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a new thread that ends when fn returns (freeing its OpenMP pool), in a copy of this
    thread's context (the load's clock: loading.py); its result or exception comes back here. For a
    model whose calls then run on a thread of their own."""
    box: dict[str, Any] = {}
    context = contextvars.copy_context()

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=context.run, args=(run,), name="model-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class ModelThread:
    """One worker thread that loads a model and runs every call on it."""

    def __init__(self, name: str = "model"):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the model thread, in a copy of this thread's context (the load's clock:
        loading.py), waiting for it (for loading, in a replica's __init__)."""
        return self._pool.submit(contextvars.copy_context().run, fn, *args).result()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the model thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
