"""The framework-free part of a training run: its configuration, its measurements and the loop
of steps, reductions and evaluations that :mod:`compressm_cli.training` (torch) and
:mod:`compressm_cli.training_jax` (JAX) both drive.

This module imports neither torch nor JAX.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from compressm_core.schedule import ReductionEvent, ReductionWarning
from compressm_core.training import Mode, Schedule, Selection

if TYPE_CHECKING:
    from .data import Task

__all__ = [
    "Controller",
    "RunConfig",
    "RunResult",
    "controller_options",
    "lr_factors",
    "model_options",
    "partial_on_interrupt",
    "training_loop",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (stored in reports and checkpoints).

    ``d_state`` is the initial state size of every layer, or one size per layer; ``backend``
    the framework that trains the model (``"torch"`` or ``"jax"``, which has no ``"mamba"``).
    ``selection`` applies to LTI layers, ``importance`` to selective (Mamba) ones.
    """

    label: str = "compressm"
    layer: Literal["lru", "s5", "s4d", "mamba"] = "lru"
    d_model: int = 16
    d_state: int | tuple[int, ...] = 128
    n_layers: int = 1
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.01
    lr_warmup: float = 0.05
    reduce: bool = True
    tau: float = 0.1
    mode: Mode = "tolerance"
    fraction: float = 0.1
    warmup_fraction: float = 0.1
    num_reductions: int = 4
    schedule: Schedule = "steps"
    rewarmup_steps: int = 0
    max_cut: float | None = 0.5
    max_bound: float | None = None
    selection: Selection = "largest"
    importance: Literal["gramian", "mean_lti", "random"] = "gramian"
    horizon: int | Literal["auto"] | None = None
    eval_every: int = 100
    seed: int = 0
    device: str = "cpu"
    backend: Literal["torch", "jax"] = "torch"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        out = asdict(self)
        out["d_state"] = list(self.d_state) if isinstance(self.d_state, tuple) else self.d_state
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        if isinstance(data.get("d_state"), list):
            data["d_state"] = tuple(data["d_state"])
        return cls(**data)


