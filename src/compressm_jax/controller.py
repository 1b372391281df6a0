"""The training controller for Flax NNX models: reduce every supported layer at scheduled steps."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from compressm_core import CompressmError, hankel_singular_values
from compressm_core.rank import shared_rank_hsv
from compressm_core.schedule import ReductionEvent, ReductionWarning, _check_int
from compressm_core.training import ControllerBase, Mode, ReductionOptions, Schedule

from .adapters import find_layers, get_adapter
from .optim import ParamChange, _path_key, resize_optimizer_state
from .reduction import LayerReduction, Selection, reduce_layer

__all__ = ["CompreSSM", "ReductionWarning", "resize_layers"]


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


class CompreSSM(ControllerBase[nnx.Module]):
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
    schedule, check_every, certify_window, learning_drop, rank_rtol, max_cut : optional
        The certified schedule, as for :class:`compressm_torch.CompreSSM` (pass ``loss`` to
        :meth:`step`). A learning-rate re-warm-up after each cut is :attr:`lr_factor`
        (``rewarmup_steps``); multiply it into the learning rate of the next updates, e.g.
        through ``optax.inject_hyperparams``.

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
        schedule: Schedule = "steps",
        check_every: int | None = None,
        certify_window: int = 3,
        learning_drop: float = 0.2,
        rank_rtol: float = 0.1,
        rewarmup_steps: int = 0,
        max_cut: float | None = None,
    ) -> None:
        if not isinstance(model, nnx.Module):
            msg = f"`model` must be a flax.nnx.Module; received {type(model).__name__}."
            raise TypeError(msg)
        if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
            kind = type(optimizer).__name__
            msg = f"`optimizer` must be a flax.nnx.Optimizer or None; received {kind}."
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
        if horizon is not None:
            _check_int("horizon", horizon, 1)
        self.model, self.optimizer, self.horizon = model, optimizer, horizon
        self._select_layers(
            find_layers(model),
            layers,
            "`model` has no supported SSM layer (LRU, S5 or a registered type); "
            "see compressm_jax.register_adapter.",
        )

    # -- public ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, schedule and history as JSON-safe Python values (checkpoint it beside the
        model and optimizer state; a pending pragmatic snapshot is not included)."""
        return self._base_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the layers must already have the recorded sizes)."""
        self._load_base_state(state, "resize_layers")

    # -- internals -------------------------------------------------------------------------

    def _layer_state_size(self, layer: nnx.Module) -> int:
        return get_adapter(layer).state_size(layer)

    def _observe(self, name: str, layer: nnx.Module) -> tuple[Any, Any, Any] | None:
        sys = get_adapter(layer).to_state_space(layer)
        hsv = hankel_singular_values(sys, horizon=self.horizon, real_output=self.real_output)
        return shared_rank_hsv(hsv), sys, None

    def _bound_options(self) -> dict[str, Any]:
        return {"real_output": self.real_output, "horizon": self.horizon}

    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": jax.tree.map(lambda x: x, nnx.state(self.model)),
            "optimizer": None
            if self.optimizer is None
            else jax.tree.map(lambda x: x, nnx.state(self.optimizer)),
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        nnx.update(self.model, snapshot["model"])
        if self.optimizer is not None:
            nnx.update(self.optimizer, snapshot["optimizer"])

    def _reduce_all(self, names: Iterable[str] | None = None) -> list[ReductionEvent]:
        wrt = self.optimizer.wrt if self.optimizer is not None else nnx.Param
        before = jax.tree.map(lambda x: x, nnx.state(self.model, wrt))
        reports: dict[str, LayerReduction] = {}
        events = []
        for name in list(self.layers) if names is None else list(names):
            event, report = self._reduce_one(name, self.layers[name])
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
            hsv = shared_rank_hsv(
                hankel_singular_values(sys, horizon=self.horizon, real_output=self.real_output)
            )
            total = int(hsv.shape[-1])
            rank = self._target_rank(hsv)
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
            return self._refused(name, old, err, time.perf_counter() - start), None
        return self._reduced(name, old, report, hsv_list, time.perf_counter() - start), report

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
