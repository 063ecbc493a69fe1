"""CPU linear layers whose weights are reordered once, at load, into oneDNN's blocked layout.

torch's F.linear on CPU hands the plain weight to oneDNN (bf16) or MKL (fp32) on every call, and the
weight is reordered each time; IPEX and inductor's freezing pass pack it once instead, and so does
this (timings in bench/README.md, "Engine"); the outputs are bit-identical to F.linear in bf16 and
do not depend on the batch size. Imported only inside model replicas (needs torch).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_DTYPES = (torch.bfloat16, torch.float32)


class PackedLinear(nn.Module):
    """Inference-only stand-in for an nn.Linear on CPU. The plain weight is not kept (the packed copy
    replaces it; a tied weight stays with the module that shares it)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.lone_row_as_two = False   # see batch_invariant_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lone_row_as_two and x.numel() == x.shape[-1]:   # one row: computed as the first of two
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(1, -1).expand(2, -1).contiguous(), self.packed,
                                                   self.bias, "none", [], "")
            return y[:1].reshape(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module) -> int:
    """Swaps every plain nn.Linear of a CPU model (bf16 or fp32) for a PackedLinear; returns how many
    were swapped. A no-op where oneDNN is missing, or where a packed layer's output differs from the
    plain one's beyond rounding (checked on the first layer)."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in _DTYPES]
    if not found or not _available(found[0][2]):
        return 0
    for parent, name, child in found:
        setattr(parent, name, PackedLinear(child))
    return len(found)


def batch_invariant_rows(model: nn.Module, samples: int = 512) -> int:
    """Makes every PackedLinear's output row independent of the rows beside it; returns how many
    layers compute a lone row as two.

    oneDNN computes a row the same way in any batch of two or more rows, but for a lone row it may
    take a kernel that sums in another order, for some shapes and not others (bench/README.md,
    "Engine"). Each shape is checked once, on `samples` such rows; a shape where any row differs
    computes lone rows as the first of two (which costs more than one row alone)."""
    verdicts: dict[tuple, bool] = {}
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m in layers:
            key = (m.in_features, m.out_features, m.bias is not None, m.packed.dtype)
            if key not in verdicts:
                rows = samples if m.out_features <= 8192 else samples // 16
                x = (torch.randn(rows, m.in_features, generator=g) * torch.randn(rows, m.in_features, generator=g).exp())
                x = x.to(m.packed.dtype)
                m.lone_row_as_two = False
                together = m(x)
                verdicts[key] = any(not torch.equal(m(x[r:r + 1])[0], together[r]) for r in range(rows))
            m.lone_row_as_two = verdicts[key]
    return sum(m.lone_row_as_two for m in layers)


def _available(linear: nn.Linear) -> bool:
    dtype = linear.weight.dtype
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        with torch.inference_mode():
            x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
            same = torch.allclose(PackedLinear(linear)(x).float(), linear(x).float(), rtol=1e-2, atol=1e-3)
    except RuntimeError as exc:   # an op missing from this torch build
        logger.warning("prepacked linear layers unavailable (%s); using torch's", type(exc).__name__)
        return False
    if not same:
        logger.warning("prepacked linear layers disagree with torch's on this machine; using torch's")
    return same
