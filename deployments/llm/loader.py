"""Load a causal LM and its tokenizer from a resolved source.

GGUF checkpoints are dequantized once by transformers (slow, ~16 s for SmolLM2-135M) and cached
as safetensors (reload < 1 s). The cache is written to a temp folder and renamed into place,
so replicas starting together never read a half-written copy.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from deployments.config import LLMEngineConfig
from deployments.loading import phase
from deployments.sources import ResolvedSource, resolve_source

logger = logging.getLogger(__name__)


def cache_root(cfg_dir: str | None) -> str:
    return cfg_dir or os.environ.get("MODELHUB_CACHE") or os.path.expanduser("~/.cache/modelhub")


def prepared_source(source: str, cfg: LLMEngineConfig) -> str:
    """What from_pretrained loads: the dequantized copy of a GGUF (made on first use), else the
    source's folder or hub id."""
    return _prepared(resolve_source(source), cfg)


def _prepared(resolved: ResolvedSource, cfg: LLMEngineConfig) -> str:
    if resolved.kind == "builtin":
        raise ValueError(f"no builtin chat model named {resolved.path!r}")
    return dequantized_copy(resolved, cache_root(cfg.cache_dir)) if resolved.kind == "gguf" else resolved.path


def load_causal_lm(source: str, cfg: LLMEngineConfig, device: torch.device, dtype: torch.dtype, tp_size: int = 1):
    """Returns (model, tokenizer), the model in eval mode on `device`. With tp_size > 1 (inside an
    initialised process group: tp.py) only this rank's shard, by transformers' tp_plan "auto"."""
    path, kw = _located(source, cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    phase("tokenizer")
    if tp_size > 1:
        from transformers.distributed import DistributedConfig
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, distributed_config=DistributedConfig(tp_size=tp_size, tp_plan="auto"), **kw).eval()
        phase("weights")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
        phase("weights")
        if device.type == "cpu" and cfg.prepack_weights:
            from deployments.llm.prepacked import prepack_linears
            logger.info("%d linear layers run on prepacked weights", prepack_linears(model))
            phase("prepack")
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    return model, tokenizer


def model_config(source: str, cfg: LLMEngineConfig) -> Any:
    """The model's transformers config, as load_causal_lm would find it (a GGUF is dequantized first)."""
    path, kw = _located(source, cfg)
    return AutoConfig.from_pretrained(path, **kw)


def _located(source: str, cfg: LLMEngineConfig) -> tuple[str, dict[str, Any]]:
    """(what from_pretrained loads, its keyword arguments)."""
    resolved = resolve_source(source)
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision and resolved.kind == "hub":
        kw["revision"] = cfg.revision
    return _prepared(resolved, cfg), kw


def dequantized_copy(resolved: ResolvedSource, root: str) -> str:
    """Path of a safetensors copy of a GGUF checkpoint, made on first use."""
    gguf = os.path.join(resolved.path, resolved.gguf_file)
    st = os.stat(gguf)
    key = hashlib.sha256(f"{os.path.realpath(gguf)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = os.path.join(root, f"{os.path.splitext(resolved.gguf_file)[0]}-{key}")
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    logger.info("dequantizing %s once into %s", gguf, dest)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    try:
        _write_dequantized(resolved, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another replica won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    phase("GGUF dequantized")
    return dest


def _write_dequantized(resolved: ResolvedSource, out: str) -> None:
    kw = {"gguf_file": resolved.gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(resolved.path, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.generation_config = quantized.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
