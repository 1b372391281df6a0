"""Give a Parameter a new value of another shape while keeping the Parameter object."""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["assign", "resolve"]


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.data = value`` that is safe when the shape changes.

    Autograd caches one gradient accumulator per leaf tensor, holding the leaf's shape; a graph
    from before the change that is still alive (the last ``loss``, say) keeps it, and the next
    backward pass would then reject gradients of the new shape. ``Tensor.set_data`` drops the
    cached accumulator when the dtype changes, so the value passes through an empty tensor of
    another dtype first. The stale ``.grad`` of the old shape is cleared.
    """
    if value.shape != param.shape:
        other = torch.float32 if value.dtype == torch.float64 else torch.float64
        if value.is_complex():
            other = torch.complex64 if value.dtype == torch.complex128 else torch.complex128
        param.data = value.new_empty(0, dtype=other)
    param.data = value
    param.grad = None


def resolve(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor (parameter or buffer) at the dotted attribute path ``name`` of ``module``
    (``"kernel.log_A_real"``)."""
    value = functools.reduce(getattr, name.split("."), module)
    if not isinstance(value, torch.Tensor):
        msg = f"`{name}` of {type(module).__name__} must be a tensor; received {type(value)}."
        raise TypeError(msg)
    return value
