"""Framework-free bookkeeping of the training controllers.

``compressm_torch.CompreSSM`` and ``compressm_jax.CompreSSM`` differ only in how they read,
reduce, snapshot and restore a model. Everything else lives here, once: the schedule, step
counting, the rank rule and gate inputs, the flow of a reduction event (plan every layer, then
write, then resize the optimizer, as one transaction), the pragmatic snapshot / rollback flow,
event records and the framework-free part of ``state_dict``. The options and their checks are
:class:`compressm_core.training.ReductionOptions`; :class:`ControllerBase` is public as
``compressm_core.training.ControllerBase``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from . import _xp
from ._typing import Array
from ._validation import check_int
from .certified import CertifiedSchedule
from .errors import CompressmError
from .perturbation import hsv_perturbation_bound
from .rank import select_rank
from .schedule import ReductionEvent, ReductionWarning, reduction_schedule

if TYPE_CHECKING:  # compressm_core.training imports this module
    from .training import ReductionOptions, Schedule

__all__ = ["ControllerBase"]

logger = logging.getLogger("compressm")

#: Fraction of ``total_steps`` between two checks when ``check_every`` is not given.
CHECK_FRACTION = 0.01

#: Errors of one layer's reduction that refuse that layer (with a ``ReductionWarning``) instead
#: of aborting the event: the library's own, and the ``ValueError`` / ``RuntimeError`` of the
#: linear algebra underneath (``torch.linalg.LinAlgError``, a device out of memory, ...).
LAYER_ERRORS = (CompressmError, ValueError, RuntimeError)

Layer = TypeVar("Layer")
T = TypeVar("T")


class ControllerBase(Generic[Layer]):
    """Shared state and flow of a controller; subclasses supply the framework parts.

    Subclasses call :meth:`_configure` and :meth:`_select_layers` from ``__init__`` and
    implement :meth:`_layer_state_size`, :meth:`_snapshot`, :meth:`_restore` and the steps of
    an event: :meth:`_begin_event`, :meth:`_measure`, :meth:`_plan`, :meth:`_apply` and
    :meth:`_resize_optimizer`.

    :meth:`step`, :meth:`report_metric` and :meth:`reduce` are transactions: if one raises
    (any exception, ``KeyboardInterrupt`` included), the model, the optimizer and the
    controller's counters, schedule trackers, pending decision and history are restored to what
    they were before the call, and the exception propagates. Calling :meth:`step` again redoes
    the step (its event included). A layer whose reduction fails with a library or linear-algebra
    error (``CompressmError``, ``ValueError``, ``RuntimeError``: ``LAYER_ERRORS``) is refused
    instead (:class:`ReductionWarning`), unchanged, and the others go on.
    """

    options: ReductionOptions
    layers: dict[str, Layer]
    history: list[ReductionEvent]
    schedule: list[int]

    # -- configuration -----------------------------------------------------------------------

    def _configure(
        self,
        options: ReductionOptions | None,
        keywords: Mapping[str, Any],
        *,
        total_steps: int,
    ) -> None:
        """Check and store the options (``options`` with ``keywords`` replacing its fields,
        :func:`~compressm_core.training.resolve_options`) and set up the schedule of
        ``total_steps`` optimizer steps."""
        from .training import resolve_options  # the training module imports this one

        options = resolve_options(options, keywords, owner=type(self).__name__)
        self.total_steps = check_int(total_steps, "total_steps", low=1)
        self.options = options
        self.tau, self.fraction, self.gate = options.tau, options.fraction, options.gate
        self.rollback_rtol, self.min_rank = options.rollback_rtol, options.min_rank
        self.rewarmup_steps, self.max_cut = options.rewarmup_steps, options.max_cut
        check_every = options.check_every
        if check_every is None:
            check_every = max(1, round(CHECK_FRACTION * total_steps))
        self.certify = CertifiedSchedule(
            [],
            check_every=check_every,
            deadline=max(1, round(options.warmup_fraction * total_steps)),
            window=options.certify_window,
            num_reductions=options.num_reductions,
            learning_drop=options.learning_drop,
            rank_rtol=options.rank_rtol,
        )
        self.schedule_kind: Schedule = options.schedule
        self._last_cut_step: int | None = None
        if options.reduction_steps is None:
            self.schedule = reduction_schedule(
                total_steps,
                warmup_fraction=options.warmup_fraction,
                num_reductions=options.num_reductions,
            )
        else:
            self.schedule = sorted(set(options.reduction_steps))
        self.mode, self.selection, self.method = options.mode, options.selection, options.method
        self.real_output, self.energy = options.real_output, options.energy
        self.metric, self.seed = options.metric, options.seed
        self.compute_error = options.compute_error
        self.history = []
        self.stopped = False
        self.num_steps = 0
        self._last_metric: float | None = None
        self._pending: dict[str, Any] | None = None
        self._journal: list[Callable[[], None]] | None = None

    def _select_layers(
        self, found: Mapping[str, Layer], layers: Iterable[str] | None, none_found: str
    ) -> None:
        """Keep the layers named by ``layers`` (default all of ``found``)."""
        chosen = dict(found)
        if layers is not None:
            wanted = list(layers)
            missing = sorted(set(wanted) - set(chosen))
            if missing:
                msg = f"`layers` names layers that `model` does not have: {missing}."
                raise KeyError(msg)
            chosen = {name: chosen[name] for name in wanted}
        if not chosen:
            raise ValueError(none_found)
        self.layers = chosen
        old = self.certify
        self.certify = CertifiedSchedule(
            chosen,
            check_every=old.check_every,
            deadline=old.deadline,
            window=old.window,
            num_reductions=old.num_reductions,
            learning_drop=old.learning_drop,
            rank_rtol=old.rank_rtol,
        )
        self._previous: dict[str, Any] = {}
        if self.schedule_kind == "certified":
            self.schedule = [old.deadline]

    # -- framework parts ---------------------------------------------------------------------

    def _layer_state_size(self, layer: Layer) -> int:
        raise NotImplementedError

    def _snapshot(self) -> dict[str, Any]:
        """What :meth:`_restore` needs to undo a reduction event."""
        raise NotImplementedError

    def _restore(self, snapshot: dict[str, Any], *, exact: bool = False) -> None:
        """Bring back a :meth:`_snapshot`: the model and the optimizer's per-parameter state.

        ``exact=False`` (a pragmatic rollback) keeps the learning-rate schedule where training
        has brought it (step counts, scheduler, the learning rates it set); ``exact=True``
        restores everything (undoing a failed call).
        """
        raise NotImplementedError

    def _begin_event(self, names: Sequence[str]) -> Callable[[], None]:
        """Prepare an event on the layers ``names``; return what undoes everything it may
        change (their parameters, optimizer state, random state)."""
        raise NotImplementedError

    def _measure(self, name: str, layer: Layer) -> tuple[list[float], int, int, Any]:
        """``(hsv, rank, total, context)``: the HSVs (or importance scores) of ``layer``,
        descending, the rank the mode asks for, the size the gate compares it with, and what
        :meth:`_plan` needs. Nothing is changed."""
        raise NotImplementedError

    def _plan(self, name: str, layer: Layer, rank: int, context: Any) -> Any:
        """The new, checked values of ``layer`` at ``rank``; nothing is written."""
        raise NotImplementedError

    def _apply(self, name: str, layer: Layer, plan: Any) -> Any:
        """Write ``plan`` into ``layer`` (and run the error check if asked); return the
        adapter's ``LayerReduction``. If it raises, ``layer`` is as it was."""
        raise NotImplementedError

    def _resize_optimizer(self, applied: Mapping[str, tuple[Any, Any]]) -> None:
        """Bring the optimizer's state to the reduced layers: ``{name: (plan, report)}``."""
        raise NotImplementedError

    def _end_event(self, names: Sequence[str]) -> None:
        """Called after an event on ``names`` succeeded (drop its recorded statistics)."""

    def _after_step(self) -> None:
        """Called at the end of every :meth:`step`."""

    def _observe(self, name: str, layer: Layer) -> tuple[Array, Any, Any] | None:
        """A check of the certified schedule: ``(hsv, system, kept)`` of the current
        parameters. ``system`` (a core system, for the Weyl bound between checks) or ``kept``
        (the state indices a selective layer would keep at ``rank``) is ``None``; ``None`` if
        the layer cannot be observed now."""
        raise NotImplementedError

    def _after_checks(self) -> None:
        """Called at the end of a check, after its cuts (drop recorded statistics)."""

    def _agree(self, flag: bool) -> bool:
        """The same decision on every process (logical AND across ranks where distributed)."""
        return flag

    def _sum_over_ranks(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes of a distributed run (a collective: every
        process calls it at the same point); ``values`` themselves in one process."""
        return [float(v) for v in values]

    def _bound_options(self) -> dict[str, Any]:
        """Keyword options of :func:`hsv_perturbation_bound` (horizon, real output)."""
        return {"real_output": self.real_output}

    # -- public ------------------------------------------------------------------------------

    @property
    def state_sizes(self) -> dict[str, int]:
        """Current state size of every managed layer."""
        return {name: self._layer_state_size(layer) for name, layer in self.layers.items()}

    def step(
        self, val_metric: float | None = None, *, loss: float | Any | None = None
    ) -> list[ReductionEvent]:
        """Advance one training step; reduce if this step is scheduled (or certified).

        Parameters
        ----------
        val_metric : float, optional
            A validation metric measured at this step (needed by ``"pragmatic"`` mode: the first
            metric after a reduction decides whether it is kept; the last one before a
            reduction is its baseline). See :meth:`report_metric`.
        loss : float or 0-D tensor, optional
            The training loss of this step. With it the controller knows whether learning has
            started (the loss of the last ``check_every`` steps fell by ``learning_drop`` below
            its initial level): the certified schedule waits for it, and a cut made before it
            raises a :class:`ReductionWarning`. Tensors are summed as they are and read on the
            host once per ``check_every`` steps (no synchronisation at every step). Under
            ``torch.distributed`` the certified schedule uses the mean loss of all processes
            (every process calls :meth:`step` at every step).

        Returns
        -------
        list of ReductionEvent
            The events of this step (empty on most steps).

        Notes
        -----
        A step is a transaction: if it raises (``KeyboardInterrupt`` included), the model, the
        optimizer and the controller are as they were before the call, ``num_steps`` included,
        so calling it again redoes the step and its reduction event.
        """
        upcoming = self.num_steps + 1
        # only interval ends, checks and the deadline change the certified schedule's trackers
        # beyond the loss sum: a full copy of them is needed on those steps only
        deep = upcoming % self.certify.check_every == 0 or upcoming == self.certify.deadline
        return self._transaction(lambda: self._step(val_metric, loss), deep=deep)

    def _step(self, val_metric: float | None, loss: float | Any | None) -> list[ReductionEvent]:
        self.num_steps += 1
        certify = self.certify
        if loss is not None:
            certify.observe_loss(loss)
        events: list[ReductionEvent] = []
        if val_metric is not None:
            events += self.report_metric(val_metric)
        if self.num_steps % certify.check_every == 0:
            # the certified schedule decides by the mean loss of all processes
            certified = self.schedule_kind == "certified"
            certify.close_interval(self._sum_over_ranks if certified else None)
        check = certify.is_check(self.num_steps)
        if self.stopped:
            pass
        elif self.schedule_kind == "certified":
            if check:
                events += self._certified_check()
            if self.num_steps == certify.deadline:
                events += self._deadline()
        elif self.num_steps in self.schedule:
            events += self._annotate(self._scheduled(), "scheduled")
        self._after_step()
        return events

    @property
    def lr_factor(self) -> float:
        """Factor of the learning rate at the next optimizer update: ``min(1, k / K)`` in the
        ``K = rewarmup_steps`` updates after a cut (``k = 1 .. K``), else 1."""
        if not self.rewarmup_steps or self._last_cut_step is None:
            return 1.0
        since = self.num_steps - self._last_cut_step + 1
        return min(1.0, since / (self.rewarmup_steps + 1))

    def report_metric(self, value: float) -> list[ReductionEvent]:
        """Report a validation metric without advancing the step count.

        In ``"pragmatic"`` mode the first metric after a reduction decides it: if it fell by more
        than ``rollback_rtol`` (relative) below the metric reported before the reduction, or is
        NaN (the reduced model diverged; a :class:`ReductionWarning` says so), the model and the
        optimizer's per-parameter state are restored from the snapshot and reductions stop; the
        learning-rate schedule stays where training has brought it. The metric also becomes the
        baseline of the next reduction (a NaN leaves no baseline). Under ``torch.distributed``
        the decision uses the mean of the metrics of all processes, so every process must report
        at the same steps (a collective).

        Returns
        -------
        list of ReductionEvent
            ``"rolled_back"`` events, if this metric triggered a rollback.

        Raises
        ------
        ValueError
            If ``value`` is infinite.
        """
        value = local = float(value)
        if math.isinf(local):
            msg = f"`value` must be a finite number (or NaN); received {local!r}."
            raise ValueError(msg)
        if self.mode == "pragmatic":  # every process judges by the mean of all processes
            total, count = self._sum_over_ranks([local, 1.0])
            value = total / count
        return self._transaction(lambda: self._judge(value), deep=False)

    def _judge(self, value: float) -> list[ReductionEvent]:
        events: list[ReductionEvent] = []
        pending = self._pending
        diverged = math.isnan(value)
        if pending is not None:
            base = pending["metric"]
            slack = self.rollback_rtol * abs(base)
            worse = value < base - slack if self.metric == "max" else value > base + slack
            self._pending = None
            if worse or diverged:
                reason = f"validation metric {value:.6g} vs {base:.6g} before the reduction"
                before = self.state_sizes
                exact = self._snapshot()
                self._record_undo(lambda: self._restore(exact, exact=True))
                self._restore(pending)
                self.stopped = True
                events = [
                    self._event(name, "rolled_back", before[name], size, reason=reason)
                    for name, size in self.state_sizes.items()
                ]
                self.history += events
                logger.info("compressm: rolled back (%s); reductions stopped", reason)
                if diverged:
                    warnings.warn(
                        f"The validation metric reported at step {self.num_steps}, the first "
                        "after a reduction, is NaN; the reduction was rolled back and "
                        "reductions stopped.",
                        ReductionWarning,
                        stacklevel=4,
                    )
        self._last_metric = None if diverged else value
        return events

    def reduce(self) -> list[ReductionEvent]:
        """Run one reduction event now, on every managed layer (outside the schedule).

        A transaction like :meth:`step`: if it raises, nothing has changed.
        """
        return self._transaction(self._reduce_all, deep=True)

    # -- transactions ------------------------------------------------------------------------

    def _transaction(self, body: Callable[[], T], *, deep: bool) -> T:
        """Run ``body``; if it raises, undo what it did and re-raise.

        The controller's counters are saved first (with a full copy of the certified schedule's
        trackers if ``deep``; otherwise only its loss sum may change); changes of the model and
        optimizer are undone by the callables of :meth:`_record_undo`, last first. Nested calls
        (``report_metric`` inside ``step``) belong to the outer transaction.
        """
        if self._journal is not None:
            return body()
        saved = self._save_counters(deep)
        journal: list[Callable[[], None]] = []
        self._journal = journal
        try:
            return body()
        except BaseException:
            self._journal = None
            for undo in reversed(journal):
                undo()
            self._load_counters(saved)
            raise
        finally:
            self._journal = None

    def _record_undo(self, undo: Callable[[], None]) -> None:
        """Register ``undo`` (before the change it undoes) with the open transaction."""
        assert self._journal is not None, "a change of the model outside a transaction"
        self._journal.append(undo)

    def _save_counters(self, deep: bool) -> dict[str, Any]:
        certify = self.certify
        if deep:  # the running loss sum (maybe a device tensor with a graph) is shared
            memo: dict[int, Any] = {id(certify._sum): certify._sum}
            saved_certify = copy.deepcopy(certify, memo)
        else:
            saved_certify = copy.copy(certify)
        return {
            "num_steps": self.num_steps,
            "stopped": self.stopped,
            "last_metric": self._last_metric,
            "pending": self._pending,
            "last_cut_step": self._last_cut_step,
            "previous": dict(self._previous),
            "history": len(self.history),
            "certify": saved_certify,
        }

    def _load_counters(self, saved: Mapping[str, Any]) -> None:
        self.num_steps = saved["num_steps"]
        self.stopped = saved["stopped"]
        self._last_metric = saved["last_metric"]
        self._pending = saved["pending"]
        self._last_cut_step = saved["last_cut_step"]
        self._previous = dict(saved["previous"])
        del self.history[saved["history"] :]
        self.certify = saved["certify"]

    # -- internals ---------------------------------------------------------------------------

    def _reduce_all(self, names: Iterable[str] | None = None) -> list[ReductionEvent]:
        """One reduction event on the layers ``names`` (default all); events go to the history.

        Every layer is planned first (HSVs, rank, gate, new values: nothing is written), then
        the planned layers are written (each with its error check, undone on failure), then the
        optimizer follows. A layer that fails with one of ``LAYER_ERRORS`` is refused and
        left as it was; any other exception propagates and the transaction undoes the event.
        """
        if self._journal is None:
            return self._transaction(lambda: self._reduce_all(names), deep=True)
        chosen = list(self.layers) if names is None else list(names)
        self._record_undo(self._begin_event(chosen))
        events: dict[str, ReductionEvent] = {}
        planned: dict[str, tuple[int, list[float], Any, float]] = {}
        for name in chosen:
            start = time.perf_counter()
            layer = self.layers[name]
            old = self._layer_state_size(layer)
            hsv: list[float] = []
            try:
                hsv, rank, total, context = self._measure(name, layer)
                if not rank < self.gate * total:
                    reason = (
                        f"rank {rank} of {total} is not below the gate {self.gate:g} x {total}"
                    )
                    seconds = time.perf_counter() - start
                    events[name] = self._event(
                        name, "skipped", hsv=hsv, reason=reason, seconds=seconds
                    )
                    continue
                plan = self._plan(name, layer, rank, context)
            except LAYER_ERRORS as err:
                events[name] = self._refused(name, old, err, time.perf_counter() - start, hsv)
                continue
            planned[name] = (old, hsv, plan, time.perf_counter() - start)
        applied: dict[str, tuple[Any, Any]] = {}
        for name, (old, hsv, plan, seconds) in planned.items():
            start = time.perf_counter()
            try:
                report = self._apply(name, self.layers[name], plan)
            except LAYER_ERRORS as err:
                seconds += time.perf_counter() - start
                events[name] = self._refused(name, old, err, seconds, hsv)
                continue
            applied[name] = (plan, report)
            seconds += time.perf_counter() - start
            events[name] = self._reduced(name, old, report, hsv, seconds)
        if applied:
            self._resize_optimizer(applied)
        self._end_event(chosen)
        ordered = [events[name] for name in chosen]
        self.history += ordered
        return ordered

    def _scheduled(self) -> list[ReductionEvent]:
        if self.mode != "pragmatic":
            return self._reduce_all()
        if self._pending is not None:
            reason = "pragmatic mode: the previous reduction has not been validated yet"
        elif self._last_metric is None:
            reason = "pragmatic mode needs a val_metric reported before the reduction"
        else:
            self._pending = {"metric": self._last_metric, **self._snapshot()}
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

    def _certified_check(self) -> list[ReductionEvent]:
        """One check: observe every layer with cuts left; cut those certified."""
        certify = self.certify
        if not self._agree(certify.learning_started is not False):
            return []
        due: list[str] = []
        margins: dict[str, float | None] = {}
        triggers: dict[str, str] = {}
        try:
            for name, layer in self.layers.items():
                if certify.remaining(name) <= 0:
                    continue
                seen = self._observe(name, layer)
                if seen is None:
                    continue
                hsv, system, kept = seen
                values = np.asarray(hsv, dtype=np.float64)
                rank = self._target_rank(values)
                bound = None
                previous = self._previous.get(name)
                if system is not None:
                    self._previous[name] = (system, values)
                    if previous is not None:
                        bound = self._weyl_bound(previous, system, values, rank)
                trigger, margin = certify.update(name, values, rank=rank, bound=bound, kept=kept)
                margins[name] = margin
                if self._agree(trigger is not None and rank < self.gate * values.size):
                    due.append(name)
                    triggers[name] = trigger or "stable"
            events: list[ReductionEvent] = []
            for trigger in sorted(set(triggers.values())):
                names = [name for name in due if triggers[name] == trigger]
                events += self._cut(names, trigger, margins)
            return events
        finally:
            self._after_checks()

    def _weyl_bound(
        self, previous: tuple[Any, np.ndarray[Any, Any]], system: Any, values: Any, rank: int
    ) -> float:
        """Weyl bound on the HSV movement since the previous check, or a conservative value.

        The bound is at least ``max_i |sigma_i - sigma_i^prev|`` (Weyl's theorem itself), so
        when twice that already exceeds the gap at ``rank`` the certificate cannot hold and the
        ``O(n^3)`` bound is not computed: a value larger than every gap is passed instead, which
        re-anchors every cut (conservative, never a false certificate).
        """
        before, old = previous
        ordered = np.sort(values)[::-1]
        moved = float(np.max(np.abs(ordered - np.sort(old)[::-1])))
        gap = float(ordered[rank - 1] - ordered[rank]) if 1 <= rank < ordered.size else 0.0
        if 2 * moved >= gap:
            return float(ordered[0] + np.max(old)) + moved
        # a batch of systems cut to one shared rank (``shared_rank_hsv``): its profile moves by
        # at most the largest member's bound
        moved_bound = hsv_perturbation_bound(before, system, **self._bound_options())
        return float(np.max(_xp.to_host(moved_bound, allow_transfer=True)))

    def _deadline(self) -> list[ReductionEvent]:
        """Force every remaining cut (one event per round while a layer still reduces)."""
        events: list[ReductionEvent] = []
        while True:
            due = [name for name in self.layers if self.certify.remaining(name) > 0]
            if not due:
                return events
            batch = self._cut(due, "deadline", {})
            events += batch
            for event in batch:
                if event.status != "reduced":
                    self.certify.exhaust(event.layer)

    def _cut(
        self, names: list[str], trigger: str, margins: Mapping[str, float | None]
    ) -> list[ReductionEvent]:
        events = self._annotate(self._reduce_all(names), trigger, margins)
        for event in events:
            if event.status == "reduced":
                self.certify.cut(event.layer)
                self._previous.pop(event.layer, None)
        return events

    def _annotate(
        self,
        events: list[ReductionEvent],
        trigger: str,
        margins: Mapping[str, float | None] | None = None,
    ) -> list[ReductionEvent]:
        """Record trigger, margin and loss on the events; warn about cuts before learning."""
        certify = self.certify
        started = certify.learning_started
        reduced = False
        for event in events:
            event.trigger = trigger
            event.loss = certify.recent_loss
            if margins:
                event.margin = margins.get(event.layer)
            reduced = reduced or event.status == "reduced"
        if reduced:
            self._last_cut_step = self.num_steps
            if started is False:
                loss, first = certify.recent_loss, certify.initial_loss
                warnings.warn(
                    f"Reduction at step {self.num_steps} ({trigger}) made while the training loss "
                    f"({loss:.4g}) has not fallen by `learning_drop`={certify.learning_drop:g} "
                    f"below its initial level ({first:.4g}); the HSVs may still reflect the "
                    "initialisation. Reduce later (a larger `warmup_fraction`) or use "
                    "`schedule='certified'`.",
                    ReductionWarning,
                    stacklevel=4,
                )
        return events

    def _target_rank(self, hsv: Array) -> int:
        """The rank the mode asks for, floored by ``min_rank`` and ``max_cut`` (before the
        gate)."""
        total = int(hsv.shape[-1])
        if self.mode == "tolerance":
            rank = select_rank(hsv, tau=self.tau, energy=self.energy)
        else:
            rank = math.floor(total * (1 - self.fraction))
        return self._floor(rank, total)

    def _floor(self, rank: int, total: int) -> int:
        """``rank`` raised to ``min_rank`` and ``ceil((1 - max_cut) total)``, at most ``total``."""
        if self.max_cut is not None:
            rank = max(rank, math.ceil((1 - self.max_cut) * total - 1e-9))
        return min(total, max(self.min_rank, rank))

    def _event(
        self, name: str, status: str, old: int | None = None, new: int | None = None, **kw: Any
    ) -> ReductionEvent:
        size = self._layer_state_size(self.layers[name])
        return ReductionEvent(
            step=self.num_steps,
            layer=name,
            status=status,
            old_rank=size if old is None else old,
            new_rank=size if new is None else new,
            **kw,
        )

    def _reduced(
        self, name: str, old: int, report: Any, hsv: list[float], seconds: float
    ) -> ReductionEvent:
        """Record a reduction (``report``: the adapter's ``LayerReduction``)."""
        logger.info(
            "compressm: step %d, %s: %d -> %d states", self.num_steps, name, old, report.new_rank
        )
        return ReductionEvent(
            step=self.num_steps,
            layer=name,
            status="reduced",
            old_rank=old,
            new_rank=report.new_rank,
            hsv=hsv,
            error_bound=report.error_bound,
            hinf_error=report.hinf_error,
            seconds=seconds,
        )

    def _refused(
        self, name: str, old: int, err: Exception, seconds: float, hsv: Sequence[float] = ()
    ) -> ReductionEvent:
        """Warn about a reduction that raised and record it; the layer is unchanged."""
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
            hsv=list(hsv),
            seconds=seconds,
            reason=reason,
        )

    def _base_state(self) -> dict[str, Any]:
        """The framework-free part of ``state_dict`` (JSON-safe)."""
        return {
            "num_steps": self.num_steps,
            "schedule": list(self.schedule),
            "stopped": self.stopped,
            "last_metric": self._last_metric,
            "history": [asdict(e) for e in self.history],
            "state_sizes": self.state_sizes,
            "certify": self.certify.state_dict(),
            "last_cut_step": self._last_cut_step,
        }

    def _load_base_state(self, state: Mapping[str, Any], how: str) -> None:
        """Restore :meth:`_base_state`; ``how`` says how to give the model its sizes first."""
        sizes = self.state_sizes
        if dict(state.get("state_sizes", sizes)) != sizes:
            msg = (
                f"The model's state sizes {sizes} differ from the recorded "
                f"{state['state_sizes']}; restore the model first ({how})."
            )
            raise ValueError(msg)
        self.num_steps = int(state["num_steps"])
        self.schedule = [int(s) for s in state["schedule"]]
        self.stopped = bool(state["stopped"])
        self._last_metric = state["last_metric"]
        self.history = [ReductionEvent(**e) for e in state["history"]]
        if "certify" in state:
            self.certify.load_state_dict(state["certify"])
            self._last_cut_step = state["last_cut_step"]
        self._previous = {}
