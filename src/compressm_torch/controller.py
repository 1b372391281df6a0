"""The training controller: reduce every supported layer of a model at scheduled steps."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import nn

from compressm_core import DiagonalStateSpace, hankel_singular_values, select_state_indices
from compressm_core.rank import shared_rank_hsv
from compressm_core.reduction import ReduceArguments, ReductionPlan
from compressm_core.schedule import (
    ReductionEvent,
    ReductionWarning,
    reduction_schedule,
)
from compressm_core.training import (
    BatchedLayer,
    ControllerBase,
    ReductionKeywords,
    ReductionOptions,
    signature_with,
)

from . import _fsdp
from ._distributed import all_reduce_numbers
from ._journal import journal_layers, restore_training, snapshot_training
from ._options import check_torch_options
from ._shadows import match_shadows, snapshot_shadows, sync_shadows
from .adapters import LayerAdapter, SelectiveAdapter, get_adapter
from .adapters import find_layers as _find_layers
from .optim import OptimizerStatePolicy, resize_optimizer_state
from .reduction import LayerReduction, _plan_values
from .reduction import _apply as _apply_lti
from .reduction import _plan as _plan_lti
from .selective import (
    Aggregate,
    Importance,
    SelectiveRecorder,
    _apply_selective,
    _plan_selective,
    _rank_for,
    _SelectivePlan,
    selective_importance,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CompreSSM", "ReductionEvent", "ReductionWarning", "reduction_schedule"]


class _LayerPlan(NamedTuple):
    """A layer's planned reduction: its adapter, parameter shapes before, and new values."""

    adapter: LayerAdapter | SelectiveAdapter
    shapes: dict[str, tuple[int, ...]]
    values: Any  # layer_writes.LayerPlan or selective._SelectivePlan
    system: DiagonalStateSpace | None  # the system of an LTI layer


