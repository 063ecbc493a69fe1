"""ImageServer on the real tiny random pipeline, without Ray: sizes and n, seeds alone vs batched,
which concurrent requests share a pipeline call, and cancellation stopping the denoising loop.
"""
import asyncio
import io
import time
import types

import numpy as np
import pytest
from PIL import Image

from deployments.config import ImageEngineConfig, ImageModelConfig
from deployments.images.server import ImageServer
from deployments.types import ImageRequest

SIZES = ["64x64", "32x32"]


@pytest.fixture(scope="module")
def tiny():
    from deployments.images.pipeline import ImagePipeline
    return ImagePipeline.load("builtin:tiny-random-sd", ImageEngineConfig(sizes=SIZES))


class Spy:
    """Stands in for the diffusers pipeline: records each call's prompts and counts denoising steps
    (UNet forwards), then delegates to the real pipeline."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.steps = pipe, [], 0
        self.hook = pipe.unet.register_forward_hook(self._count_step)

    def _count_step(self, *args):
        self.steps += 1

    def __call__(self, **kwargs):
        self.calls.append(list(kwargs["prompt"]))
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.fixture
def spy(tiny, monkeypatch):
    from ray import serve
    # serve.batch asks the replica context for max_ongoing_requests; outside Serve there is none.
    replica = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    spy = Spy(tiny.pipe)
    tiny.pipe = spy
    yield spy
    tiny.pipe = spy.pipe
    spy.hook.remove()


def server(tiny, **engine) -> ImageServer:
    engine = {"sizes": SIZES, "default_steps": 2, **engine}
    cfg = ImageModelConfig(id="tiny", kind="image", source="builtin:tiny-random-sd", engine=engine)
    return ImageServer(cfg, pipeline_factory=lambda source, e: tiny)


def req(prompt="a red fox", n=1, size=64, **kw) -> ImageRequest:
    return ImageRequest(prompt, n, size, size, **kw)


def pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return np.asarray(img).astype(int)


async def together(srv: ImageServer, *requests: ImageRequest) -> list[list[bytes]]:
    """Sends the requests concurrently; each result's PNGs. A server's batch queue belongs to the
    event loop that first used it, so one test runs all its calls in one asyncio.run."""
    return [result.pngs for result in await asyncio.gather(*(srv.generate(r) for r in requests))]


async def wait_until(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.005)


def test_pngs_of_requested_size_and_n(tiny, spy):
    big, small = asyncio.run(together(server(tiny), req(n=3, size=64, seed=1), req(n=1, size=32)))
    assert [pixels(p).shape for p in big] == [(64, 64, 3)] * 3
    assert [pixels(p).shape for p in small] == [(32, 32, 3)]
    assert np.abs(pixels(big[0]) - pixels(big[1])).mean() > 10, "each of n images gets its own noise"


def test_seeded_request_is_the_same_alone_or_batched(tiny, spy):
    async def go():
        srv = server(tiny)
        alone = (await together(srv, req("a red fox", n=2, seed=7)))[0]
        return alone, await together(srv, req("a red fox", n=2, seed=7), req("a cat", seed=8), req("x"))

    alone, (batched, other, _) = asyncio.run(go())
    assert spy.calls[-1] == ["a red fox", "a red fox", "a cat", "x"], "the three requests shared one call"
    for a, b in zip(alone, batched):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1   # batched float math may round one level apart
    assert np.abs(pixels(alone[0]) - pixels(other[0])).mean() > 10


def test_negative_prompt_and_guidance_take_effect_alone_or_batched(tiny, spy):
    async def go():
        srv = server(tiny)
        plain, = await together(srv, req(seed=3))
        negative, = await together(srv, req(seed=3, negative_prompt="blurry"))
        low_guidance, = await together(srv, req(seed=3, guidance_scale=1.0))
        batched, _ = await together(srv, req(seed=3, negative_prompt="blurry"), req(seed=4, negative_prompt="dark"))
        return [pixels(pngs[0]) for pngs in (plain, negative, low_guidance, batched)]

    plain, negative, low_guidance, batched = asyncio.run(go())
    assert np.abs(plain - negative).mean() > 1
    assert np.abs(plain - low_guidance).mean() > 1
    assert np.abs(negative - batched).max() <= 1
    assert len(spy.calls[-1]) == 2


def test_concurrent_same_shape_requests_share_one_pipeline_call(tiny, spy):
    results = asyncio.run(together(server(tiny), req("a", n=2), req("b"), req("c"), req("d", n=3)))
    assert spy.calls == [["a", "a", "b", "c", "d", "d", "d"]]
    assert [len(r) for r in results] == [2, 1, 1, 3]
    assert spy.steps == 2


def test_max_batch_size_one_turns_batching_off(tiny, spy):
    asyncio.run(together(server(tiny, max_batch_size=1), req("a"), req("b"), req("c")))
    assert sorted(spy.calls) == [["a"], ["b"], ["c"]]


def test_requests_of_different_shapes_are_not_combined(tiny, spy):
    asyncio.run(together(server(tiny, max_batch_size=8),
                         req("a"), req("a2"), req("b", size=32), req("c", num_inference_steps=3),
                         req("d", guidance_scale=1.0), req("e", negative_prompt="blurry")))
    assert sorted(spy.calls) == [["a", "a2"], ["b"], ["c"], ["d"], ["e"]]


def test_cancelling_the_caller_stops_denoising(tiny, spy):
    srv = server(tiny, max_steps=500)

    async def main():
        task = asyncio.create_task(srv.generate(req(num_inference_steps=500)))
        await wait_until(lambda: spy.steps >= 3)
        task.cancel()
        await asyncio.to_thread(_wait_idle, tiny)
        return task

    task = asyncio.run(main())
    assert task.cancelled()
    assert spy.steps < 20, f"{spy.steps} of 500 steps ran after the caller went away"


def test_combined_call_stops_only_when_every_caller_is_gone(tiny, spy):
    srv = server(tiny, max_steps=500)

    async def main():
        first = asyncio.create_task(srv.generate(req("a", num_inference_steps=30)))
        second = asyncio.create_task(srv.generate(req("b", num_inference_steps=30)))
        await wait_until(lambda: spy.steps >= 3)
        first.cancel()
        kept = await second                        # still runs to the end, with every step
        steps_after_one_cancel = spy.steps
        both = [asyncio.create_task(srv.generate(req(p, num_inference_steps=500))) for p in "cd"]
        await wait_until(lambda: spy.steps >= steps_after_one_cancel + 3)
        for task in both:
            task.cancel()
        await asyncio.to_thread(_wait_idle, tiny)
        return kept, steps_after_one_cancel

    kept, steps_after_one_cancel = asyncio.run(main())
    assert spy.calls[:2] == [["a", "b"], ["c", "d"]]
    assert steps_after_one_cancel == 30 and pixels(kept.pngs[0]).shape == (64, 64, 3)
    assert spy.steps - steps_after_one_cancel < 20


def _wait_idle(tiny) -> None:
    """Returns once no pipeline call holds the pipeline."""
    with tiny._lock:
        pass
