"""The baselines CompreSSM is judged against (``compressm compare --baselines``).

- ``kd``: knowledge distillation from the full-size model into a model at the sizes CompreSSM
  reached;
- ``hnn``: the full-size model trained with a Hankel nuclear-norm penalty, balanced-truncated
  once to those sizes after training;
- ``post``: the full-size model balanced-truncated once after training to those sizes, then
  fine-tuned.

Each returns a :class:`~compressm_cli.runs.RunResult` whose wall time counts every stage
(the teacher's or the full model's training included) and whose ``stages`` hold the metrics
before and after each stage. This module imports torch only when a baseline runs.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from compressm_torch import LayerReduction, SequenceModel

    from .data import Task
    from .runs import RunConfig, RunResult

__all__ = [
    "BASELINES",
    "HNN_WEIGHT",
    "BaselineOptions",
    "check_baselines",
    "distill",
    "reduce_after_training",
    "regularise",
    "run_baseline",
]

BASELINES = ("kd", "hnn", "post")
# Chosen by the sweep of benchmarks/hnn_weight.py on the validation split of mnist1d
# (see docs/baselines.md).
HNN_WEIGHT = 1e-5


@dataclass(frozen=True)
class BaselineOptions:
    """Settings of the baselines.

    Attributes
    ----------
    alpha, temperature : float
        ``kd``: weight of the distillation term and softening temperature
        (:func:`compressm_torch.distillation_loss`).
    hnn_weight : float
        ``hnn``: the weight :math:`\\lambda` of the penalty
        :math:`\\lambda \\sum_\\ell \\sum_i \\sigma_i^{(\\ell)}`.
    finetune_fraction : float
        ``post``: fine-tuning steps after the cut, as a fraction of the run's steps (at least
        one step).
    """

    alpha: float = 0.5
    temperature: float = 2.0
    hnn_weight: float = HNN_WEIGHT
    finetune_fraction: float = 0.1


def check_baselines(names: tuple[str, ...], *, layer: str, task: Task | None = None) -> None:
    """Refuse baselines that cannot run on this model or task.

    Raises
    ------
    ValueError
        ``hnn`` with selective (Mamba) layers, which have no fixed system and so no Hankel
        singular values; ``kd`` on a task without a teacher signal (a single class: the softmax
        of one logit is constant).
    """
    if "hnn" in names and layer == "mamba":
        msg = (
            "hnn penalises Hankel singular values, which selective (Mamba) layers do not have; "
            "use --model lru, s5 or s4d, or leave hnn out"
        )
        raise ValueError(msg)
    single_class = task is not None and task.kind == "classification" and task.d_output < 2
    if "kd" in names and single_class:
        assert task is not None
        msg = (
            f"kd needs a teacher signal, and the task {task.name!r} has a single class (the "
            "softmax of one logit is constant); leave kd out"
        )
        raise ValueError(msg)


def _horizon(task: Task, config: RunConfig) -> int | None:
    """The Gramian horizon of ``config``; ``"auto"``: the task's sequence length."""
    if config.horizon == "auto":
        return int(task.x_train.shape[1])
    return config.horizon


def _metrics(task: Task, model: torch.nn.Module, config: RunConfig) -> dict[str, float]:
    from .training import evaluate

    return {
        "val": evaluate(task, model, task.x_val, task.y_val, config.device),
        "test": evaluate(task, model, task.x_test, task.y_test, config.device),
    }


def _statistics(
    model: torch.nn.Module, task: Task, config: RunConfig, names: list[str]
) -> dict[str, Any]:
    """Selective statistics of the named layers over (at most) 16 training batches."""
    import torch

    from compressm_torch import SelectiveRecorder

    x = torch.from_numpy(task.x_train).to(config.device)
    was_training = model.training
    model.eval()
    with SelectiveRecorder(model, layers=names, training_only=False) as rec, torch.no_grad():
        for start in range(0, min(len(x), 16 * config.batch_size), config.batch_size):
            model(x[start : start + config.batch_size])
    model.train(was_training)
    return dict(rec.statistics)


