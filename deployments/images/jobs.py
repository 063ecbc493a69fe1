"""What one image request asks of a pipeline call (ImageJob), and how concurrent jobs are grouped
into calls. Shared by the deployment shim and the pipeline, so it must not import torch or diffusers.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional


class Cancelled(Exception):
    """Every job of a pipeline call was cancelled; the call stopped between denoising steps."""


@dataclass
class ImageJob:
    """One request's share of a pipeline call. `cancel` is set (from any thread) when its caller goes away."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: Optional[int] = None            # None: a random seed
    negative_prompt: Optional[str] = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call. Whether a negative prompt is given is part
        of the key: some pipelines (SDXL) treat no negative prompt differently from an empty one."""
        return self.width, self.height, self.steps, self.guidance, self.negative_prompt is not None


def group_by_key(jobs: list[ImageJob]) -> list[list[ImageJob]]:
    """Jobs grouped by batch_key; groups, and jobs within a group, in arrival order."""
    groups: dict[tuple, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key(), []).append(job)
    return list(groups.values())
