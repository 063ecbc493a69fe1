"""The images Serve deployment: checks a request against the model's limits, then @serve.batch
gathers concurrent requests and runs one pipeline call per group of the same shape, on the model's
thread. A caller that goes away marks its job cancelled; a call stops once all its jobs are.
No FastAPI here; torch and diffusers load inside __init__ only.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional

from ray import serve

from deployments.config import ImageModelConfig, format_size
from deployments.errors import InvalidRequestError
from deployments.images.jobs import Cancelled, ImageJob, group_by_key
from deployments.loading import loading
from deployments.threads import ModelThread
from deployments.types import ImageRequest, ImageResult, ModelCard


class ImageServer:
    def __init__(self, model_cfg: ImageModelConfig, *, pipeline_factory: Optional[Callable] = None):
        from deployments.images.pipeline import ImagePipeline
        e = model_cfg.engine
        self.cfg = model_cfg
        self._model_thread = ModelThread("pipeline")   # loads and generates: one OpenMP pool (threads.py)
        with loading(model_cfg):
            self.pipeline = self._model_thread.run(pipeline_factory or ImagePipeline.load, model_cfg.source, e)
        # Batched per instance, not by decorating the method: a decorated method shares one queue
        # among all instances, bound to the event loop that first used it.
        self._generate_batch = serve.batch(max_batch_size=e.max_batch_size,
                                           batch_wait_timeout_s=e.batch_wait_timeout_s)(self._run_batch)
        self.created = int(time.time())

    @staticmethod
    def default_options(cfg: ImageModelConfig) -> dict[str, Any]:
        # room for a full batch to gather while the previous one runs
        return {"max_ongoing_requests": max(16, 2 * cfg.engine.max_batch_size), "max_queued_requests": 256,
                "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}, "health_check_period_s": 10}

    def card(self) -> ModelCard:
        return self.cfg.card(self.created)

    async def generate(self, req: ImageRequest) -> ImageResult:
        check_image_request(req, self.cfg)
        job = self._job(req)
        try:
            return ImageResult(await self._generate_batch(job))
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    def _job(self, req: ImageRequest) -> ImageJob:
        e = self.cfg.engine
        return ImageJob(req.prompt, req.n, req.width, req.height, steps=req.num_inference_steps or e.default_steps,
                        guidance=e.guidance_scale if req.guidance_scale is None else req.guidance_scale,
                        seed=e.seed if req.seed is None else req.seed, negative_prompt=req.negative_prompt)

    async def _run_batch(self, jobs: list[ImageJob]) -> list[Optional[list[bytes]]]:
        """One pipeline call per group of same-shape jobs, in turn. A group whose callers all went
        away yields None for them (nobody reads it)."""
        results: dict[int, Optional[list[bytes]]] = {}
        for group in group_by_key(jobs):
            try:
                pngs = await self._model_thread.call(self.pipeline.generate, group)
            except Cancelled:
                pngs = [None] * len(group)
            results.update(zip(map(id, group), pngs))
        return [results[id(job)] for job in jobs]


def check_image_request(req: ImageRequest, cfg: ImageModelConfig) -> None:
    """Raises a 400 naming what is allowed. Shared by the ingress (early) and the replica."""
    e = cfg.engine
    size = format_size(req.width, req.height)
    if size not in e.sizes:
        raise InvalidRequestError(f"Invalid size '{size}' for model '{cfg.id}'. "
                                  f"Allowed sizes: {', '.join(e.sizes)}.", param="size", code="invalid_value")
    if not 1 <= req.n <= e.max_n:
        raise InvalidRequestError(f"Invalid n={req.n} for model '{cfg.id}': it must be between 1 and {e.max_n}.",
                                  param="n", code="invalid_value")
    if req.num_inference_steps is not None and not 1 <= req.num_inference_steps <= e.max_steps:
        raise InvalidRequestError(f"num_inference_steps must be between 1 and {e.max_steps}.",
                                  param="num_inference_steps", code="invalid_value")
