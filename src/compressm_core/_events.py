"""The event flow of the training controllers: the framework parts, transactions, records.

:class:`EventFlow` is the base of :class:`compressm_core.training.ControllerBase`: it declares
what a framework controller implements (read, plan, write, snapshot, restore a layer), runs a
reduction event on a set of layers as one transaction (plan every layer, then write, then resize
the optimizer; undone whole if anything raises) and records its events. The LTI layers of an
event that share a shape are measured together, and those that also share a rank truncated
together (:mod:`compressm_core.layer_batches`), where the controller reads their systems
(:meth:`EventFlow._read_system`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np

from ._typing import Array
from .errors import CompressmError
from .schedule import ReductionEvent, ReductionWarning
from .systems import DiagonalStateSpace

if TYPE_CHECKING:
    from .certified import CertifiedSchedule
    from .layer_batches import MeasuredLayers
    from .reduction import ReductionPlan
    from .training import Selection

__all__ = ["BATCH_BYTES", "LAYER_ERRORS", "BatchedLayer", "EventFlow"]

logger = logging.getLogger("compressm")

#: Errors of one layer's reduction that refuse that layer (with a ``ReductionWarning``) instead
#: of aborting the event: the library's own, and the ``ValueError`` / ``RuntimeError`` of the
#: linear algebra underneath (``torch.linalg.LinAlgError``, a device out of memory, ...).
LAYER_ERRORS = (CompressmError, ValueError, RuntimeError)

Layer = TypeVar("Layer")
T = TypeVar("T")

#: What measuring or planning one layer gave: its result or its error, and its seconds.
Outcome = tuple[Any, float]


@dataclass(frozen=True)
class BatchedLayer:
    """The context of a layer measured in a batch (what :meth:`EventFlow._plan_all` needs).

    Attributes
    ----------
    measured : MeasuredLayers
        The batch (shared with the layers of the same shape).
    member : int
        The layer's position in it.
    system : DiagonalStateSpace
        The layer's system as it was read.
    hsv : numpy.ndarray
        Its HSV profile (``measured.profile(member)``), on the host.
    """

    measured: MeasuredLayers
    member: int
    system: DiagonalStateSpace
    hsv: np.ndarray[Any, Any]


#: Largest stacked ``n x n`` array of a batch of layers measured together, in bytes
#: (complex128); a larger batch is split, so an event's memory stays that of a few layers.
BATCH_BYTES = 2**28


def _batches(systems: Mapping[str, DiagonalStateSpace]) -> list[list[str]]:
    """The names of ``systems`` in batches that can be stacked (equal field shapes, dtypes and
    device), in their order, each below ``BATCH_BYTES`` per ``n x n`` array."""
    groups: dict[tuple[Any, ...], list[list[str]]] = {}
    for name, sys in systems.items():
        fields = tuple(None if f is None else (tuple(f.shape), str(f.dtype)) for f in sys)
        key = (*fields, str(getattr(sys.poles, "device", "")))
        n = 2 * int(sys.poles.shape[-1])  # the real realization's size, at most
        size = 16 * n * n * math.prod(int(k) for k in sys.poles.shape[:-1])
        chunks = groups.setdefault(key, [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * size > BATCH_BYTES:
            chunks.append([])
        chunks[-1].append(name)
    return [chunk for chunks in groups.values() for chunk in chunks]


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
    selection: Selection
    method: Literal["sqrt", "bfsr"]

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

    def _target_rank(self, hsv: Array) -> int:
        """The rank the mode asks for (:class:`~compressm_core.training.ControllerBase`)."""
        raise NotImplementedError

    def _cuts_expected(self) -> bool:
        """Whether most layers of an event are expected to be cut (then their measurement keeps
        the singular vectors the truncation needs; otherwise only the HSVs are computed first)."""
        return True

    def _read_system(self, name: str, layer: Layer) -> DiagonalStateSpace | None:
        """The system of an LTI layer, on the device where the event's maths run (float64 /
        complex128), to be measured with the layers of the same shape in one batch; ``None``:
        the layer is measured and planned alone (:meth:`_measure`, :meth:`_plan`)."""
        return None

    def _event_horizon(self) -> int | None:
        """The horizon of the Gramians of this event (``None``: infinite)."""
        return None

    def _unbatched(self, name: str, layer: Layer, batched: BatchedLayer) -> Any:
        """The context :meth:`_measure` would have returned for a layer measured in a batch
        (to plan it alone)."""
        raise NotImplementedError

    def _batched_plan(
        self, name: str, layer: Layer, batched: BatchedLayer, plan: ReductionPlan
    ) -> Any:
        """What :meth:`_plan` returns, from the layer's balanced truncation ``plan``
        (:func:`~compressm_core.layer_batches.plan_layers`)."""
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
        The layers are measured and planned in batches (:meth:`_measure_batches`,
        :meth:`_plan_all`); a layer's ``seconds`` include its share of its batches.
        """
        if self._journal is None:
            return self._transaction(lambda: self._reduce_all(names), deep=True)
        chosen = list(self.layers) if names is None else list(names)
        self._record_undo(self._begin_event(chosen))
        events: dict[str, ReductionEvent] = {}
        planned: dict[str, tuple[int, list[float], Any, float]] = {}
        for measured in self._measure_batches(chosen):  # one batch's arrays alive at a time
            due: dict[str, tuple[int, Any]] = {}
            for name, (outcome, seconds) in measured.items():
                if isinstance(outcome, LAYER_ERRORS):
                    old = self._layer_state_size(self.layers[name])
                    events[name] = self._refused(name, old, outcome, seconds)
                    continue
                hsv, rank, total, context = outcome
                if not rank < self.gate * total:
                    reason = (
                        f"rank {rank} of {total} is not below the gate {self.gate:g} x {total}"
                    )
                    events[name] = self._event(
                        name, "skipped", hsv=hsv, reason=reason, seconds=seconds
                    )
                    continue
                due[name] = (rank, context)
            for name, (plan, seconds) in self._plan_all(due).items():
                old = self._layer_state_size(self.layers[name])
                hsv, measuring = measured[name][0][0], measured[name][1]
                if isinstance(plan, LAYER_ERRORS):
                    events[name] = self._refused(name, old, plan, seconds + measuring, hsv)
                    continue
                planned[name] = (old, hsv, plan, seconds + measuring)
        planned = {name: planned[name] for name in chosen if name in planned}
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

    def _measure_batches(self, names: Sequence[str]) -> Iterator[dict[str, Outcome]]:
        """Measure the layers ``names``, one batch after another: ``{name: (measurement or
        error, seconds)}`` per batch.

        The systems of the layers :meth:`_read_system` reads are grouped by shape (at most
        ``BATCH_BYTES`` per stacked ``n x n`` array) and each group is measured in one batched
        call (:func:`~compressm_core.layer_batches.measure_layers`: Gramian factors, SVD and
        HSVs on the systems' device, one host transfer of the HSVs for the rank decisions); a
        group whose batched call fails with one of ``LAYER_ERRORS`` is measured again one layer
        at a time, so the error is the failing layer's own. The other layers go through
        :meth:`_measure`, in the first batch. Errors not in ``LAYER_ERRORS`` propagate.
        """
        from .layer_batches import measure_layers  # it imports the training module

        alone: dict[str, Outcome] = {}
        systems: dict[str, tuple[DiagonalStateSpace, float]] = {}
        for name in names:
            start = time.perf_counter()
            layer = self.layers[name]
            try:
                sys = self._read_system(name, layer)
            except LAYER_ERRORS as err:
                alone[name] = (err, time.perf_counter() - start)
                continue
            if sys is None:
                alone[name] = self._timed(self._measure, name, layer, start=start)
            else:
                systems[name] = (sys, time.perf_counter() - start)
        if alone:
            yield alone
        horizon = self._event_horizon() if systems else None
        for group in _batches({name: sys for name, (sys, _) in systems.items()}):
            out: dict[str, Outcome] = {}
            start = time.perf_counter()
            try:
                batch = measure_layers(
                    [systems[n][0] for n in group],
                    horizon=horizon,
                    real_output=self.real_output,
                    vectors=self._cuts_expected(),
                )
            except LAYER_ERRORS:
                for name in group:
                    outcome, seconds = self._timed(self._measure, name, self.layers[name])
                    out[name] = (outcome, systems[name][1] + seconds)
                yield out
                continue
            share = (time.perf_counter() - start) / len(group)
            for member, name in enumerate(group):
                begin = time.perf_counter()
                try:
                    hsv = batch.profile(member)
                    result: Any = (
                        [float(h) for h in hsv],
                        self._target_rank(hsv),
                        int(hsv.shape[-1]),
                        BatchedLayer(batch, member, systems[name][0], hsv),
                    )
                except LAYER_ERRORS as err:
                    result = err
                seconds = systems[name][1] + share + time.perf_counter() - begin
                out[name] = (result, seconds)
            yield out

    def _plan_all(self, due: Mapping[str, tuple[int, Any]]) -> dict[str, Outcome]:
        """Plan the layers ``{name: (rank, context)}``: ``{name: (plan or error, seconds)}``.

        Layers measured in one batch that share a rank are truncated in one batched call
        (:func:`~compressm_core.layer_batches.plan_layers`: projection and re-diagonalisation,
        no Gramian computed again) when the selection is ``"largest"``; a
        batch that fails with one of ``LAYER_ERRORS`` is planned again one layer at a time. The
        others go through :meth:`_plan`. Errors not in ``LAYER_ERRORS`` propagate.
        """
        from .layer_batches import plan_layers  # it imports the training module

        out: dict[str, Outcome] = {}
        groups: dict[tuple[int, int], list[str]] = {}
        for name, (rank, context) in due.items():
            if isinstance(context, BatchedLayer) and self.selection == "largest":
                groups.setdefault((id(context.measured), rank), []).append(name)
            else:
                out[name] = self._timed(self._plan_one, name, rank, context)
        for (_, rank), group in groups.items():
            start = time.perf_counter()
            contexts: list[BatchedLayer] = [due[n][1] for n in group]
            try:
                plans = plan_layers(
                    contexts[0].measured,
                    [c.member for c in contexts],
                    rank,
                    method=self.method,
                )
            except LAYER_ERRORS:
                for name in group:
                    out[name] = self._timed(self._plan_one, name, rank, due[name][1])
                continue
            share = (time.perf_counter() - start) / len(group)
            for name, context, plan in zip(group, contexts, plans, strict=True):
                layer = self.layers[name]
                outcome = self._timed(self._batched_plan, name, layer, context, plan)
                out[name] = (outcome[0], outcome[1] + share)
        return out

    def _plan_one(self, name: str, rank: int, context: Any) -> Any:
        layer = self.layers[name]
        if isinstance(context, BatchedLayer):
            context = self._unbatched(name, layer, context)
        return self._plan(name, layer, rank, context)

    @staticmethod
    def _timed(work: Callable[..., Any], *args: Any, start: float | None = None) -> Outcome:
        """``(work(*args), seconds)``, or ``(error, seconds)`` if it raised one of
        ``LAYER_ERRORS``; the seconds count from ``start`` (default: now)."""
        start = time.perf_counter() if start is None else start
        try:
            result = work(*args)
        except LAYER_ERRORS as err:
            result = err
        return result, time.perf_counter() - start

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
