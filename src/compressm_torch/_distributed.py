"""Small collectives of ``torch.distributed`` through which the ranks agree on decisions.

Every decision of the controller that depends on local data (the horizon, a metric, a loss,
whether statistics were recorded) goes through one of these before it is used, so that every
rank decides the same and issues the same collectives afterwards. Without an initialized
process group they return their input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

__all__ = ["all_reduce_numbers", "is_distributed"]

_OPS = {"sum", "max", "min"}


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialized."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _device(group: Any) -> torch.device:
    """Where a collective's tensor must live: the current GPU for NCCL, else the CPU."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_numbers(
    values: Sequence[float],
    op: Literal["sum", "max", "min"],
    *,
    dtype: torch.dtype = torch.float64,
    group: Any = None,
) -> list[float]:
    """``values`` combined elementwise over all ranks by ``op`` (one collective).

    Parameters
    ----------
    values : sequence of float
        The same number of values on every rank.
    op : {"sum", "max", "min"}
        The reduction.
    dtype : torch.dtype, optional
        Dtype of the collective's tensor (``torch.int64`` for exact integers).
    group : optional
        The process group (default: the world).

    Returns
    -------
    list of float
        The combined values (``values`` unchanged without a process group).
    """
    if op not in _OPS:
        msg = f"`op` must be one of {sorted(_OPS)}; received {op!r}."
        raise ValueError(msg)
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=dtype, device=_device(group))
    reduce_op = {
        "sum": torch.distributed.ReduceOp.SUM,
        "max": torch.distributed.ReduceOp.MAX,
        "min": torch.distributed.ReduceOp.MIN,
    }[op]
    torch.distributed.all_reduce(tensor, op=reduce_op, group=group)
    return [float(v) for v in tensor.tolist()]
