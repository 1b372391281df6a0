"""The training controller for Flax NNX models: reduce every supported layer at scheduled steps."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from compressm_core import CompressmError, hankel_singular_values, select_rank
from compressm_core.schedule import (
    ReductionEvent,
    _check_fraction,
    _check_int,
    reduction_schedule,
)

from .adapters import find_layers, get_adapter
from .optim import ParamChange, _path_key, resize_optimizer_state
from .reduction import _SELECTIONS, LayerReduction, Selection, reduce_layer

__all__ = ["CompreSSM", "ReductionWarning", "resize_layers"]

logger = logging.getLogger("compressm")

Mode = Literal["tolerance", "fixed", "pragmatic"]
_MODES = ("tolerance", "fixed", "pragmatic")


class ReductionWarning(UserWarning):
    """A scheduled reduction was refused or skipped; the model was left as it was."""


def resize_layers(model: nnx.Module, sizes: Mapping[str, int]) -> None:
    """Give the named layers of ``model`` the given state sizes (zeros; Params kept).

    Used before restoring a checkpoint of a reduced model into a freshly built one.

    Raises
    ------
    KeyError
        If ``sizes`` names a layer that ``model`` does not have.
    ValueError
        If a size is not a positive int.
    """
    layers = find_layers(model)
    unknown = sorted(set(sizes) - set(layers))
    if unknown:
        msg = f"`sizes` names layers that `model` does not have: {unknown}."
        raise KeyError(msg)
    for name, size in sizes.items():
        _check_int(f"sizes[{name!r}]", size, 1)
        layer = layers[name]
        adapter = get_adapter(layer)
        if adapter.state_size(layer) == size:
            continue
        for pname, axis in adapter.state_axes.items():
            param = getattr(layer, pname)
            shape = list(param.shape)
            shape[axis] = size
            param.set_value(jnp.zeros(shape, dtype=param[...].dtype))
        if adapter.on_resize is not None:
            adapter.on_resize(layer)


class CompreSSM:
    """Reduce the state of a Flax NNX model's SSM layers during training (CompreSSM).

    The same options, schedule and semantics as :class:`compressm_torch.CompreSSM`: call
    :meth:`step` once after every optimizer update; at each scheduled step every supported layer
    (:func:`find_layers`) is reduced by balanced truncation to the smallest rank that keeps a
    fraction ``1 - tau`` of its Hankel singular-value energy (``"tolerance"``) or by a fixed
    ``fraction`` (``"fixed"``, ``"pragmatic"``), if the new rank is below ``gate`` times the
    current one. The :class:`flax.nnx.Optimizer` is updated in place with
    :func:`resize_optimizer_state`: moments of reduced tensors are reset after the change of
    basis (sliced after a random index selection), every other leaf and the step count are
    kept. Shapes change, so a ``jax.jit``-compiled training step retraces once after an event.

    Parameters
    ----------
    model : flax.nnx.Module
        The model.
    optimizer : flax.nnx.Optimizer or None
        Its optimizer (``None`` skips the optimizer surgery).
    total_steps : int
        Length of training in optimizer steps.
    tau, mode, warmup_fraction, num_reductions, reduction_steps, fraction : optional
        As for :class:`compressm_torch.CompreSSM`.
    selection, horizon, gate, min_rank, method, real_output, energy : optional
        As for :class:`compressm_torch.CompreSSM` (``horizon`` is ``None`` or an int).
    rollback_rtol, metric, compute_error, layers, seed : optional
        As for :class:`compressm_torch.CompreSSM`.

    Examples
    --------
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from compressm_jax import LRU, CompreSSM
    >>> layer = LRU(d_model=4, d_state=32, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
    >>> ctl = CompreSSM(layer, opt, total_steps=100, mode="fixed", fraction=0.5,
    ...                 reduction_steps=[1])
    >>> events = ctl.step()
    >>> layer.d_state
    16
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer[Any] | None,
        *,
        total_steps: int,
        tau: float = 0.1,
        mode: Mode = "tolerance",
        warmup_fraction: float = 0.1,
        num_reductions: int = 4,
        reduction_steps: Sequence[int] | None = None,
        fraction: float = 0.1,
        selection: Selection = "largest",
        horizon: int | None = None,
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
    ) -> None:
        if not isinstance(model, nnx.Module):
            msg = f"`model` must be a flax.nnx.Module; received {type(model).__name__}."
            raise TypeError(msg)
        if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
            kind = type(optimizer).__name__
            msg = f"`optimizer` must be a flax.nnx.Optimizer or None; received {kind}."
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
            ("method", method, ("sqrt", "bfsr")),
            ("energy", energy, ("sum", "squared")),
            ("metric", metric, ("max", "min")),
        ):
            if value not in allowed:
                msg = f"`{name}` must be one of {allowed}; received {value!r}."
                raise ValueError(msg)
        if selection == "random" and real_output:
            msg = "`selection='random'` keeps modal states; it excludes `real_output=True`."
            raise ValueError(msg)
        if horizon is not None:
            _check_int("horizon", horizon, 1)
        if reduction_steps is None:
            schedule = reduction_schedule(
                total_steps, warmup_fraction=warmup_fraction, num_reductions=num_reductions
            )
        else:
            schedule = sorted({_check_int("reduction_steps[i]", s, 1) for s in reduction_steps})
        self.model, self.optimizer = model, optimizer
        self.mode, self.selection, self.horizon = mode, selection, horizon
        self.method, self.real_output, self.energy = method, real_output, energy
        self.metric, self.compute_error, self.seed = metric, compute_error, seed
        self.schedule: list[int] = schedule
        found = find_layers(model)
        if layers is not None:
            wanted = list(layers)
            missing = sorted(set(wanted) - set(found))
            if missing:
                msg = f"`layers` names layers that `model` does not have: {missing}."
                raise KeyError(msg)
            found = {name: found[name] for name in wanted}
        if not found:
            msg = (
                "`model` has no supported SSM layer (LRU, S5 or a registered type); "
                "see compressm_jax.register_adapter."
            )
            raise ValueError(msg)
        self.layers: dict[str, nnx.Module] = found
        self.history: list[ReductionEvent] = []
        self.stopped = False
        self.num_steps = 0
        self._last_metric: float | None = None
        self._pending: dict[str, Any] | None = None

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
            A validation metric measured at this step (see :meth:`report_metric`).

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
        return events

    def report_metric(self, value: float) -> list[ReductionEvent]:
        """Report a validation metric without advancing the step count.

        In ``"pragmatic"`` mode the first metric after a reduction decides it: if it fell by more
        than ``rollback_rtol`` (relative) below the metric reported before the reduction, the
        model and optimizer are restored and reductions stop.
        """
        value = float(value)
        if math.isnan(value):
            msg = f"`value` must be a finite number; received {value!r}."
            raise ValueError(msg)
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
                nnx.update(self.model, pending["model"])
                if self.optimizer is not None:
                    nnx.update(self.optimizer, pending["optimizer"])
                self.stopped = True
                events = [
                    self._event(name, "rolled_back", before[name], size, reason=reason)
                    for name, size in self.state_sizes.items()
                ]
                self.history += events
        self._last_metric = value
        return events

    def reduce(self) -> list[ReductionEvent]:
        """Run one reduction event now, on every managed layer (outside the schedule)."""
        return self._reduce_all()

    def state_dict(self) -> dict[str, Any]:
        """Counters, schedule and history as JSON-safe Python values (checkpoint it beside the
        model and optimizer state; a pending pragmatic snapshot is not included)."""
        return {
            "num_steps": self.num_steps,
            "schedule": list(self.schedule),
            "stopped": self.stopped,
            "last_metric": self._last_metric,
            "history": [asdict(e) for e in self.history],
            "state_sizes": self.state_sizes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the layers must already have the recorded sizes)."""
        sizes = self.state_sizes
        if dict(state.get("state_sizes", sizes)) != sizes:
            msg = (
                f"The model's state sizes {sizes} differ from the recorded "
                f"{state['state_sizes']}; restore the model first (resize_layers)."
            )
            raise ValueError(msg)
        self.num_steps = int(state["num_steps"])
        self.schedule = [int(s) for s in state["schedule"]]
        self.stopped = bool(state["stopped"])
        self._last_metric = state["last_metric"]
        self.history = [ReductionEvent(**e) for e in state["history"]]

    # -- internals -------------------------------------------------------------------------

    def _scheduled(self) -> list[ReductionEvent]:
        if self.mode != "pragmatic":
            return self._reduce_all()
        if self._pending is not None:
            reason = "pragmatic mode: the previous reduction has not been validated yet"
        elif self._last_metric is None:
            reason = "pragmatic mode needs a val_metric reported before the reduction"
        else:
            self._pending = {
                "metric": self._last_metric,
                "model": jax.tree.map(lambda x: x, nnx.state(self.model)),
                "optimizer": None
                if self.optimizer is None
                else jax.tree.map(lambda x: x, nnx.state(self.optimizer)),
            }
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
        wrt = self.optimizer.wrt if self.optimizer is not None else nnx.Param
        before = jax.tree.map(lambda x: x, nnx.state(self.model, wrt))
        reports: dict[str, LayerReduction] = {}
        events = []
        for name, layer in self.layers.items():
            event, report = self._reduce_one(name, layer)
            events.append(event)
            if report is not None:
                reports[name] = report
        if reports and self.optimizer is not None:
            self._resize_optimizer(before, reports, wrt)
        self.history += events
        return events

    def _reduce_one(
        self, name: str, layer: nnx.Module
    ) -> tuple[ReductionEvent, LayerReduction | None]:
        start = time.perf_counter()
        adapter = get_adapter(layer)
        old = adapter.state_size(layer)
        try:
            sys = adapter.to_state_space(layer)
            hsv = hankel_singular_values(sys, horizon=self.horizon, real_output=self.real_output)
            total = int(hsv.shape[-1])
            if self.mode == "tolerance":
                rank = select_rank(hsv, tau=self.tau, energy=self.energy)
            else:
                rank = math.floor(total * (1 - self.fraction))
            rank = min(total, max(self.min_rank, rank))
            hsv_list = [float(h) for h in hsv]
            if not rank < self.gate * total:
                reason = f"rank {rank} of {total} is not below the gate {self.gate:g} x {total}"
                event = self._event(
                    name,
                    "skipped",
                    hsv=hsv_list,
                    reason=reason,
                    seconds=time.perf_counter() - start,
                )
                return event, None
            report = reduce_layer(
                layer,
                rank,
                method=self.method,
                selection=self.selection,
                real_output=self.real_output,
                horizon=self.horizon,
                compute_error=self.compute_error,
                key=jax.random.fold_in(jax.random.PRNGKey(self.seed), self.num_steps),
            )
        except (CompressmError, ValueError, RuntimeError) as err:
            reason = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"Reduction of layer {name!r} at step {self.num_steps} refused; the layer is "
                f"unchanged. {reason}",
                ReductionWarning,
                stacklevel=4,
            )
            event = ReductionEvent(
                step=self.num_steps,
                layer=name,
                status="refused",
                old_rank=old,
                new_rank=old,
                seconds=time.perf_counter() - start,
                reason=reason,
            )
            return event, None
        logger.info(
            "compressm: step %d, %s: %d -> %d states", self.num_steps, name, old, report.new_rank
        )
        event = ReductionEvent(
            step=self.num_steps,
            layer=name,
            status="reduced",
            old_rank=old,
            new_rank=report.new_rank,
            hsv=hsv_list,
            error_bound=report.error_bound,
            hinf_error=report.hinf_error,
            seconds=time.perf_counter() - start,
        )
        return event, report

    def _resize_optimizer(
        self, before: Any, reports: Mapping[str, LayerReduction], wrt: Any
    ) -> None:
        assert self.optimizer is not None
        after = dict(jax.tree_util.tree_leaves_with_path(nnx.state(self.model, wrt)))
        plan: dict[Any, ParamChange] = {}
        for path, leaf in after.items():
            key = _path_key(path)
            for name, report in reports.items():
                prefix = tuple(name.split(".")) if name else ()
                if key[: len(prefix)] != prefix or len(key) <= len(prefix):
                    continue
                pname = key[len(prefix)]
                if pname not in report.changed:
                    continue
                axis, indices = report.slices.get(pname, (0, None))
                plan[path] = ParamChange(leaf, axis, indices)
        _, opt_state = resize_optimizer_state(
            before, nnx.state(self.optimizer, nnx.OptState), plan
        )
        nnx.update(self.optimizer, opt_state)