def _cut(
    model: torch.nn.Module, sizes: Mapping[str, int], task: Task, config: RunConfig, step: int
) -> tuple[list[dict[str, Any]], float]:
    """Reduce every layer once to ``sizes``: balanced truncation
    (:func:`compressm_torch.reduce_model`) for LTI layers, index selection by the Gramian
    importance of statistics over training data for selective ones. Returns the events (in the
    format of the controller's history) and the wall time."""
    from compressm_core.schedule import ReductionEvent
    from compressm_torch import (
        SelectiveAdapter,
        find_layers,
        get_adapter,
        reduce_model,
        reduce_selective_layer,
        state_sizes,
    )

    start = time.perf_counter()
    layers = find_layers(model)
    before = state_sizes(model)
    todo = {name: int(rank) for name, rank in sizes.items() if int(rank) < before[name]}
    selective = [n for n in todo if isinstance(get_adapter(layers[n]), SelectiveAdapter)]
    reports: dict[str, LayerReduction] = {}
    if selective:
        stats = _statistics(model, task, config, selective)
        for name in selective:
            reports[name] = reduce_selective_layer(layers[name], stats[name], rank=todo[name])
    lti = {n: r for n, r in todo.items() if n not in selective}
    reports.update(reduce_model(model, lti, horizon=_horizon(task, config)))
    seconds = time.perf_counter() - start
    events = [
        dataclasses.asdict(
            ReductionEvent(
                step=step,
                layer=name,
                status="reduced",
                old_rank=report.old_rank,
                new_rank=report.new_rank,
                hsv=report.hsv.tolist(),
                error_bound=report.error_bound,
                seconds=seconds / len(reports),
            )
        )
        for name, report in reports.items()
    ]
    return events, seconds


def _stage(result: RunResult) -> dict[str, Any]:
    """The metrics and training time of ``result``: one entry of ``RunResult.stages``."""
    return {"val": result.val_metric, "test": result.test_metric, "seconds": result.train_seconds}


def _tagged(result: RunResult, name: str, **extra: Any) -> RunResult:
    result.config = {**result.config, "baseline": {"name": name, **extra}}
    return result


