"""One training run of a sequence model, with or without in-training reduction."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from compressm_core.schedule import ReductionEvent, ReductionWarning
from compressm_core.training import Mode, Schedule, Selection
from compressm_torch import CompreSSM, SequenceModel, state_sizes

if TYPE_CHECKING:
    from .data import Task

__all__ = [
    "Controller",
    "RunConfig",
    "RunResult",
    "build_model",
    "evaluate",
    "lr_factors",
    "task_loss",
    "train",
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


def build_model(task: Task, config: RunConfig) -> SequenceModel:
    """The :class:`SequenceModel` of ``config`` for ``task`` (mean pooling for classification)."""
    torch.manual_seed(config.seed)
    return SequenceModel(
        task.d_input,
        task.d_output,
        d_model=config.d_model,
        d_state=config.d_state,
        n_layers=config.n_layers,
        layer=config.layer,
        pool="mean" if task.kind == "classification" else None,
    ).to(config.device)


def task_loss(task: Task, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (classification) or mean squared error (regression)."""
    if task.kind == "classification":
        return F.cross_entropy(out, target)
    return F.mse_loss(out, target)


@torch.no_grad()
def evaluate(
    task: Task, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: str = "cpu"
) -> float:
    """Accuracy (classification) or mean squared error (regression) over ``(x, y)``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(x), 512):
        xb = torch.from_numpy(x[start : start + 512]).to(device)
        yb = torch.from_numpy(y[start : start + 512]).to(device)
        out = model(xb)
        if task.kind == "classification":
            total += float((out.argmax(-1) == yb).sum())
        else:
            total += float(F.mse_loss(out, yb, reduction="sum")) / yb[0].numel()
        count += len(xb)
    model.train(was_training)
    return total / count


def lr_factors(steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor of optimizer update ``step`` (0, 1, ...): linear warm-up over a
    fraction ``warmup`` of ``steps``, then cosine decay to 0 at ``steps``."""
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return factor


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train(
    task: Task,
    config: RunConfig,
    *,
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
    model: SequenceModel | None = None,
    objective: Objective | None = None,
) -> tuple[RunResult, SequenceModel, CompreSSM | None]:
    """Train one model on ``task``; reduce it during training if ``config.reduce``.

    AdamW with linear warm-up and cosine decay, mini-batches drawn with replacement from the
    training split (seeded), validation every ``eval_every`` steps. Wall time counts the training
    steps and reduction events, not evaluation.

    ``model`` trains a given model (of the sizes it has) instead of a new one of ``config``;
    ``objective(inputs, outputs, targets)`` replaces the task's loss (:func:`task_loss`).

    Returns
    -------
    RunResult, SequenceModel, CompreSSM or None
        The measurements, the trained model and its controller.

    Raises
    ------
    KeyboardInterrupt
        Re-raised after the partial result, the model and the controller are stored on the
        exception as ``partial_result``, ``partial_model`` and ``partial_controller``.
    """
    if model is None:
        model = build_model(task, config)
    loss_of = objective or (lambda _, out, target: task_loss(task, out, target))
    # Parameters flagged `_no_weight_decay` (Mamba's A_log and D) are not decayed.
    flagged = [p for p in model.parameters() if getattr(p, "_no_weight_decay", False)]
    ids = {id(p) for p in flagged}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in model.parameters() if id(p) not in ids]},
        {"params": flagged, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factors(config.steps, config.lr_warmup))
    ctl = None
    if config.reduce:
        ctl = CompreSSM(
            model,
            opt,
            total_steps=config.steps,
            tau=config.tau,
            mode=config.mode,
            fraction=config.fraction,
            warmup_fraction=config.warmup_fraction,
            num_reductions=config.num_reductions,
            horizon=config.horizon,
            schedule=config.schedule,
            rewarmup_steps=config.rewarmup_steps,
            max_cut=config.max_cut,
            max_bound=config.max_bound,
            selection=config.selection,
            importance=config.importance,
            lr_scheduler=sched,
            metric="max" if task.kind == "classification" else "min",
        )
    x = torch.from_numpy(task.x_train).to(config.device)
    y = torch.from_numpy(task.y_train).to(config.device)
    gen = torch.Generator().manual_seed(config.seed)

    def step() -> torch.Tensor:
        idx = torch.randint(len(x), (config.batch_size,), generator=gen).to(config.device)
        xb, yb = x[idx], y[idx]
        loss = loss_of(xb, model(xb), yb)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        sched.step()
        return loss.detach()

    try:
        result = training_loop(
            task,
            config,
            step=step,
            evaluate=lambda xs, ys: evaluate(task, model, xs, ys, config.device),
            sizes=lambda: state_sizes(model),
            controller=ctl,
            progress=progress,
            on_event=on_event,
        )
    except KeyboardInterrupt as err:
        err.partial_model, err.partial_controller = model, ctl  # type: ignore[attr-defined]
        raise
    return result, model, ctl


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
