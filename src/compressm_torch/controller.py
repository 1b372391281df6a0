"""The training controller: reduce every supported layer of a model at scheduled steps."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from compressm_core import CompressmError, hankel_singular_values, select_state_indices
from compressm_core.rank import shared_rank_hsv
from compressm_core.schedule import (
    ReductionEvent,
    ReductionWarning,
    _check_int,
    reduction_schedule,
)
from compressm_core.training import ControllerBase, Mode, ReductionOptions, Schedule

from .adapters import LayerAdapter, SelectiveAdapter, get_adapter, resize_layers, state_sizes
from .adapters import find_layers as _find_layers
from .optim import POLICIES, OptimizerStatePolicy, resize_optimizer_state
from .reduction import LayerReduction, Selection, _reduce
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


def _check_torch_options(
    *,
    optimizer_state: object,
    horizon: object,
    importance: object,
    aggregate: object,
    calibration_steps: object,
    calibration_sequences: object,
) -> None:
    """Check the options of :class:`CompreSSM` that :class:`ReductionOptions` does not hold."""
    for name, value, allowed in (
        ("optimizer_state", optimizer_state, POLICIES),
        ("importance", importance, _IMPORTANCE),
        ("aggregate", aggregate, _AGGREGATES),
    ):
        if value not in allowed:
            msg = f"`{name}` must be one of {allowed}; received {value!r}."
            raise ValueError(msg)
    if horizon is not None and horizon != "auto":
        _check_int("horizon", horizon, 1)
    _check_int("calibration_steps", calibration_steps, 1)
    if calibration_sequences is not None:
        _check_int("calibration_sequences", calibration_sequences, 1)


class CompreSSM(ControllerBase[nn.Module]):
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
        :func:`resize_optimizer_state`).
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
    schedule : {"steps", "certified"}, optional
        ``"steps"``: reduce at the fixed steps (``reduction_steps``, or ``num_reductions``
        evenly spaced in the first ``warmup_fraction``; the paper). ``"certified"``: check the
        layers every ``check_every`` steps before the deadline ``warmup_fraction *
        total_steps``; cut a layer once learning has started (pass ``loss`` to :meth:`step`)
        and the cut at the rank the rule asks for has been certified stable for
        ``certify_window`` checks (Weyl bound of :class:`~compressm_core.RankTracker`; for
        selective layers, an unchanged set of kept states) or the rule's rank has stayed within
        ``rank_rtol`` over ``certify_window + 1`` checks, at most ``num_reductions`` times; the
        deadline forces the remaining cuts. See :mod:`compressm_core.certified`.
    check_every : int, optional
        Steps between checks of the certified schedule and between readings of the training
        loss (default 1 % of ``total_steps``).
    certify_window : int, optional
        Consecutive certified checks a cut needs (certified schedule).
    learning_drop : float, optional
        Relative fall of the mean training loss below its first ``check_every`` steps that
        counts as "learning has started".
    rank_rtol : float, optional
        Relative spread of the rule's rank over the last checks that counts as stable
        (certified schedule).
    max_cut : float, optional
        Largest fraction of a layer's current states one event may remove (a floor on the
        rank: ``ceil((1 - max_cut) n)``); ``None`` (default, the paper) sets no floor.
    rewarmup_steps : int, optional
        After each event that reduced a layer, scale the learning rate of the next
        ``rewarmup_steps`` optimizer updates by ``k / (rewarmup_steps + 1)``, ``k = 1, 2, ...``
        (a brief re-warm-up). Applied around ``optimizer.step()`` by step hooks and undone
        after it, so any LR scheduler (chainable ones included) sees its own values.

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
        schedule: Schedule = "steps",
        check_every: int | None = None,
        certify_window: int = 3,
        learning_drop: float = 0.2,
        rank_rtol: float = 0.1,
        rewarmup_steps: int = 0,
        max_cut: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            msg = f"`model` must be a torch.nn.Module; received {type(model).__name__}."
            raise TypeError(msg)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            kind = type(optimizer).__name__
            msg = f"`optimizer` must be a torch.optim.Optimizer or None; received {kind}."
            raise TypeError(msg)
        options = ReductionOptions(
            tau=tau,
            mode=mode,
            warmup_fraction=warmup_fraction,
            num_reductions=num_reductions,
            reduction_steps=reduction_steps,
            fraction=fraction,
            selection=selection,
            gate=gate,
            min_rank=min_rank,
            method=method,
            real_output=real_output,
            energy=energy,
            rollback_rtol=rollback_rtol,
            metric=metric,
            compute_error=compute_error,
            seed=seed,
            schedule=schedule,
            check_every=check_every,
            certify_window=certify_window,
            learning_drop=learning_drop,
            rank_rtol=rank_rtol,
            rewarmup_steps=rewarmup_steps,
            max_cut=max_cut,
        )
        self._configure(options, total_steps=total_steps)
        _check_torch_options(
            optimizer_state=optimizer_state,
            horizon=horizon,
            importance=importance,
            aggregate=aggregate,
            calibration_steps=calibration_steps,
            calibration_sequences=calibration_sequences,
        )
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.optimizer_state, self.horizon = optimizer_state, horizon
        self.importance, self.aggregate = importance, aggregate
        self.calibration_steps = int(calibration_steps)
        self.calibration_batches = calibration_batches
        self.calibration_sequences = calibration_sequences
        self._select_layers(
            _find_layers(model),
            layers,
            "`model` has no supported SSM layer (LRU, S5, Mamba, Mamba-2 or a registered "
            "type); see compressm_torch.register_adapter.",
        )
        found = self.layers
        self.seen_length: int | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._hooks = []
        if horizon == "auto":
            self._hooks = [
                layer.register_forward_pre_hook(self._record_length)
                for layer in found.values()
                if isinstance(get_adapter(layer), LayerAdapter)
            ]
        self._stats_step: int | None = None
        self._saved_lrs: list[float] | None = None
        if optimizer is not None and self.rewarmup_steps:
            self._hooks += [
                optimizer.register_step_pre_hook(self._scale_lr),
                optimizer.register_step_post_hook(self._unscale_lr),
            ]
        selective = [n for n, m in found.items() if isinstance(get_adapter(m), SelectiveAdapter)]
        self._recorder: SelectiveRecorder | None = None
        if selective:
            self._recorder = SelectiveRecorder(
                model, layers=selective, active=False, max_sequences=calibration_sequences
            )
            self._update_recording()

    # -- public ----------------------------------------------------------------------------

    def remove_hooks(self) -> None:
        """Remove the hooks (``horizon="auto"``, statistics of selective layers, the
        learning-rate re-warm-up)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._recorder is not None:
            self._recorder.remove()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: counters, schedule, history, random state, pending
        pragmatic snapshot."""
        return {
            **self._base_state(),
            "seen_length": self.seen_length,
            "pending": self._pending,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the layers must already have the recorded sizes)."""
        self._load_base_state(state, "load_checkpoint does")
        self.seen_length = state["seen_length"]
        self._pending = state["pending"]
        self._generator.set_state(state["generator"])

    # -- internals -------------------------------------------------------------------------

    def _record_length(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and torch.is_tensor(args[0]) and args[0].ndim >= 2:
            length = int(args[0].shape[-2])
            if self.seen_length is None or length > self.seen_length:
                self.seen_length = length

    def _layer_state_size(self, layer: nn.Module) -> int:
        return get_adapter(layer).state_size(layer)

    def _after_step(self) -> None:
        self._update_recording()

    def _update_recording(self) -> None:
        """Record selective statistics during the forward passes of the next
        ``calibration_steps`` steps if they end in a scheduled reduction."""
        if self._recorder is None:
            return
        ahead = range(self.num_steps + 1, self.num_steps + self.calibration_steps + 1)
        due = any(s in ahead for s in self.schedule)
        if self.schedule_kind == "certified" and self.certify.learning_started is not False:
            due = due or any(self.certify.is_check(s) for s in ahead)
        self._recorder.active = not self.stopped and due

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

    def _snapshot(self) -> dict[str, Any]:
        return {
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

    def _reduce_all(self, names: Iterable[str] | None = None) -> list[ReductionEvent]:
        chosen = list(self.layers) if names is None else list(names)
        self._gather_statistics()
        events = [self._reduce_one(name, self.layers[name]) for name in chosen]
        self.history += events
        return events

    def _gather_statistics(self) -> None:
        """Calibrate if needed and sum the selective statistics over ranks, once per step."""
        recorder = self._recorder
        if recorder is None or self._stats_step == self.num_steps:
            return
        self._stats_step = self.num_steps
        missing = any(recorder.samples(name) == 0 for name in recorder.layers)
        if missing and self.calibration_batches is not None:
            self._calibrate()
        recorder.all_reduce()  # one collective per event, on every rank

    @torch.no_grad()
    def _observe(self, name: str, layer: nn.Module) -> tuple[Any, Any, Any] | None:
        adapter = get_adapter(layer)
        if isinstance(adapter, SelectiveAdapter):
            self._gather_statistics()
            assert self._recorder is not None
            stats = self._recorder.statistics.get(name)
            if stats is None:
                return None
            old = adapter.state_size(layer)
            seed = self.seed + self.num_steps
            rate = selective_importance(layer, stats, aggregate=self.aggregate, seed=seed)
            scores = rate.reshape(-1, old).sum(0)
            rank = self._selective_rank(layer, adapter, rate, old)
            kept = tuple(select_state_indices(scores, rank).tolist())
            return torch.sort(scores, descending=True).values.double().cpu(), None, kept
        sys = adapter.to_state_space(layer)
        hsv = hankel_singular_values(
            sys, horizon=self._resolved_horizon(), real_output=self.real_output
        )
        return shared_rank_hsv(hsv).detach().cpu(), sys, None

    def _after_checks(self) -> None:
        if self._recorder is not None:
            self._recorder.reset()

    def _agree(self, flag: bool) -> bool:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            value = value.cuda()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def _bound_options(self) -> dict[str, Any]:
        return {"real_output": self.real_output, "horizon": self._resolved_horizon()}

    def _scale_lr(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        factor = self.lr_factor
        if factor == 1.0:
            return
        self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor

    def _unscale_lr(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self._saved_lrs is None:
            return
        for group, lr in zip(optimizer.param_groups, self._saved_lrs, strict=True):
            group["lr"] = lr
        self._saved_lrs = None

    def _selective_rank(
        self, layer: nn.Module, adapter: SelectiveAdapter, rate: torch.Tensor, old: int
    ) -> int:
        if self.mode == "tolerance":
            rank = _rank_for(rate, self.tau)
        else:
            rank = math.floor(old * (1 - self.fraction))
        rank = self._floor(rank, old)
        if adapter.rank_multiple is not None:
            rank = adapter.rank_multiple(layer, rank)
        return rank

    def _reduce_one(self, name: str, layer: nn.Module) -> ReductionEvent:
        start = time.perf_counter()
        adapter = get_adapter(layer)
        if isinstance(adapter, SelectiveAdapter):
            return self._reduce_selective(name, layer, adapter, start)
        old = adapter.state_size(layer)
        horizon = self._resolved_horizon()
        try:
            sys = adapter.to_state_space(layer)
            hsv = shared_rank_hsv(
                hankel_singular_values(sys, horizon=horizon, real_output=self.real_output)
            )
        except (CompressmError, ValueError, RuntimeError) as err:
            return self._refused(name, old, err, time.perf_counter() - start)
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
            return self._refused(name, old, err, time.perf_counter() - start, hsv_list)
        self._rebind(layer, adapter, shapes, report)
        return self._reduced(name, old, report, hsv_list, time.perf_counter() - start)

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
            return self._refused(name, old, err, time.perf_counter() - start)
        shapes = {p: tuple(v.shape) for p, v in layer.named_parameters()}
        seed = self.seed + self.num_steps
        try:
            rate = selective_importance(layer, stats, aggregate=self.aggregate, seed=seed)
            rank = self._selective_rank(layer, adapter, rate, old)
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
            return self._refused(name, old, err, time.perf_counter() - start)
        self._rebind(layer, adapter, shapes, report)
        return self._reduced(name, old, report, hsv_list, time.perf_counter() - start)

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
                if pname not in shapes:  # a buffer (no optimizer state)
                    continue
                resize_optimizer_state(
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
            if pname not in shapes:  # a buffer (no optimizer state)
                continue
            resize_optimizer_state(
                self.optimizer,
                layer.get_parameter(pname),
                shapes[pname],
                axis=axis,
                indices=None,
                policy=self.optimizer_state,
            )
