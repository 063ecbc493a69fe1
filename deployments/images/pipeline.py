"""Text-to-image pipelines: any diffusers checkpoint through AutoPipelineForText2Image, or
`builtin:tiny-random-sd`, a tiny Stable Diffusion with random weights built in code (fixed seed)
for machines without real weights. Its pictures are noise by design. Imported only in replicas.
"""
from __future__ import annotations

import io
import threading
from typing import Any, Optional

import torch

from deployments.config import ImageEngineConfig
from deployments.sources import resolve_source
from deployments.torch_utils import pick_device, pick_dtype


class Cancelled(Exception):
    pass


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

    def generate(self, prompt: str, *, n: int, width: int, height: int, steps: int, guidance: float,
                 seed: Optional[int], negative_prompt: Optional[str], cancel: threading.Event) -> list[bytes]:
        """PNG bytes of n images; raises Cancelled if `cancel` is set between denoising steps."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)

        def on_step_end(pipe, step, timestep, kwargs):
            if cancel.is_set():
                pipe._interrupt = True
            return kwargs

        with self._lock, torch.inference_mode():
            result = self.pipe(prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=n,
                               width=width, height=height, num_inference_steps=steps,
                               guidance_scale=guidance, generator=generator,
                               callback_on_step_end=on_step_end)
        if cancel.is_set():
            raise Cancelled()
        return [_png(img) for img in result.images]


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
