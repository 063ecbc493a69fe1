"""Text-to-image pipelines: any diffusers checkpoint through AutoPipelineForText2Image, or
`builtin:tiny-random-sd`, a tiny random-weight Stable Diffusion built in code (its pictures are noise
by design). One call serves several same-shape requests, each with its own prompts, n and seed, and
stops between steps once all of them are cancelled. Imported only in replicas (torch, diffusers).
"""
from __future__ import annotations

import io
import threading
from typing import Any, Optional

import torch

from deployments.config import ImageEngineConfig
from deployments.images.jobs import Cancelled, ImageJob
from deployments.sources import resolve_source
from deployments.torch_utils import pick_device, pick_dtype


class ImagePipeline:
    def __init__(self, pipe: Any, cfg: ImageEngineConfig, device: torch.device):
        self.pipe = pipe
        self.cfg = cfg
        self.device = device
        self._lock = threading.Lock()   # a diffusers pipeline object is not safe to call concurrently

    @classmethod
    def load(cls, source: str, cfg: ImageEngineConfig) -> "ImagePipeline":
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device, gpu_default=torch.float16)
        resolved = resolve_source(source)
        if resolved.kind == "builtin":
            if resolved.path != "tiny-random-sd":
                raise ValueError(f"no builtin image model named {resolved.path!r}")
            pipe = tiny_random_sd()
        else:
            from diffusers import AutoPipelineForText2Image
            pipe = AutoPipelineForText2Image.from_pretrained(resolved.path, torch_dtype=dtype)
        if resolved.kind == "builtin" and dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, cfg, device)

    def generate(self, jobs: list[ImageJob]) -> list[list[bytes]]:
        """PNG bytes of each job's images, from one pipeline call. The jobs must share a batch_key.
        Raises Cancelled, between denoising steps, once every job is cancelled."""
        if len({job.batch_key() for job in jobs}) != 1:
            raise ValueError("jobs of one pipeline call must share a batch_key")

        def on_step_end(pipe, step, timestep, kwargs):
            _raise_if_all_cancelled(jobs)
            return kwargs

        first = jobs[0]
        with self._lock, torch.inference_mode():
            _raise_if_all_cancelled(jobs)
            result = self.pipe(prompt=_per_image(jobs, "prompt"), negative_prompt=_negative_prompts(jobs),
                               num_images_per_prompt=1, generator=_generators(jobs),
                               width=first.width, height=first.height, num_inference_steps=first.steps,
                               guidance_scale=first.guidance, callback_on_step_end=on_step_end)
        pngs = [_png(img) for img in result.images]
        return _split(pngs, [job.n for job in jobs])


def _raise_if_all_cancelled(jobs: list[ImageJob]) -> None:
    if all(job.cancel.is_set() for job in jobs):
        raise Cancelled()


def _per_image(jobs: list[ImageJob], attr: str) -> list:
    """One entry per image: each job's value repeated n times (so each request keeps its own n)."""
    return [getattr(job, attr) for job in jobs for _ in range(job.n)]


def _negative_prompts(jobs: list[ImageJob]) -> Optional[list[str]]:
    return None if jobs[0].negative_prompt is None else _per_image(jobs, "negative_prompt")


def _generators(jobs: list[ImageJob]) -> list[torch.Generator]:
    """One generator per image. A job's images share its own generator, drawn in order, so a seeded
    request gets the same noise alone or next to other requests."""
    out = []
    for job in jobs:
        gen = torch.Generator(device="cpu")
        if job.seed is None:
            gen.seed()
        else:
            gen.manual_seed(job.seed)
        out += [gen] * job.n
    return out


def _split(items: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(items[start:start + size])
        start += size
    return out


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tiny_random_sd():
    """A ~2M-parameter Stable Diffusion pipeline with seeded random weights (CPU, ~0.2 s for 64x64)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32)
    tokenizer = _byte_level_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _byte_level_clip_tokenizer():
    """A CLIP tokenizer over single bytes (no merges): enough to condition a random model."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
