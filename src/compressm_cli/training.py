"""One training run of a sequence model with torch, with or without in-training reduction.

:class:`RunConfig`, :class:`RunResult`, :func:`lr_factors`, :class:`Controller` and
:func:`training_loop` are those of :mod:`compressm_cli.runs`, which imports no framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from compressm_torch import CompreSSM, SequenceModel, state_sizes

from .runs import (
    Controller,
    RunConfig,
    RunResult,
    controller_options,
    lr_factors,
    model_options,
    partial_on_interrupt,
    training_loop,
)

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


def build_model(task: Task, config: RunConfig) -> SequenceModel:
    """The :class:`SequenceModel` of ``config`` for ``task`` (mean pooling for classification)."""
    torch.manual_seed(config.seed)
    model = SequenceModel(task.d_input, task.d_output, **model_options(task.kind, config))
    return model.to(config.device)


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
            horizon=config.horizon,
            importance=config.importance,
            lr_scheduler=sched,
            **controller_options(task, config),
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

    with partial_on_interrupt(model, ctl):
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
    return result, model, ctl
