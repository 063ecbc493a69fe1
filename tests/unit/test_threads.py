"""A replica's model thread: loading on a passing thread, and one thread for loading and calls."""
from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.threads import ModelThread, on_passing_thread


def test_a_model_loads_on_a_thread_that_is_gone_afterwards():
    seen = {}

    def load():
        seen["thread"] = threading.current_thread()
        return "model"

    assert on_passing_thread(load) == "model"
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()

    def broken():
        raise FileNotFoundError("no weights")
    with pytest.raises(FileNotFoundError, match="no weights"):
        on_passing_thread(broken)


def test_a_model_thread_loads_and_serves_every_call_on_one_thread():
    worker = ModelThread()
    where = [worker.run(threading.get_ident)]

    async def calls():
        return await asyncio.gather(*(worker.call(threading.get_ident) for _ in range(8)))
    where += asyncio.run(calls())
    assert len(set(where)) == 1 and where[0] != threading.get_ident()


def test_the_embedding_and_image_servers_load_and_run_on_their_model_thread():
    from deployments.config import EmbeddingModelConfig, ImageModelConfig
    from deployments.embeddings.server import EmbeddingServer
    from deployments.images.server import ImageServer
    seen = []

    class Probe:
        def __init__(self, *args):
            seen.append(threading.get_ident())
            self.max_length, self.dim = 8, 2

        def encode(self, token_lists):
            seen.append(threading.get_ident())
            return [[0.0, 1.0] for _ in token_lists]

        def generate(self, jobs):
            seen.append(threading.get_ident())
            return [[b"png"] for _ in jobs]

    emb = EmbeddingServer(EmbeddingModelConfig(id="e", kind="embedding", source="builtin:none"), encoder_factory=Probe)
    img = ImageServer(ImageModelConfig(id="i", kind="image", source="builtin:none"), pipeline_factory=Probe)
    asyncio.run(emb._encode([[[1, 2]]]))
    asyncio.run(img._run_batch([img._job(_image_request())]))
    assert seen[0] == seen[2] and seen[1] == seen[3] and threading.get_ident() not in seen


def _image_request():
    from deployments.types import ImageRequest
    return ImageRequest(prompt="a cat", n=1, width=64, height=64)


def test_the_llm_engine_thread_runs_openmp_with_torchs_thread_count():
    """oneDNN reads OpenMP's per-thread count, which a new thread takes from OMP_NUM_THREADS (Ray
    sets it to the replica's num_cpus), not from torch.set_num_threads."""
    import ctypes
    import os

    import torch

    from deployments.llm.async_engine import AsyncLLMEngine
    from deployments.llm.engine import LLMEngine
    from deployments.llm.request import EngineRequest
    from deployments.types import SamplingParams
    from tests.unit.fakes import ByteTokenizer, tiny_llama
    try:
        omp = ctypes.CDLL("libgomp.so.1")
    except OSError:
        pytest.skip("torch does not use libgomp here")
    if (os.cpu_count() or 1) < 2 or os.environ.get("OMP_NUM_THREADS") == "1":
        pytest.skip("needs a new thread's OpenMP default to differ from 1")
    engine = LLMEngine(tiny_llama(), ByteTokenizer(), max_model_len=64, max_num_seqs=2, max_num_batched_tokens=512)
    seen, step = [], engine.step

    def recording_step():
        seen.append(omp.omp_get_max_threads())
        return step()
    engine.step = recording_step
    before = torch.get_num_threads()
    torch.set_num_threads(1)                     # what the replica's config asks for
    try:
        async_engine = AsyncLLMEngine(engine, max_in_flight_seqs=4)

        async def one():
            p = SamplingParams(max_tokens=2, temperature=0.0)
            return [c async for c in async_engine.generate(EngineRequest("t", [[1, 2, 3]], p, [2]))]
        asyncio.run(one())
    finally:
        torch.set_num_threads(before)
    assert seen and seen[0] == 1
