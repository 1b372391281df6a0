"""The training controller for Flax NNX models: reduce every supported layer at scheduled steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compressm_core import DiagonalStateSpace, hankel_singular_values
from compressm_core.checks import check_int
from compressm_core.layer_writes import LayerPlan, layer_plan
from compressm_core.layers import check_layer_sizes
from compressm_core.rank import shared_rank_hsv
from compressm_core.reduction import ReduceArguments, ReductionPlan
from compressm_core.schedule import ReductionWarning
from compressm_core.training import (
    BatchedLayer,
    ControllerBase,
    ReductionKeywords,
    ReductionOptions,
    signature_with,
)

from ._shadows import match_shadows, restore_shadows, shadow_states, sync_shadows
from ._systems import host_system
from .adapters import find_layers, get_adapter
from .optim import ParamChange, _path_key, resize_optimizer_state
from .reduction import LayerReduction, _apply, _sliced
from .reduction import _plan as _plan_layer
from .rewarmup import mark_cut

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CompreSSM", "ReductionWarning", "resize_layers"]


def resize_layers(model: nnx.Module, sizes: Mapping[str, int]) -> None:
    """Give the named layers of ``model`` the given state sizes (zeros; Params kept).

    Used before restoring a checkpoint of a reduced model into a freshly built one.

    Raises
    ------
    KeyError, ValueError
        As :func:`compressm_core.layers.check_layer_sizes`: an unknown layer, a bad size.
    """
    layers = find_layers(model)
    for name, size in check_layer_sizes(sizes, layers).items():
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
    options : ReductionOptions, optional
        The framework-free options as one record, as for :class:`compressm_torch.CompreSSM`.
    horizon : int, optional
        Gramians over ``horizon`` steps (``None``: an infinite horizon, the paper).
    layers : iterable of str, optional
        Names of the layers to manage (default: all supported layers).
    extra_models : iterable of flax.nnx.Module, optional
        Shadow copies kept in step with every reduction (an EMA module, any module of the
        same structure): after an index selection their own values are sliced at the kept
        positions; after a change of basis their state parameters take the reduced layer's
        values. Undone with a failed event, restored by a pragmatic rollback. As
        :class:`compressm_torch.CompreSSM`'s ``extra_models``.
    **keywords
        The options of :class:`~compressm_core.training.ReductionOptions` by name (``tau``,
        ``mode``, ``reduction_steps``, ``schedule``, ...; pass ``loss`` to :meth:`step` for the
        certified schedule), taking precedence over ``options``. ``rewarmup_steps`` is for an
        optimizer without :func:`scale_by_rewarmup`: :attr:`lr_factor` is
        ``k / (rewarmup_steps + 1)`` for the ``k``-th of the next ``rewarmup_steps`` updates;
        multiply it into their learning rate by hand (e.g. through
        ``optax.inject_hyperparams``). Nothing is applied automatically.

    Attributes
    ----------
    options : ReductionOptions
        The options in force.

    Notes
    -----
    The re-warm-up is automatic when the optimizer's transformation chains
    :func:`scale_by_rewarmup` after the optimizer, e.g.
    ``optax.chain(optax.adamw(schedule), scale_by_rewarmup(K))``: at every event that reduced a
    layer the controller marks the cut in the optimizer state (:func:`mark_cut`), and the next
    ``K`` updates are scaled by ``1/(K+1), ..., K/(K+1)`` inside the compiled update. The
    schedule keeps its own count, so its values are not shifted. ``K`` is the transformation's;
    leave ``rewarmup_steps`` at 0 then (or do not multiply :attr:`lr_factor` in as well).

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

    @signature_with()
    def __init__(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer[Any] | None,
        *,
        total_steps: int,
        options: ReductionOptions | None = None,
        horizon: int | None = None,
        layers: Iterable[str] | None = None,
        extra_models: Iterable[nnx.Module] = (),
        **keywords: Unpack[ReductionKeywords],
    ) -> None:
        if not isinstance(model, nnx.Module):
            msg = f"`model` must be a flax.nnx.Module; received {type(model).__name__}."
            raise TypeError(msg)
        if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
            kind = type(optimizer).__name__
            msg = f"`optimizer` must be a flax.nnx.Optimizer or None; received {kind}."
            raise TypeError(msg)
        self._configure(options, keywords, total_steps=total_steps)
        if horizon is not None:
            check_int(horizon, "horizon", low=1)
        self.model, self.optimizer, self.horizon = model, optimizer, horizon
        self._params_before: Any = None
        self._select_layers(
            find_layers(model),
            layers,
            "`model` has no supported SSM layer (LRU, S5 or a registered type); "
            "see compressm_jax.register_adapter.",
        )
        self.extra_models = list(extra_models)
        self._shadows = match_shadows(self.extra_models, self.layers)

    # -- public ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, schedule and history as JSON-safe Python values (checkpoint it beside the
        model and optimizer state; a pending pragmatic snapshot is not included)."""
        return self._base_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the layers must already have the recorded sizes)."""
        self._load_base_state(state, "resize_layers")

    # -- internals -------------------------------------------------------------------------

    def _parameter_count(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))

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
            "extra_models": shadow_states(self.extra_models),
        }

    def _restore(self, snapshot: dict[str, Any], *, exact: bool = False) -> None:
        nnx.update(self.model, snapshot["model"])
        restore_shadows(self.extra_models, snapshot["extra_models"])
        for layer in self.layers.values():
            adapter = get_adapter(layer)
            if adapter.on_resize is not None:
                adapter.on_resize(layer)
        if self.optimizer is None:
            return
        state = snapshot["optimizer"]
        if not exact:  # step counts (and the schedules they drive) stay where training is

            def newer_count(then: Any, now: Any) -> Any:
                return now if jnp.issubdtype(jnp.result_type(now), jnp.integer) else then

            state = jax.tree.map(newer_count, state, nnx.state(self.optimizer))
        nnx.update(self.optimizer, state)

    def _begin_event(self, names: Sequence[str]) -> Callable[[], None]:
        snapshot = self._snapshot()  # arrays are immutable: nothing is copied
        wrt = self.optimizer.wrt if self.optimizer is not None else nnx.Param
        self._params_before = jax.tree.map(lambda x: x, nnx.state(self.model, wrt))

        def undo() -> None:
            self._params_before = None
            self._restore(snapshot, exact=True)

        return undo

    def _measure(self, name: str, layer: nnx.Module) -> tuple[list[float], int, int, Any]:
        sys = host_system(get_adapter(layer).to_state_space(layer))  # float64 on the host
        hsv = shared_rank_hsv(
            hankel_singular_values(sys, horizon=self.horizon, real_output=self.real_output)
        )
        return [float(h) for h in hsv], self._target_rank(hsv), int(hsv.shape[-1]), sys

    def _read_system(self, name: str, layer: nnx.Module) -> DiagonalStateSpace:
        """The layer's system in float64 on the host, where the event's batched maths run."""
        return host_system(get_adapter(layer).to_state_space(layer))

    def _event_horizon(self) -> int | None:
        return self.horizon

    def _unbatched(self, name: str, layer: nnx.Module, batched: BatchedLayer) -> Any:
        return batched.system

    def _batched_plan(
        self, name: str, layer: nnx.Module, batched: BatchedLayer, plan: ReductionPlan
    ) -> tuple[DiagonalStateSpace, LayerPlan]:
        adapter = get_adapter(layer)
        values = layer_plan(
            plan,
            batched.hsv,
            from_state_space=lambda reduced: adapter.from_state_space(layer, reduced),
            sliced=lambda indices: _sliced(layer, adapter, indices),
            host=np.asarray,
        )
        return batched.system, values

    def _plan(
        self, name: str, layer: nnx.Module, rank: int, context: Any
    ) -> tuple[DiagonalStateSpace, LayerPlan]:
        adapter = get_adapter(layer)
        arguments = ReduceArguments(
            energy=self.energy,
            method=self.method,
            selection=self.selection,
            real_output=self.real_output,
            horizon=self.horizon,
        )
        plan = _plan_layer(
            context,
            rank,
            arguments,
            jax.random.fold_in(jax.random.PRNGKey(self.seed), self.num_steps),
            from_state_space=lambda reduced: adapter.from_state_space(layer, reduced),
            sliced=lambda indices: _sliced(layer, adapter, indices),
        )
        return context, plan

    def _apply(
        self, name: str, layer: nnx.Module, plan: tuple[DiagonalStateSpace, LayerPlan]
    ) -> LayerReduction:
        sys, values = plan
        report, _ = _apply(
            layer,
            get_adapter(layer),
            sys,
            values,
            selection=self.selection,
            compute_error=self.compute_error,
        )
        return report

    def _resize_optimizer(self, applied: Mapping[str, tuple[Any, Any]]) -> None:
        reports: dict[str, LayerReduction] = {
            name: report for name, (_, report) in applied.items()
        }
        sync_shadows(self._shadows, self.layers, reports)
        if self.optimizer is None:
            return
        wrt = self.optimizer.wrt
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
            self._params_before, nnx.state(self.optimizer, nnx.OptState), plan
        )
        nnx.update(self.optimizer, opt_state)
        marked = self.optimizer.opt_state  # the optax state: a pytree of OptState
        nnx.update(marked, nnx.state(mark_cut(nnx.as_pure(marked))))

    def _end_event(self, names: Sequence[str]) -> None:
        self._params_before = None
