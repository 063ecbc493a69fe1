"""Device and dtype choices shared by every model kind. Imported only inside model replicas."""
from __future__ import annotations

from typing import Optional

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was configured but CUDA is not available on this replica")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, *, gpu_default: torch.dtype = torch.bfloat16) -> torch.dtype:
    if dtype == "auto":
        return gpu_default if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def set_threads(num_threads: Optional[int]) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