@dataclass
class RunResult:
    """What a run measured.

    ``curve`` holds ``(step, training seconds, validation metric, total state size)`` at every
    evaluation; ``training seconds`` excludes evaluation time. ``stages``: for the baselines
    (:mod:`compressm_cli.baselines`), the metrics at their stages, ``{stage: {"val": ...,
    "test": ..., "seconds": ...}}`` (``seconds``: the stage's own wall time).
    """

    config: dict[str, Any]
    metric_name: str
    test_metric: float
    val_metric: float
    train_seconds: float
    reduction_seconds: float
    initial_sizes: dict[str, int]
    final_sizes: dict[str, int]
    curve: list[tuple[int, float, float, int]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    final_loss: float = math.nan
    status: str = "complete"
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


def lr_factors(steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor of optimizer update ``step`` (0, 1, ...): linear warm-up over a
    fraction ``warmup`` of ``steps``, then cosine decay to 0 at ``steps``."""
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return factor


def model_options(kind: str, config: RunConfig) -> dict[str, Any]:
    """The keyword arguments of either framework's ``SequenceModel`` for ``config`` on a task of
    ``kind`` (mean pooling for ``"classification"``), after ``d_input`` and ``d_output``."""
    return {
        "d_model": config.d_model,
        "d_state": config.d_state,
        "n_layers": config.n_layers,
        "layer": config.layer,
        "pool": "mean" if kind == "classification" else None,
    }


def controller_options(task: Task, config: RunConfig) -> dict[str, Any]:
    """The keyword arguments of either framework's ``CompreSSM`` controller for ``config`` on
    ``task`` that both frameworks share (the metric is maximised for classification); the
    ``horizon``, and torch's ``importance`` and ``lr_scheduler``, are added by each."""
    return {
        "total_steps": config.steps,
        "tau": config.tau,
        "mode": config.mode,
        "fraction": config.fraction,
        "warmup_fraction": config.warmup_fraction,
        "num_reductions": config.num_reductions,
        "schedule": config.schedule,
        "rewarmup_steps": config.rewarmup_steps,
        "max_cut": config.max_cut,
        "max_bound": config.max_bound,
        "selection": config.selection,
        "metric": "max" if task.kind == "classification" else "min",
    }


@contextmanager
def partial_on_interrupt(model: Any, controller: Any) -> Iterator[None]:
    """Store ``model`` and ``controller`` on a :class:`KeyboardInterrupt` raised inside, as its
    ``partial_model`` and ``partial_controller``, and re-raise it.

    Examples
    --------
    >>> try:
    ...     with partial_on_interrupt("model", None):
    ...         raise KeyboardInterrupt
    ... except KeyboardInterrupt as err:
    ...     print(err.partial_model, err.partial_controller)
    model None
    """
    try:
        yield
    except KeyboardInterrupt as err:
        err.partial_model, err.partial_controller = model, controller  # type: ignore[attr-defined]
        raise


class Controller(Protocol):
    """What :func:`training_loop` needs of a training controller (torch's or JAX's
    ``CompreSSM``)."""

    @property
    def history(self) -> list[ReductionEvent]:
        """Every event so far."""

    def step(self, *, loss: Any = None) -> list[ReductionEvent]:
        """Advance one training step (``loss``: its training loss); reduce if it is due."""

    def report_metric(self, value: float) -> list[ReductionEvent]:
        """A validation metric (judges pragmatic reductions)."""


def training_loop(
    task: Task,
    config: RunConfig,
    *,
    step: Callable[[], Any],
    evaluate: Callable[[np.ndarray, np.ndarray], float],
    sizes: Callable[[], dict[str, int]],
    controller: Controller | None,
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> RunResult:
    """The framework-independent part of a run: steps, reductions, evaluation, timing.

    Parameters
    ----------
    task : Task
        The task (validation and test splits, metric).
    config : RunConfig
        The run (``steps``, ``eval_every``, ``label``).
    step : callable
        One optimizer update on a fresh mini-batch; returns the loss (anything ``float`` takes),
        once computed (the clock stops after it returns).
    evaluate : callable
        ``(x, y) -> metric`` of the current model.
    sizes : callable
        ``() -> {layer: state size}`` of the current model.
    controller : Controller or None
        Stepped after every update (reductions).
    progress : bool, optional
        Show a tqdm bar.
    on_event : callable, optional
        Receives a message for every reduction event that was not skipped.

    Returns
    -------
    RunResult
        The measurements; the wall time counts ``step`` and ``controller.step``, not
        evaluation.

    Raises
    ------
    KeyboardInterrupt
        Re-raised after the partial result is stored on the exception as ``partial_result``.
    """
    result = RunResult(
        config=config.to_dict(),
        metric_name="accuracy" if task.kind == "classification" else "mse",
        test_metric=math.nan,
        val_metric=math.nan,
        train_seconds=0.0,
        reduction_seconds=0.0,
        initial_sizes=sizes(),
        final_sizes=sizes(),
    )
    bar = tqdm(
        total=config.steps, desc=config.label, disable=not progress, leave=False, unit="step"
    )
    clock = 0.0
    step_no = 0
    try:
        for step_no in range(1, config.steps + 1):
            start = time.perf_counter()
            loss = step()
            events = _step_controller(controller, loss, on_event)
            clock += time.perf_counter() - start
            for event in events:
                result.reduction_seconds += event.seconds
                if event.status != "skipped" and on_event is not None:
                    on_event(
                        f"{config.label}: step {event.step}, {event.layer}: {event.status} "
                        f"{event.old_rank} -> {event.new_rank} ({event.seconds:.2f} s)"
                    )
            if step_no % config.eval_every == 0 or step_no == config.steps:
                val = evaluate(task.x_val, task.y_val)
                if controller is not None and step_no < config.steps:
                    # judges a pending pragmatic reduction (rollbacks are events too)
                    where = f"{config.label}: step {step_no}"
                    for event in _report_metric(controller, val, where, on_event):
                        if on_event is not None:
                            on_event(f"{where}, {event.layer}: rolled back")
                current = sizes()
                result.curve.append((step_no, clock, val, sum(current.values())))
                bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{val:.3f}", N=current)
            bar.update(1)
        result.final_loss = float(loss)
    except KeyboardInterrupt as err:
        result.status = f"interrupted at step {step_no}"
        _finish(result, task, evaluate, sizes, controller, clock, config)
        err.partial_result = result  # type: ignore[attr-defined]
        raise
    finally:
        bar.close()
    _finish(result, task, evaluate, sizes, controller, clock, config)
    return result


def _report_metric(
    controller: Controller, value: float, where: str, on_event: Callable[[str], None] | None
) -> list[ReductionEvent]:
    """``controller.report_metric(value)`` if ``value`` is finite; else a warning line and no
    call (a NaN metric, from a diverged model, judges no reduction)."""
    if not math.isfinite(value):
        if on_event is not None:
            on_event(
                f"warning: {where}: the validation metric is {value}; not reported to the "
                "controller (no reduction is judged by it)"
            )
        return []
    return _warnings_as_lines(lambda: controller.report_metric(value), on_event)


def _step_controller(
    controller: Controller | None, loss: Any, on_event: Callable[[str], None] | None
) -> list[ReductionEvent]:
    """``controller.step(loss=loss)``; its :class:`ReductionWarning` s become event lines."""
    if controller is None:
        return []
    return _warnings_as_lines(lambda: controller.step(loss=loss), on_event)


def _warnings_as_lines(
    call: Callable[[], list[ReductionEvent]], on_event: Callable[[str], None] | None
) -> list[ReductionEvent]:
    """``call()``; the :class:`ReductionWarning` s it emits become event lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReductionWarning)
        events = call()
    for item in caught:
        if issubclass(item.category, ReductionWarning):
            if on_event is not None:
                on_event(f"warning: {item.message}")
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return events


def _finish(
    result: RunResult,
    task: Task,
    evaluate: Callable[[np.ndarray, np.ndarray], float],
    sizes: Callable[[], dict[str, int]],
    controller: Controller | None,
    clock: float,
    config: RunConfig,
) -> None:
    result.train_seconds = clock
    result.final_sizes = sizes()
    if result.curve and result.curve[-1][0] == config.steps:
        result.val_metric = result.curve[-1][2]  # evaluated at the last step already
    else:
        result.val_metric = evaluate(task.x_val, task.y_val)
    result.test_metric = evaluate(task.x_test, task.y_test)
    if controller is not None:
        result.events = [asdict(e) for e in controller.history]
