"""The training controller: reduce every supported layer of a model at scheduled steps."""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
from torch import nn

from compressm_core import CompressmError, hankel_singular_values, select_rank
from compressm_core.schedule import (
    ReductionEvent,
    _check_fraction,
    _check_int,
    reduction_schedule,
)

from .adapters import LayerAdapter, SelectiveAdapter, get_adapter, resize_layers, state_sizes
from .adapters import find_layers as _find_layers
from .optim import POLICIES, OptimizerStatePolicy, update_optimizer_state
from .reduction import _SELECTIONS, LayerReduction, Selection, _reduce
from .selective import (
    _AGGREGATES,
    _IMPORTANCE,
    Importance,
    SelectiveRecorder,
    _rank_for,
    selective_importance,
)
from .selective import reduce_selective_layer as _reduce_selective

__all__ = ["CompreSSM", "ReductionEvent", "ReductionWarning", "reduction_schedule"]

logger = logging.getLogger("compressm")

Mode = Literal["tolerance", "fixed", "pragmatic"]
_MODES = ("tolerance", "fixed", "pragmatic")


class ReductionWarning(UserWarning):
    """A scheduled reduction was refused or skipped; the model was left as it was."""


class CompreSSM:
    """Reduce the state of a model's SSM layers during training (CompreSSM).

    Call :meth:`step` once after every ``optimizer.step()``. At each scheduled step every
    supported layer (:func:`find_layers`) is reduced by balanced truncation to the smallest
    rank that keeps a fraction ``1 - tau`` of its Hankel singular-value energy (``"tolerance"``
    mode) or by a fixed ``fraction`` (``"fixed"``, ``"pragmatic"``), but only if the new rank is
    below ``gate`` times the current one (the paper's 5 % gate). The live optimizer is updated in
    place: the Parameter objects are kept, so param_groups, their hyperparameters, the LR
    scheduler and every other parameter's state survive bit for bit; the moments of the reduced
    tensors are reset after the change of basis (sliced exactly after an index selection).

    Parameters
    ----------
    model : torch.nn.Module
        The model (plain or ``torch.compile``d).
    optimizer : torch.optim.Optimizer or None
        The optimizer training ``model``; ``None`` skips the optimizer surgery.
    total_steps : int
        Length of training in optimizer steps (sets the default schedule).
    tau : float, optional
        Fraction of the HSV energy that may be discarded at each event (``"tolerance"``).
    mode : {"tolerance", "fixed", "pragmatic"}, optional
        ``"pragmatic"``: reduce by ``fraction``, compare the next reported validation metric with
        the one before the event, and if it fell by more than ``rollback_rtol`` (relative) restore
        the model, optimizer and scheduler snapshot and stop reducing.
    warmup_fraction, num_reductions : optional
        Default schedule: ``num_reductions`` events evenly spaced in the first
        ``warmup_fraction`` of training (:func:`reduction_schedule`).
    reduction_steps : sequence of int, optional
        Explicit schedule (overrides the default).
    fraction : float, optional
        Fraction of states removed per event in ``"fixed"`` and ``"pragmatic"`` modes.
    selection : {"largest", "smallest", "random"}, optional
        Keep the strongest balanced states (the method), the weakest, or random modal states.
    optimizer_state : {"reset", "zero"}, optional
        Policy for the moments of reduced tensors after a change of basis (see
        :func:`update_optimizer_state`).
    lr_scheduler : optional
        The scheduler driving ``optimizer``; snapshotted and restored by pragmatic rollbacks.
    horizon : None, int or "auto", optional
        Gramians over an infinite horizon (``None``, the paper), over ``horizon`` steps, or over
        the longest sequence the layers have seen in forward passes (``"auto"``).
    gate : float, optional
        Reduce only if ``new_rank < gate * current_rank``.
    min_rank : int, optional
        Never go below this many states.
    method, real_output, energy : optional
        Passed to the balanced truncation (see :func:`reduce_layer`).
    rollback_rtol : float, optional
        Relative fall of the validation metric that triggers a rollback (pragmatic mode).
    metric : {"max", "min"}, optional
        Whether a larger (accuracy) or smaller (loss) validation metric is better.
    compute_error : bool, optional
        Measure the H-infinity change of every reduced layer (recorded in the history).
    layers : iterable of str, optional
        Names of the layers to manage (default: all supported layers).
    seed : int, optional
        Seed of the random selection.
    importance : {"gramian", "mean_lti", "random"}, optional
        Selective (Mamba) layers: the state-importance scores that choose the kept state
        indices (:func:`reduce_selective_layer`); ``tau``, ``fraction``, ``gate`` and
        ``min_rank`` apply to them as to the LTI layers.
    aggregate : {"sum", "energy", "normalized"}, optional
        Selective layers: how per-channel scores are combined.
    calibration_steps : int, optional
        Selective layers: their statistics are recorded from the forward passes of the
        ``calibration_steps`` training steps before each scheduled reduction (forward
        pre-hooks; no extra forward pass) and dropped after it.
    calibration_batches : iterable, optional
        Selective layers: inputs run through ``model`` (no gradients) when a reduction finds no
        recorded statistics, e.g. for :meth:`reduce` outside training. Each item is a model
        input, or a tuple/list whose first element is. Under ``torch.distributed`` the
        statistics are summed over all ranks before the scores are computed, so every rank
        keeps the same states.
    calibration_sequences : int, optional
        Selective layers: record at most this many sequences of each calibration batch
        (:class:`SelectiveRecorder`'s ``max_sequences``; default all). The recording cost is
        proportional to it; the scores are then estimated from fewer samples.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import LRU, CompreSSM
    >>> model = torch.nn.Sequential(LRU(4, 32), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> ctl = CompreSSM(model, opt, total_steps=100, tau=0.2)
    >>> for _ in range(100):
    ...     loss = model(torch.randn(8, 20, 4)).pow(2).mean()
    ...     opt.zero_grad(); loss.backward(); opt.step()
    ...     _ = ctl.step()
    >>> model[0].d_state < 32
    True
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        total_steps: int,
        tau: float = 0.1,
        mode: Mode = "tolerance",
        warmup_fraction: float = 0.1,
        num_reductions: int = 4,
        reduction_steps: Sequence[int] | None = None,
        fraction: float = 0.1,
        selection: Selection = "largest",
        optimizer_state: OptimizerStatePolicy = "reset",
        lr_scheduler: Any = None,
        horizon: int | Literal["auto"] | None = None,
        gate: float = 0.95,
        min_rank: int = 1,
        method: Literal["sqrt", "bfsr"] = "sqrt",
        real_output: bool = False,
        energy: Literal["sum", "squared"] = "sum",
        rollback_rtol: float = 0.02,
        metric: Literal["max", "min"] = "max",
        compute_error: bool = False,
        layers: Iterable[str] | None = None,
        seed: int = 0,
        importance: Importance = "gramian",
        aggregate: Literal["sum", "energy", "normalized"] = "sum",
        calibration_steps: int = 8,
        calibration_batches: Iterable[Any] | None = None,
        calibration_sequences: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            msg = f"`model` must be a torch.nn.Module; received {type(model).__name__}."
            raise TypeError(msg)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            kind = type(optimizer).__name__
            msg = f"`optimizer` must be a torch.optim.Optimizer or None; received {kind}."
            raise TypeError(msg)
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.tau = _check_fraction("tau", tau)
        self.fraction = _check_fraction("fraction", fraction)
        self.gate = _check_fraction("gate", gate, closed=True)
        self.rollback_rtol = _check_fraction("rollback_rtol", rollback_rtol, closed=True)
        self.min_rank = _check_int("min_rank", min_rank, 1)
        for name, value, allowed in (
            ("mode", mode, _MODES),
            ("selection", selection, _SELECTIONS),
            ("optimizer_state", optimizer_state, POLICIES),
            ("method", method, ("sqrt", "bfsr")),
            ("energy", energy, ("sum", "squared")),
            ("metric", metric, ("max", "min")),
            ("importance", importance, _IMPORTANCE),
            ("aggregate", aggregate, _AGGREGATES),
        ):
            if value not in allowed:
                msg = f"`{name}` must be one of {allowed}; received {value!r}."
                raise ValueError(msg)
        if selection == "random" and real_output:
            msg = "`selection='random'` keeps modal states; it excludes `real_output=True`."
            raise ValueError(msg)
        if horizon is not None and horizon != "auto":
            _check_int("horizon", horizon, 1)
        if reduction_steps is None:
            schedule = reduction_schedule(
                total_steps, warmup_fraction=warmup_fraction, num_reductions=num_reductions
            )
        else:
            schedule = sorted({_check_int("reduction_steps[i]", s, 1) for s in reduction_steps})
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.mode, self.selection, self.optimizer_state = mode, selection, optimizer_state
        self.horizon, self.method, self.real_output = horizon, method, real_output
        self.energy, self.metric, self.compute_error = energy, metric, compute_error
        self.importance, self.aggregate, self.seed = importance, aggregate, seed
        self.calibration_steps = _check_int("calibration_steps", calibration_steps, 1)
        self.calibration_batches = calibration_batches
        if calibration_sequences is not None:
            _check_int("calibration_sequences", calibration_sequences, 1)
        self.calibration_sequences = calibration_sequences
        self.schedule: list[int] = schedule
        found = _find_layers(model)
        if layers is not None:
            wanted = list(layers)
            missing = sorted(set(wanted) - set(found))
            if missing:
                msg = f"`layers` names layers that `model` does not have: {missing}."
                raise KeyError(msg)
            found = {name: found[name] for name in wanted}
        if not found:
            msg = (
                "`model` has no supported SSM layer (LRU, S5, Mamba, Mamba-2 or a registered "
                "type); see compressm_torch.register_adapter."
            )
            raise ValueError(msg)
        self.layers: dict[str, nn.Module] = found
        self.history: list[ReductionEvent] = []
        self.stopped = False
        self.num_steps = 0
        self.seen_length: int | None = None
        self._last_metric: float | None = None
        self._pending: dict[str, Any] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._hooks = []
        if horizon == "auto":
            self._hooks = [
                layer.register_forward_pre_hook(self._record_length)
                for layer in found.values()
                if isinstance(get_adapter(layer), LayerAdapter)
            ]
        selective = [n for n, m in found.items() if isinstance(get_adapter(m), SelectiveAdapter)]
        self._recorder: SelectiveRecorder | None = None
        if selective:
            self._recorder = SelectiveRecorder(
                model, layers=selective, active=False, max_sequences=calibration_sequences
            )
            self._update_recording()

    # -- public ----------------------------------------------------------------------------

    @property
    def state_sizes(self) -> dict[str, int]:
        """Current state size of every managed layer."""
        return {name: get_adapter(layer).state_size(layer) for name, layer in self.layers.items()}

    def step(self, val_metric: float | None = None) -> list[ReductionEvent]:
        """Advance one training step; reduce if this step is scheduled.

        Parameters
        ----------
        val_metric : float, optional
            A validation metric measured at this step (needed by ``"pragmatic"`` mode: the first
            metric after a reduction decides whether it is kept; the last one before a
            reduction is its baseline).

        Returns
        -------
        list of ReductionEvent
            The events of this step (empty on most steps).
        """
        self.num_steps += 1
        events: list[ReductionEvent] = []
        if val_metric is not None:
            events += self.report_metric(val_metric)
        if self.num_steps in self.schedule and not self.stopped:
            events += self._scheduled()
        self._update_recording()
        return events

    def report_metric(self, value: float) -> list[ReductionEvent]:
        """Report a validation metric without advancing the step count.

        In ``"pragmatic"`` mode the first metric after a reduction decides it: if it fell by more
        than ``rollback_rtol`` (relative) below the metric reported before the reduction, the
        snapshot is restored and reductions stop. The metric also becomes the baseline of the
        next reduction.

        Returns
        -------
        list of ReductionEvent
            ``"rolled_back"`` events, if this metric triggered a rollback.
        """
        value = float(value)
        if math.isnan(value):
            msg = f"`value` must be a finite number; received {value!r}."
            raise ValueError(msg)
        return self._on_metric(value)

    def reduce(self) -> list[ReductionEvent]:
        """Run one reduction event now, on every managed layer (outside the schedule)."""
        return self._reduce_all()

    def remove_hooks(self) -> None:
        """Remove the forward hooks (``horizon="auto"``, statistics of selective layers)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._recorder is not None:
            self._recorder.remove()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: counters, schedule, history, random state, pending
        pragmatic snapshot."""
        return {
            "num_steps": self.num_steps,
            "schedule": list(self.schedule),
            "stopped": self.stopped,
            "seen_length": self.seen_length,
            "last_metric": self._last_metric,
            "pending": self._pending,
            "generator": self._generator.get_state(),
            "history": [asdict(e) for e in self.history],
            "state_sizes": self.state_sizes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the layers must already have the recorded sizes)."""
        sizes = self.state_sizes
        if state.get("state_sizes", sizes) != sizes:
            msg = (
                f"The model's state sizes {sizes} differ from the recorded "
                f"{state['state_sizes']}; restore the model first (load_checkpoint does)."
            )
            raise ValueError(msg)
        self.num_steps = int(state["num_steps"])
        self.schedule = [int(s) for s in state["schedule"]]
        self.stopped = bool(state["stopped"])
        self.seen_length = state["seen_length"]
        self._last_metric = state["last_metric"]
        self._pending = state["pending"]
        self._generator.set_state(state["generator"])
        self.history = [ReductionEvent(**e) for e in state["history"]]

    # -- internals -------------------------------------------------------------------------

    def _record_length(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and torch.is_tensor(args[0]) and args[0].ndim >= 2:
            length = int(args[0].shape[-2])
            if self.seen_length is None or length > self.seen_length:
                self.seen_length = length

    def _update_recording(self) -> None:
        """Record selective statistics during the forward passes of the next
        ``calibration_steps`` steps if they end in a scheduled reduction."""
        if self._recorder is None:
            return
        ahead = range(self.num_steps + 1, self.num_steps + self.calibration_steps + 1)
        self._recorder.active = not self.stopped and any(s in ahead for s in self.schedule)

    def _resolved_horizon(self) -> int | None:
        if self.horizon == "auto":
            if self.seen_length is None:
                warnings.warn(
                    "horizon='auto' has seen no forward pass yet; using infinite-horizon "
                    "Gramians for this event.",
                    ReductionWarning,
                    stacklevel=3,
                )
            return self.seen_length
        return self.horizon

    def _target_rank(self, hsv: torch.Tensor) -> int:
        total = int(hsv.shape[-1])
        if self.mode == "tolerance":
            rank = select_rank(hsv, tau=self.tau, energy=self.energy)
        else:
            rank = math.floor(total * (1 - self.fraction))
        return min(total, max(self.min_rank, rank))

    def _scheduled(self) -> list[ReductionEvent]:
        if self.mode != "pragmatic":
            return self._reduce_all()
        if self._pending is not None:
            reason = "pragmatic mode: the previous reduction has not been validated yet"
        elif self._last_metric is None:
            reason = "pragmatic mode needs a val_metric reported before the reduction"
        else:
            self._pending = self._snapshot()
            events = self._reduce_all()
            if not any(e.status == "reduced" for e in events):
                self._pending = None
            return events
        warnings.warn(
            f"Reduction at step {self.num_steps} skipped: {reason}.",
            ReductionWarning,
            stacklevel=3,
        )
        return [self._event(name, "skipped", reason=reason) for name in self.layers]

    def _on_metric(self, value: float) -> list[ReductionEvent]:
        events: list[ReductionEvent] = []
        pending = self._pending
        if pending is not None:
            base = pending["metric"]
            slack = self.rollback_rtol * abs(base)
            worse = value < base - slack if self.metric == "max" else value > base + slack
            self._pending = None
            if worse:
                reason = f"validation metric {value:.6g} vs {base:.6g} before the reduction"
                before = self.state_sizes
                self._restore(pending)
                self.stopped = True
                events = [
                    self._event(name, "rolled_back", before[name], size, reason=reason)
                    for name, size in self.state_sizes.items()
                ]
                self.history += events
                logger.info("compressm: rolled back (%s); reductions stopped", reason)
        self._last_metric = value
        return events

    def _snapshot(self) -> dict[str, Any]:
        return {
            "metric": self._last_metric,
            "sizes": state_sizes(self.model),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": None
            if self.optimizer is None
            else copy.deepcopy(self.optimizer.state_dict()),
            "lr_scheduler": None
            if self.lr_scheduler is None
            else copy.deepcopy(self.lr_scheduler.state_dict()),
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        resize_layers(self.model, snap["sizes"])
        self.model.load_state_dict(snap["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(snap["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(snap["lr_scheduler"])

    def _event(
        self, name: str, status: str, old: int | None = None, new: int | None = None, **kw: Any
    ) -> ReductionEvent:
        layer = self.layers[name]
        size = get_adapter(layer).state_size(layer)
        return ReductionEvent(
            step=self.num_steps,
            layer=name,
            status=status,
            old_rank=size if old is None else old,
            new_rank=size if new is None else new,
            **kw,
        )

    def _reduce_all(self) -> list[ReductionEvent]:
        recorder = self._recorder
        if recorder is not None:
            missing = any(recorder.samples(name) == 0 for name in recorder.layers)
            if missing and self.calibration_batches is not None:
                self._calibrate()
            recorder.all_reduce()  # one collective per event, on every rank
        events = [self._reduce_one(name, layer) for name, layer in self.layers.items()]
        self.history += events
        return events

    def _reduce_one(self, name: str, layer: nn.Module) -> ReductionEvent:
        start = time.perf_counter()
        adapter = get_adapter(layer)
        if isinstance(adapter, SelectiveAdapter):
            return self._reduce_selective(name, layer, adapter, start)
        old = adapter.state_size(layer)
        horizon = self._resolved_horizon()
        try:
            sys = adapter.to_state_space(layer)
            hsv = hankel_singular_values(sys, horizon=horizon, real_output=self.real_output)
        except (CompressmError, ValueError, RuntimeError) as err:
            return self._refused(name, old, [], start, err)
        rank = self._target_rank(hsv)
        total = int(hsv.shape[-1])
        hsv_list = hsv.detach().cpu().tolist()
        if not rank < self.gate * total:
            reason = f"rank {rank} of {total} is not below the gate {self.gate:g} x {total}"
            return self._event(
                name, "skipped", hsv=hsv_list, reason=reason, seconds=time.perf_counter() - start
            )
        shapes = {p: tuple(v.shape) for p, v in layer.named_parameters()}
        try:
            report = _reduce(
                layer,
                adapter,
                sys,
                hsv,
                rank,
                method=self.method,
                selection=self.selection,
                real_output=self.real_output,
                horizon=horizon,
                compute_error=self.compute_error,
                generator=self._generator,
                max_condition=1e8,
            )
        except (CompressmError, ValueError, RuntimeError) as err:
            return self._refused(name, old, hsv_list, start, err)
        self._rebind(layer, adapter, shapes, report)
        return self._reduced(name, old, hsv_list, report, start)

    def _reduced(
        self, name: str, old: int, hsv: list[float], report: LayerReduction, start: float
    ) -> ReductionEvent:
        event = ReductionEvent(
            step=self.num_steps,
            layer=name,
            status="reduced",
            old_rank=old,
            new_rank=report.new_rank,
            hsv=hsv,
            error_bound=report.error_bound,
            hinf_error=report.hinf_error,
            seconds=time.perf_counter() - start,
        )
        logger.info(
            "compressm: step %d, %s: %d -> %d states", self.num_steps, name, old, report.new_rank
        )
        return event

    def _refused(
        self, name: str, old: int, hsv: list[float], start: float, err: Exception
    ) -> ReductionEvent:
        reason = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"Reduction of layer {name!r} at step {self.num_steps} refused; the layer is "
            f"unchanged. {reason}",
            ReductionWarning,
            stacklevel=4,
        )
        return ReductionEvent(
            step=self.num_steps,
            layer=name,
            status="refused",
            old_rank=old,
            new_rank=old,
            hsv=hsv,
            seconds=time.perf_counter() - start,
            reason=reason,
        )

    def _reduce_selective(
        self, name: str, layer: nn.Module, adapter: SelectiveAdapter, start: float
    ) -> ReductionEvent:
        assert self._recorder is not None
        old = adapter.state_size(layer)
        stats = self._recorder.statistics.get(name)
        self._recorder.reset([name])
        if stats is None:
            err = ValueError(
                "no statistics were recorded (no training forward pass in the "
                f"{self.calibration_steps} calibration steps, and no calibration_batches)"
            )
            return self._refused(name, old, [], start, err)
        shapes = {p: tuple(v.shape) for p, v in layer.named_parameters()}
        seed = self.seed + self.num_steps
        try:
            rate = selective_importance(layer, stats, aggregate=self.aggregate, seed=seed)
            if self.mode == "tolerance":
                rank = _rank_for(rate, self.tau)
            else:
                rank = math.floor(old * (1 - self.fraction))
            rank = min(old, max(self.min_rank, rank))
            if adapter.rank_multiple is not None:
                rank = adapter.rank_multiple(layer, rank)
            hsv_list = torch.sort(rate.reshape(-1, old).sum(0), descending=True).values.tolist()
            if not rank < self.gate * old:
                reason = f"rank {rank} of {old} is not below the gate {self.gate:g} x {old}"
                return self._event(
                    name,
                    "skipped",
                    hsv=hsv_list,
                    reason=reason,
                    seconds=time.perf_counter() - start,
                )
            report = _reduce_selective(
                layer,
                stats,
                rank,
                importance=self.importance,
                aggregate=self.aggregate,
                seed=seed,
            )
        except (CompressmError, ValueError, RuntimeError) as err:
            return self._refused(name, old, [], start, err)
        self._rebind(layer, adapter, shapes, report)
        return self._reduced(name, old, hsv_list, report, start)

    @torch.no_grad()
    def _calibrate(self) -> None:
        assert self._recorder is not None
        assert self.calibration_batches is not None
        recorder = self._recorder
        active, training_only = recorder.active, recorder.training_only
        recorder.active, recorder.training_only = True, False
        try:
            for batch in self.calibration_batches:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                self.model(inputs)
        finally:
            recorder.active, recorder.training_only = active, training_only

    def _rebind(
        self,
        layer: nn.Module,
        adapter: LayerAdapter | SelectiveAdapter,
        shapes: dict[str, tuple[int, ...]],
        report: LayerReduction,
    ) -> None:
        if self.optimizer is None:
            return
        if report.slices:
            for pname, (axis, pos) in report.slices.items():
                update_optimizer_state(
                    self.optimizer,
                    layer.get_parameter(pname),
                    shapes[pname],
                    axis=axis,
                    indices=pos,
                    policy=self.optimizer_state,
                )
            return
        assert isinstance(adapter, LayerAdapter)
        for pname, axis in adapter.state_axes.items():
            update_optimizer_state(
                self.optimizer,
                getattr(layer, pname),
                shapes[pname],
                axis=axis,
                indices=None,
                policy=self.optimizer_state,
            )
