"""The images Serve deployment: checks a request against the model's limits and runs the pipeline
on a worker thread. A caller that goes away (cancelled handle call) stops denoising at the next
step. No FastAPI here; torch and diffusers load inside __init__ only.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Optional

from deployments.config import ImageModelConfig
from deployments.errors import InvalidRequestError
from deployments.types import ImageRequest, ImageResult, ModelCard


class ImageServer:
    def __init__(self, model_cfg: ImageModelConfig, *, pipeline_factory: Optional[Callable] = None):
        from deployments.images.pipeline import ImagePipeline
        self.cfg = model_cfg
        self.pipeline = (pipeline_factory or ImagePipeline.load)(model_cfg.source, model_cfg.engine)
        self.created = int(time.time())

    @staticmethod
    def default_options(cfg: ImageModelConfig) -> dict[str, Any]:
        return {"max_ongoing_requests": 16, "max_queued_requests": 256, "num_replicas": 1,
                "ray_actor_options": {"num_cpus": 0.25}, "health_check_period_s": 10}

    def card(self) -> ModelCard:
        return ModelCard(id=self.cfg.id, kind="image", created=self.created, owned_by=self.cfg.owned_by,
                         capabilities=["images.generations"],
                         image_sizes=list(self.cfg.engine.sizes), max_images=self.cfg.engine.max_n)

    async def generate(self, req: ImageRequest) -> ImageResult:
        e = self.cfg.engine
        check_image_request(req, self.cfg)
        cancel = threading.Event()
        work = asyncio.to_thread(
            self.pipeline.generate, req.prompt, n=req.n, width=req.width, height=req.height,
            steps=req.num_inference_steps or e.default_steps,
            guidance=e.guidance_scale if req.guidance_scale is None else req.guidance_scale,
            seed=e.seed if req.seed is None else req.seed, negative_prompt=req.negative_prompt, cancel=cancel)
        try:
            return ImageResult(await work)
        except asyncio.CancelledError:
            cancel.set()
            raise


def check_image_request(req: ImageRequest, cfg: ImageModelConfig) -> None:
    """Raises a 400 naming what is allowed. Shared by the ingress (early) and the replica."""
    e = cfg.engine
    if f"{req.width}x{req.height}" not in {s.replace("*", "x") for s in e.sizes}:
        raise InvalidRequestError(f"Invalid size '{req.width}x{req.height}' for model '{cfg.id}'. "
                                  f"Allowed sizes: {', '.join(e.sizes)}.", param="size", code="invalid_value")
    if not 1 <= req.n <= e.max_n:
        raise InvalidRequestError(f"Invalid n={req.n} for model '{cfg.id}': it must be between 1 and {e.max_n}.",
                                  param="n", code="invalid_value")
    if req.num_inference_steps is not None and not 1 <= req.num_inference_steps <= e.max_steps:
        raise InvalidRequestError(f"num_inference_steps must be between 1 and {e.max_steps}.",
                                  param="num_inference_steps", code="invalid_value")
