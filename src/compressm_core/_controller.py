"""Framework-free bookkeeping of the training controllers: options, schedules, decisions.

``compressm_torch.CompreSSM`` and ``compressm_jax.CompreSSM`` differ only in how they read,
reduce, snapshot and restore a model. Everything else lives here, once: the schedule, step
counting, the rank rule and gate inputs, the pragmatic snapshot / rollback flow, the certified
checks and the framework-free part of ``state_dict``; the flow of a reduction event (plan every
layer, then write, then resize the optimizer, as one transaction) and its records are in
``_events``. The options and their checks are :class:`compressm_core.training.ReductionOptions`;
:class:`ControllerBase` is public as ``compressm_core.training.ControllerBase``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import _xp
from ._events import EventFlow
from ._summary import summary_text
from ._typing import Array
from .certified import CertifiedSchedule
from .checks import check_int
from .perturbation import hsv_perturbation_bound
from .rank import select_rank
from .schedule import ReductionEvent, ReductionWarning, reduction_schedule

if TYPE_CHECKING:  # compressm_core.training imports this module
    from .training import ReductionOptions, Schedule

__all__ = ["ControllerBase"]

logger = logging.getLogger("compressm")

#: Fraction of ``total_steps`` between two checks when ``check_every`` is not given.
CHECK_FRACTION = 0.01

Layer = TypeVar("Layer")


class ControllerBase(EventFlow[Layer]):
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
        self.max_bound = options.max_bound
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
            chance_loss=options.chance_loss,
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
            chance_loss=old.chance_loss,
        )
        self._previous: dict[str, Any] = {}
        self._initial_parameters = self._parameter_count()
        self._sizes_seen: dict[str, int] | None = self.state_sizes
        if self.schedule_kind == "certified":
            self.schedule = [old.deadline]

    # -- public ------------------------------------------------------------------------------

    @property
    def state_sizes(self) -> dict[str, int]:
        """Current state size of every managed layer."""
        return {name: self._layer_state_size(layer) for name, layer in self.layers.items()}

    def summary(self) -> str:
        """What the controller did, as text: the state sizes and the model's parameter count
        before and now, and for each layer its cuts (step, old and new rank, and the error bound
        :math:`2 \\sum_{i>r} \\sigma_i` relative to :math:`\\sigma_1`, a lower bound of the
        layer's gain, so an over-estimate of the relative change of its output map)."""
        parameters = None
        if self._initial_parameters is not None:
            now = self._parameter_count()
            parameters = None if now is None else (self._initial_parameters, now)
        return summary_text(
            type(self).__name__,
            self.state_sizes,
            self.history,
            step=self.num_steps,
            total_steps=self.total_steps,
            parameters=parameters,
        )

    def __repr__(self) -> str:
        cuts = sum(e.status == "reduced" for e in self.history)
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, state_sizes={self.state_sizes}, "
            f"step={self.num_steps}/{self.total_steps}, cuts={cuts}, "
            f"schedule={self.schedule_kind!r}, mode={self.mode!r}, tau={self.tau:g})"
        )

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
            ``chance_loss``, or below its initial level): the certified schedule waits for it,
            and a cut made before it raises a :class:`ReductionWarning`. Tensors are summed as
            they are and read on the host once per ``check_every`` steps (no synchronisation at
            every step). Under ``torch.distributed`` the certified schedule uses the mean loss
            of all processes (every process calls :meth:`step` at every step).

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

    # -- internals ---------------------------------------------------------------------------

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
                loss, first = certify.recent_loss, certify.reference_loss
                level = "`chance_loss`" if certify.chance_loss is not None else "its initial level"
                warnings.warn(
                    f"Reduction at step {self.num_steps} ({trigger}) made while the training loss "
                    f"({loss:.4g}) has not fallen by `learning_drop`={certify.learning_drop:g} "
                    f"below {level} ({first:.4g}); the HSVs may still reflect the "
                    "initialisation. Reduce later (a larger `warmup_fraction`) or use "
                    "`schedule='certified'`.",
                    ReductionWarning,
                    stacklevel=4,
                )
        return events

    def _cuts_expected(self) -> bool:
        """A fixed fraction, or a certified cut, reduces every layer of an event (below the
        gate); a tolerance decides by the HSVs, so later events often skip layers."""
        return self.mode != "tolerance" or self.schedule_kind == "certified"

    def _target_rank(self, hsv: Array) -> int:
        """The rank the mode asks for, floored by ``min_rank`` and ``max_cut`` (before the
        gate)."""
        total = int(hsv.shape[-1])
        if self.mode == "tolerance":
            rank = select_rank(hsv, tau=self.tau, energy=self.energy)
        else:
            rank = math.floor(total * (1 - self.fraction))
        if self.max_bound is not None:
            rank = max(rank, _bounded_rank(hsv, self.max_bound))
        return self._floor(rank, total)

    def _parameter_count(self) -> int | None:
        """Number of scalars in the model's trainable parameters (``None``: not known)."""
        return None

    def _floor(self, rank: int, total: int) -> int:
        """``rank`` raised to ``min_rank`` and ``ceil((1 - max_cut) total)``, at most ``total``."""
        if self.max_cut is not None:
            rank = max(rank, math.ceil((1 - self.max_cut) * total - 1e-9))
        return min(total, max(self.min_rank, rank))

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
            "initial_parameters": self._initial_parameters,
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
        self._initial_parameters = state.get("initial_parameters", self._initial_parameters)
        self._sizes_seen = self.state_sizes


def _bounded_rank(hsv: Array, limit: float) -> int:
    """Smallest ``r >= 1`` with ``2 sum_{i > r} sigma_i <= limit sigma_1``."""
    values = np.sort(np.asarray(hsv, dtype=np.float64).reshape(-1))[::-1]
    if values.size == 0 or not values[0] > 0:
        return 1
    # tails[r - 1] = sum_{i > r} sigma_i, r = 1 .. n
    tails = np.concatenate([np.cumsum(values[::-1])[::-1][1:], [0.0]])
    allowed = limit * values[0] * (1 + 1e-12)
    return int(np.argmax(2 * tails <= allowed)) + 1