def distill(
    task: Task,
    config: RunConfig,
    teacher: SequenceModel,
    teacher_result: RunResult,
    sizes: Mapping[str, int],
    *,
    options: BaselineOptions = BaselineOptions(),
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> RunResult:
    """``kd``: a student at ``sizes`` trained for ``config.steps`` steps on

    .. math::

        (1 - \\alpha)\\, \\mathrm{CE}(y, s) + \\alpha\\, T^2\\,
        \\mathrm{KL}\\big(\\operatorname{softmax}(t / T) \\,\\|\\, \\operatorname{softmax}(s / T)
        \\big)

    with the logits ``t`` of ``teacher`` (the full-size model trained to completion; for
    regression, :math:`(1 - \\alpha) \\mathrm{MSE}(s, y) + \\alpha \\mathrm{MSE}(s, t)`). The
    student's steps include the teacher's forward pass; the wall time adds the teacher's
    training time, and the curve's times are shifted by it.
    """
    import torch

    from compressm_torch import distillation_loss

    from .training import train

    def objective(x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(
            out,
            target,
            y,
            alpha=options.alpha,
            temperature=options.temperature,
            kind=task.kind,
        )

    student = dataclasses.replace(config, reduce=False, d_state=tuple(sizes.values()))
    was_training = teacher.training
    teacher.eval()
    try:
        result = train(task, student, progress=progress, on_event=on_event, objective=objective)[0]
    finally:
        teacher.train(was_training)
    offset = teacher_result.train_seconds
    result.stages = {"teacher": _stage(teacher_result), "student": _stage(result)}
    result.train_seconds += offset
    result.curve = [(s, t + offset, v, n) for s, t, v, n in result.curve]
    return _tagged(result, "kd", alpha=options.alpha, temperature=options.temperature)


def regularise(
    task: Task,
    config: RunConfig,
    sizes: Mapping[str, int],
    *,
    options: BaselineOptions = BaselineOptions(),
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> RunResult:
    """``hnn``: the full-size model trained on

    .. math::

        \\mathcal{L} + \\lambda \\sum_\\ell \\sum_i \\sigma_i^{(\\ell)}

    (:func:`compressm_torch.hankel_nuclear_norm` at every step, with the Gramian horizon of
    ``config``; not computed for :math:`\\lambda = 0`), then balanced-truncated once to
    ``sizes``. ``stages`` holds the metrics before and after the cut (and the final sum of
    HSVs); the wall time counts the training and the cut.
    """
    import torch

    from compressm_torch import hankel_nuclear_norm, state_sizes

    from .training import build_model, task_loss, train

    full = dataclasses.replace(config, reduce=False)
    model = build_model(task, full)
    horizon = _horizon(task, full)
    weight = options.hnn_weight

    def objective(_: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        penalty = hankel_nuclear_norm(model, horizon=horizon)
        return task_loss(task, out, y) + weight * penalty.to(out.dtype)

    result = train(
        task,
        full,
        progress=progress,
        on_event=on_event,
        model=model,
        objective=objective if weight > 0 else None,  # 0: plain training, then the cut
    )[0]
    with torch.no_grad():
        norm = float(hankel_nuclear_norm(model, horizon=horizon))
    result.stages["before_cut"] = {**_stage(result), "hsv_sum": norm}
    result.events, seconds = _cut(model, sizes, task, full, full.steps)
    after = _metrics(task, model, full)
    result.stages["after_cut"] = {**after, "seconds": seconds}
    result.val_metric, result.test_metric = after["val"], after["test"]
    result.train_seconds += seconds
    result.reduction_seconds += seconds
    result.final_sizes = state_sizes(model)
    total = sum(result.final_sizes.values())
    result.curve.append((full.steps, result.train_seconds, after["val"], total))
    return _tagged(result, "hnn", weight=weight, horizon=horizon)


def reduce_after_training(
    task: Task,
    config: RunConfig,
    model: SequenceModel,
    full_result: RunResult,
    sizes: Mapping[str, int],
    *,
    options: BaselineOptions = BaselineOptions(),
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> RunResult:
    """``post``: a copy of the trained full-size ``model`` balanced-truncated once to ``sizes``
    (index selection for selective layers), then fine-tuned for
    ``max(1, round(finetune_fraction * steps))`` steps (AdamW at ``config.lr`` with its own
    warm-up and cosine decay). ``stages`` holds the metrics after training, after the cut and
    after fine-tuning; the wall time counts all three; the curve continues that of
    ``full_result`` (steps and times after it)."""
    from .runs import RunResult
    from .training import train

    model = copy.deepcopy(model).train()
    events, seconds = _cut(model, sizes, task, config, config.steps)
    cut = _metrics(task, model, config)
    steps = max(1, round(options.finetune_fraction * config.steps))
    tune = dataclasses.replace(config, reduce=False, steps=steps, label=f"{config.label} tune")
    tuned = train(task, tune, progress=progress, on_event=on_event, model=model)[0]
    offset = full_result.train_seconds + seconds
    size = sum(tuned.final_sizes.values())
    curve = [
        *full_result.curve,
        (config.steps, offset, cut["val"], size),
        *((config.steps + s, offset + t, v, n) for s, t, v, n in tuned.curve),
    ]
    result = RunResult(
        config={**config.to_dict(), "reduce": False},
        metric_name=full_result.metric_name,
        test_metric=tuned.test_metric,
        val_metric=tuned.val_metric,
        train_seconds=offset + tuned.train_seconds,
        reduction_seconds=seconds,
        initial_sizes=dict(full_result.initial_sizes),
        final_sizes=dict(tuned.final_sizes),
        curve=curve,
        events=events,
        final_loss=tuned.final_loss,
        status=tuned.status,
        stages={
            "trained": _stage(full_result),
            "after_cut": {**cut, "seconds": seconds},
            "fine_tuned": _stage(tuned),
        },
    )
    return _tagged(result, "post", finetune_steps=steps)


def run_baseline(
    name: str,
    task: Task,
    config: RunConfig,
    *,
    full: tuple[RunResult, SequenceModel] | None,
    sizes: Mapping[str, int],
    options: BaselineOptions = BaselineOptions(),
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the baseline ``name`` (one of :data:`BASELINES`) with ``config`` (the full-size
    run's, relabelled), the result and model of the trained full-size run of the same seed
    (``full``; ``hnn`` needs none) and the sizes CompreSSM reached.

    Raises
    ------
    ValueError
        An unknown ``name``, or no ``full`` run for ``kd`` or ``post``.
    """
    common: dict[str, Any] = {"options": options, "progress": progress, "on_event": on_event}
    if name == "hnn":
        return regularise(task, config, sizes, **common)
    if name not in BASELINES:
        msg = f"`name` must be one of {BASELINES}; received {name!r}."
        raise ValueError(msg)
    if full is None:
        msg = f"the baseline {name!r} needs the trained full-size run (`full`)."
        raise ValueError(msg)
    result, model = full
    if name == "kd":
        return distill(task, config, model, result, sizes, **common)
    return reduce_after_training(task, config, model, result, sizes, **common)
