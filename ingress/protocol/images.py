"""POST /v1/images/generations: request model (OpenAI fields plus the usual diffusion extensions)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from deployments.config import RequestLimits, parse_size
from deployments.errors import InvalidRequestError
from deployments.types import ImageRequest
from ingress.protocol.common import WireModel, over_limit


class ImageGenerationRequest(WireModel):
    prompt: str = Field(min_length=1, max_length=32000)
    model: Optional[str] = None
    n: Optional[int] = Field(1, ge=1, le=10)
    size: Optional[str] = None
    response_format: Optional[Literal["url", "b64_json"]] = "url"
    user: Optional[str] = None
    # Extensions most diffusion servers accept:
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: Optional[str] = None
    num_inference_steps: Optional[int] = Field(None, ge=1)
    guidance_scale: Optional[float] = Field(None, ge=0, le=100)

    def check_limits(self, limits: RequestLimits) -> None:
        if len(self.negative_prompt or "") > limits.max_prompt_chars:
            raise over_limit("negative_prompt", "its length in characters", limits.max_prompt_chars,
                             "max_prompt_chars")

    def to_image_request(self, default_size: str, allowed: list[str]) -> ImageRequest:
        size = self.size if self.size not in (None, "auto") else default_size
        parsed = parse_size(size)
        if parsed is None:
            raise InvalidRequestError(f"Invalid size '{size}'. Allowed sizes: {', '.join(allowed)} "
                                      "(written WxH or W*H).", param="size", code="invalid_value")
        return ImageRequest(self.prompt, self.n or 1, parsed[0], parsed[1], self.seed, self.negative_prompt,
                            self.num_inference_steps, self.guidance_scale)