def _shapes(layer: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of ``layer``'s parameters before an event, by name."""
    return {p: tuple(v.shape) for p, v in layer.named_parameters()}


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
        The model (plain, ``torch.compile``d, or sharded by FSDP2's ``fully_shard``).
    optimizer : torch.optim.Optimizer or None
        The optimizer training ``model``; ``None`` skips the optimizer surgery.
    total_steps : int
        Length of training in optimizer steps (sets the default schedule).
    options : ReductionOptions, optional
        The framework-free options (:class:`~compressm_core.training.ReductionOptions`: rank
        rule, schedule, gate, pragmatic mode, certified schedule, re-warm-up) as one record.
    optimizer_state : {"reset", "zero"}, optional
        Policy for the moments of reduced tensors after a change of basis (see
        :func:`resize_optimizer_state`).
    lr_scheduler : optional
        The scheduler driving ``optimizer``. A pragmatic rollback leaves it, and the learning
        rates it set, where training has brought them; a call of :meth:`step` that raises
        restores it with the model and optimizer.
    horizon : None, int or "auto", optional
        Gramians over an infinite horizon (``None``, the paper), over ``horizon`` steps, or over
        the longest sequence the layers have seen in forward passes (``"auto"``; under
        ``torch.distributed`` the longest of all ranks).
    layers : iterable of str, optional
        Names of the layers to manage (default: all supported layers).
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
        keeps the same states; the ranks calibrate (all of them) only when a layer has
        statistics on no rank.
    calibration_sequences : int, optional
        Selective layers: record at most this many sequences of each calibration batch
        (:class:`SelectiveRecorder`'s ``max_sequences``; default all). The recording cost is
        proportional to it; the scores are then estimated from fewer samples.
    extra_models : iterable of torch.nn.Module, optional
        Shadow copies of ``model`` kept in step with every reduction, e.g. an EMA
        (``torch.optim.swa_utils.AveragedModel``): each managed layer must have exactly one
        counterpart of the same type and size, named alike (``"module."`` prefixes allowed).
        After an index selection a shadow's own values are sliced at the kept positions; after
        a change of basis its state tensors take the reduced layer's values (an average over two
        bases would mean nothing, so it restarts there). Undone with the event if it fails,
        and restored by a pragmatic rollback.
    **keywords
        The options of :class:`~compressm_core.training.ReductionOptions` by name (``tau``,
        ``mode``, ``warmup_fraction``, ``num_reductions``, ``reduction_steps``, ``fraction``,
        ``selection``, ``gate``, ``min_rank``, ``method``, ``real_output``, ``energy``,
        ``rollback_rtol``, ``metric``, ``compute_error``, ``seed``, ``schedule``,
        ``check_every``, ``certify_window``, ``learning_drop``, ``rank_rtol``,
        ``rewarmup_steps``, ``max_cut``), with the defaults and meanings documented there; they
        take precedence over ``options``. The re-warm-up (``rewarmup_steps``) is applied around
        ``optimizer.step()`` by step hooks and undone after it, so any LR scheduler (chainable
        ones included) sees its own values.

    Attributes
    ----------
    options : ReductionOptions
        The options in force.

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

    @signature_with()
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        total_steps: int,
        options: ReductionOptions | None = None,
        optimizer_state: OptimizerStatePolicy = "reset",
        lr_scheduler: Any = None,
        horizon: int | Literal["auto"] | None = None,
        layers: Iterable[str] | None = None,
        importance: Importance = "gramian",
        aggregate: Aggregate = "sum",
        calibration_steps: int = 8,
        calibration_batches: Iterable[Any] | None = None,
        calibration_sequences: int | None = None,
        extra_models: Iterable[nn.Module] = (),
        **keywords: Unpack[ReductionKeywords],
    ) -> None:
        if not isinstance(model, nn.Module):
            msg = f"`model` must be a torch.nn.Module; received {type(model).__name__}."
            raise TypeError(msg)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            kind = type(optimizer).__name__
            msg = f"`optimizer` must be a torch.optim.Optimizer or None; received {kind}."
            raise TypeError(msg)
        self._configure(options, keywords, total_steps=total_steps)
        check_torch_options(
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
        self.extra_models = list(extra_models)
        self._gathered: list[_fsdp.GatheredParameter] = []
        self._gather([], optimizer=False)  # refuses what FSDP2 models do not support
        self._shadows = match_shadows(self.extra_models, found)
        self.seen_length: int | None = None
        self._horizon_step: int | None = None
        self._generator = torch.Generator().manual_seed(self.options.seed)
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

    def reduce(self) -> list[ReductionEvent]:
        """Run one reduction event now, on every managed layer (outside the schedule).

        Under ``torch.distributed`` every rank must call it (the ranks agree on the horizon and
        pool the selective statistics afresh).
        """
        self._stats_step = self._horizon_step = None
        return super().reduce()

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
        self._stats_step = self._horizon_step = None
        self._pending = state["pending"]
        self._generator.set_state(state["generator"])

    # -- internals -------------------------------------------------------------------------

    def _record_length(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and torch.is_tensor(args[0]) and args[0].ndim >= 2:
            length = int(args[0].shape[-2])
            if self.seen_length is None or length > self.seen_length:
                self.seen_length = length

    def _parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

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
        """The horizon of the Gramians; ``"auto"``: the longest sequence seen by any rank,
        agreed once per step (one collective under ``torch.distributed``)."""
        if self.horizon != "auto":
            return self.horizon
        if self._horizon_step != self.num_steps:
            self._horizon_step = self.num_steps
            (longest,) = all_reduce_numbers([self.seen_length or 0], "max", dtype=torch.int64)
            self.seen_length = int(longest) or None
            if self.seen_length is None:
                warnings.warn(
                    "horizon='auto' has seen no forward pass yet; using infinite-horizon "
                    "Gramians for this event.",
                    ReductionWarning,
                    stacklevel=3,
                )
        return self.seen_length

    def _snapshot(self) -> dict[str, Any]:
        return snapshot_training(self.model, self.optimizer, self.lr_scheduler, self.extra_models)

    def _restore(self, snap: dict[str, Any], *, exact: bool = False) -> None:
        restore_training(
            snap, self.model, self.optimizer, self.lr_scheduler, self.extra_models, exact=exact
        )

    def _gather(self, names: Sequence[str], *, optimizer: bool) -> list[_fsdp.GatheredParameter]:
        """Under FSDP2: the full parameters of the layers ``names`` in place of their shards
        (and, with ``optimizer``, their full optimizer state); a collective."""
        pragmatic = self.mode == "pragmatic"
        if not _fsdp.check_supported(self.model, pragmatic=pragmatic, shadows=self.extra_models):
            return []
        layers = [self.layers[name] for name in names]
        return _fsdp.gather(self.model, layers, self.optimizer if optimizer else None)

    def _begin_event(self, names: Sequence[str]) -> Callable[[], None]:
        gathered = self._gathered = self._gather(names, optimizer=True)
        layers = [self.layers[name] for name in names]
        undo_layers = journal_layers(layers, self.optimizer, self._layer_state_size)
        generator = self._generator.get_state()
        undo_shadows = snapshot_shadows(self._shadows, names)

        @torch.no_grad()
        def undo() -> None:
            undo_shadows()
            undo_layers()
            self._generator.set_state(generator)
            _fsdp.release(gathered, self.optimizer)
            self._gathered = []

        self._gather_statistics()
        return undo

    def _gather_statistics(self) -> None:
        """Calibrate if needed and sum the selective statistics over ranks, once per step."""
        recorder = self._recorder
        if recorder is None or self._stats_step == self.num_steps:
            return
        self._stats_step = self.num_steps
        # whether a layer has statistics on no rank: all ranks calibrate, or none
        missing = len(recorder._recorded_shapes()) < len(recorder.layers)
        if missing and self.calibration_batches is not None:
            self._calibrate()
        recorder.all_reduce()  # the same collectives on every rank, whatever it recorded

    def _observe(self, name: str, layer: nn.Module) -> tuple[Any, Any, Any] | None:
        gathered = self._gather([name], optimizer=False)
        try:
            return self._observe_full(name, layer)
        finally:
            _fsdp.release(gathered, None)

    @torch.no_grad()
    def _observe_full(self, name: str, layer: nn.Module) -> tuple[Any, Any, Any] | None:
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
        (agreed,) = all_reduce_numbers([int(flag)], "min", dtype=torch.int64)
        return bool(agreed)

    def _sum_over_ranks(self, values: Sequence[float]) -> list[float]:
        return all_reduce_numbers(values, "sum")

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

    def _measure(self, name: str, layer: nn.Module) -> tuple[list[float], int, int, Any]:
        adapter = get_adapter(layer)
        if isinstance(adapter, SelectiveAdapter):
            assert self._recorder is not None
            stats = self._recorder.statistics.get(name)
            if stats is None:
                msg = (
                    "no statistics were recorded (no training forward pass in the "
                    f"{self.calibration_steps} calibration steps, and no calibration_batches)"
                )
                raise ValueError(msg)
            old = adapter.state_size(layer)
            seed = self.seed + self.num_steps
            rate = selective_importance(layer, stats, aggregate=self.aggregate, seed=seed)
            rank = self._selective_rank(layer, adapter, rate, old)
            scores = torch.sort(rate.reshape(-1, old).sum(0), descending=True).values.tolist()
            return scores, rank, old, stats
        horizon = self._resolved_horizon()
        sys = adapter.to_state_space(layer)
        hsv = shared_rank_hsv(
            hankel_singular_values(sys, horizon=horizon, real_output=self.real_output)
        )
        rank = self._target_rank(hsv)
        return hsv.detach().cpu().tolist(), rank, int(hsv.shape[-1]), (sys, hsv, horizon)

    def _read_system(self, name: str, layer: nn.Module) -> DiagonalStateSpace | None:
        """The system of an LTI layer (float64 / complex128 on the parameters' device, where the
        event's batched maths then run); ``None`` for a selective layer."""
        adapter = get_adapter(layer)
        return adapter.to_state_space(layer) if isinstance(adapter, LayerAdapter) else None

    def _event_horizon(self) -> int | None:
        return self._resolved_horizon()

    def _unbatched(self, name: str, layer: nn.Module, batched: BatchedLayer) -> Any:
        return batched.system, torch.as_tensor(batched.hsv), batched.measured.horizon

    def _batched_plan(
        self, name: str, layer: nn.Module, batched: BatchedLayer, plan: ReductionPlan
    ) -> _LayerPlan:
        adapter = get_adapter(layer)
        assert isinstance(adapter, LayerAdapter)
        values = _plan_values(layer, adapter, plan, torch.as_tensor(batched.hsv))
        return _LayerPlan(adapter, _shapes(layer), values, batched.system)

    def _plan(self, name: str, layer: nn.Module, rank: int, context: Any) -> _LayerPlan:
        adapter = get_adapter(layer)
        if isinstance(adapter, SelectiveAdapter):
            plan = _plan_selective(
                layer,
                context,
                rank,
                tau=None,
                importance=self.importance,
                aggregate=self.aggregate,
                seed=self.seed + self.num_steps,
            )
            return _LayerPlan(adapter, _shapes(layer), plan, None)
        sys, hsv, horizon = context
        arguments = ReduceArguments(
            method=self.method,
            selection=self.selection,
            real_output=self.real_output,
            horizon=horizon,
        )
        values = _plan_lti(layer, adapter, sys, hsv, rank, arguments, self._generator)
        return _LayerPlan(adapter, _shapes(layer), values, sys)

    def _apply(self, name: str, layer: nn.Module, plan: _LayerPlan) -> LayerReduction:
        if isinstance(plan.values, _SelectivePlan):
            return _apply_selective(layer, plan.values)
        assert isinstance(plan.adapter, LayerAdapter)
        assert plan.system is not None
        report, _ = _apply_lti(
            (layer, plan.adapter, plan.system, plan.values),
            selection=self.selection,
            compute_error=self.compute_error,
        )
        return report

    def _resize_optimizer(self, applied: Mapping[str, tuple[Any, Any]]) -> None:
        for name, (plan, report) in applied.items():
            self._rebind(self.layers[name], plan.adapter, plan.shapes, report)
        reports = {name: report for name, (_, report) in applied.items()}
        sync_shadows(self._shadows, self.layers, reports)

    def _end_event(self, names: Sequence[str]) -> None:
        if self._recorder is not None:
            self._recorder.reset([n for n in names if n in self._recorder.layers])
        if self._gathered:  # FSDP2: shard the new full parameters and optimizer state
            gathered, self._gathered = self._gathered, []
            self._record_undo(_fsdp.reshard(gathered, self.optimizer))

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
        changes: Mapping[str, tuple[int, torch.Tensor | None]] = report.slices
        if not changes:  # a change of basis: the moments of every state tensor are reset
            assert isinstance(adapter, LayerAdapter)
            changes = {pname: (axis, None) for pname, axis in adapter.state_axes.items()}
        for pname, (axis, pos) in changes.items():
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
