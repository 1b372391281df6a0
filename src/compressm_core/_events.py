"""The event flow of the training controllers: the framework parts, transactions, records.

:class:`EventFlow` is the base of :class:`compressm_core.training.ControllerBase`: it declares
what a framework controller implements (read, plan, write, snapshot, restore a layer), runs a
reduction event on a set of layers as one transaction (plan every layer, then write, then resize
the optimizer; undone whole if anything raises) and records its events.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._typing import Array
from .errors import CompressmError
from .schedule import ReductionEvent, ReductionWarning

if TYPE_CHECKING:
    from .certified import CertifiedSchedule

__all__ = ["LAYER_ERRORS", "EventFlow"]

logger = logging.getLogger("compressm")

#: Errors of one layer's reduction that refuse that layer (with a ``ReductionWarning``) instead
#: of aborting the event: the library's own, and the ``ValueError`` / ``RuntimeError`` of the
#: linear algebra underneath (``torch.linalg.LinAlgError``, a device out of memory, ...).
LAYER_ERRORS = (CompressmError, ValueError, RuntimeError)

Layer = TypeVar("Layer")
T = TypeVar("T")


class EventFlow(Generic[Layer]):
    """Framework parts, transactions and event records of a controller (see
    :class:`~compressm_core.training.ControllerBase`)."""

    layers: dict[str, Layer]
    history: list[ReductionEvent]
    certify: CertifiedSchedule
    gate: float
    real_output: bool
    num_steps: int
    stopped: bool
    _last_metric: float | None
    _pending: dict[str, Any] | None
    _last_cut_step: int | None
    _previous: dict[str, Any]
    _journal: list[Callable[[], None]] | None
    _sizes_seen: dict[str, int] | None

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
        self._check_sizes()
        saved = self._save_counters(deep)
        journal: list[Callable[[], None]] = []
        self._journal = journal
        try:
            result = body()
            self._sizes_seen = self._current_sizes()
            return result
        except BaseException:
            self._journal = None
            for undo in reversed(journal):
                undo()
            self._load_counters(saved)
            raise
        finally:
            self._journal = None

    def _current_sizes(self) -> dict[str, int]:
        return {name: self._layer_state_size(layer) for name, layer in self.layers.items()}

    def _check_sizes(self) -> None:
        """Refuse to go on if a layer's state size changed since the controller last acted
        (a state from before a reduction pushed back into the model, say)."""
        seen = self._sizes_seen
        if seen is None:
            return
        now = self._current_sizes()
        changed = {name: (seen[name], now[name]) for name in now if now[name] != seen.get(name)}
        if changed:
            detail = ", ".join(
                f"{n!r} has {new} states (left at {old})" for n, (old, new) in changed.items()
            )
            msg = (
                f"The model's layers changed size outside the controller: {detail}. A state "
                "saved before a reduction was probably loaded back into the model (e.g. with "
                "nnx.update or load_state_dict); restore the model, optimizer and controller "
                "state together (load_state_dict of the controller), or build a new controller."
            )
            raise ValueError(msg)

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

    # -- events ------------------------------------------------------------------------------

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
