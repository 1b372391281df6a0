"""What the parts of ``gpu_suite.py`` share: result files, skips, devices, timers, precision.

A part is a function ``part(cfg, rec)`` run in a child process: ``cfg`` holds ``smoke`` (toy
sizes) and ``device`` (``"auto"``, ``"cpu"`` or ``"cuda"``); ``rec`` is a :class:`Record` that
rewrites the part's JSON file after every entry, so that a part stopped by its time limit
still leaves what it measured. A part that cannot run raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

__all__ = [
    "Record",
    "Skip",
    "autocast",
    "finite",
    "progress",
    "time_calls",
    "time_once",
    "torch_device",
    "torch_env",
    "torch_precision",
]


class Skip(Exception):
    """Raised by a part that cannot run here; the message is the reason, recorded as such."""


class Record:
    """A part's results, written to ``path`` (JSON, atomically) after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def progress(message: str) -> None:
    """One progress line on stdout (the suite keeps the last one if a part times out)."""
    print(message, flush=True)


def finite(x: float | None) -> bool:
    """Whether ``x`` is a finite number."""
    return x is not None and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# torch


def torch_device(cfg: dict[str, Any]) -> Any:
    """The torch device of a part: CUDA when available (or asked for), else the CPU.

    The full sizes are meant for a GPU: without one, only ``--smoke`` runs (on the CPU).
    """
    import torch

    wanted = cfg["device"]
    if wanted == "cuda" and not torch.cuda.is_available():
        msg = "`--device cuda` was asked for but torch sees no CUDA device"
        raise Skip(msg)
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    if not use_cuda and not cfg["smoke"]:
        msg = "no CUDA device: the full sizes need a GPU (use --smoke for toy sizes on the CPU)"
        raise Skip(msg)
    return torch.device("cuda" if use_cuda else "cpu")


def torch_env(device: Any) -> dict[str, Any]:
    """torch version, its CUDA version and the device's name."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": name,
        "threads": torch.get_num_threads(),
    }


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Milliseconds of one call of ``fn``, and what it returned.

    On a GPU the call is timed by CUDA events recorded around it (the device's time from the
    first queued kernel to the last, after the queue was drained); on the CPU by
    ``time.perf_counter``.
    """
    import torch

    if device.type == "cuda":
        _sync(device)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def time_calls(fn: Callable[[], Any], device: Any, warmup: int, repeats: int) -> dict[str, Any]:
    """Milliseconds of ``repeats`` calls of ``fn`` (:func:`time_once`) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = [time_once(fn, device)[0] for _ in range(repeats)]
    return {"median_ms": statistics.median(times), "all_ms": times}


@contextmanager
def torch_precision(mode: str) -> Iterator[None]:
    """TF32 matrix products on for ``"tf32"``, off for ``"fp32"`` and ``"bf16"``; restored on exit.

    ``"bf16"`` also needs :func:`autocast` around the forward pass.
    """
    import torch

    if mode not in ("fp32", "tf32", "bf16"):
        msg = f"`mode` must be 'fp32', 'tf32' or 'bf16'; got {mode!r}."
        raise ValueError(msg)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast(mode: str, device: Any) -> Any:
    """bfloat16 autocast for ``mode == "bf16"`` (wrap the forward pass and the loss), else none."""
    import torch

    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
