"""Working precision of the recurrent core of a layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["complex_of", "full_precision", "working_dtype"]


def working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (half and bfloat16 are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def complex_of(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype with ``dtype``'s real precision."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast: the recurrence runs in float32 (complex64) or better under AMP."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
