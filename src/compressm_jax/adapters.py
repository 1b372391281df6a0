"""Map Flax NNX layers onto core systems and back: one adapter per layer family, and a registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax import nnx

from compressm_core import DiagonalStateSpace
from compressm_core.registry import AdapterRegistry

from ._systems import (
    LRU_STATE_AXES,
    S4D_NAMES,
    S4D_STATE_AXES,
    S5_STATE_AXES,
    device_system,
    host_system,
    lru_discrete,
    lru_from_state_space,
    s4d_from_state_space,
    s4d_zoh,
    s5_from_state_space,
    s5_zoh,
)
from .lru import LRU
from .s4d import S4D
from .s5 import S5

__all__ = [
    "LayerAdapter",
    "find_layers",
    "get_adapter",
    "register_adapter",
    "state_sizes",
    "to_state_space",
]


@dataclass(frozen=True)
class LayerAdapter:
    """How to read a layer family as a diagonal system and write a reduced one back.

    Attributes
    ----------
    to_state_space : callable
        ``layer -> DiagonalStateSpace``: the standard realization :math:`(\\lambda, B, C, D)` of
        the layer, whose output is ``Re(C x) + D u`` if ``real_output`` else ``C x + D u``.
        Any arrays convertible by :func:`numpy.asarray` (host NumPy float64/complex128 is best:
        the reduction runs on the host in float64 whatever ``jax_enable_x64`` says). A layer
        made of independent systems (:class:`S4D`: one SISO system per channel) returns them
        as a batch (leading axes); all members are reduced to one shared rank, chosen from
        :func:`compressm_core.rank.shared_rank_hsv`.
    from_state_space : callable
        ``(layer, DiagonalStateSpace) -> {parameter name: array}``: the parameter values that
        realise a (reduced) system, given as NumPy complex128 arrays, in the layer's
        parameterisation. Pure: the caller casts and checks them and only then writes them, so
        a failed reduction leaves the layer as it was. Raise
        :class:`~compressm_core.StabilityError` when the system cannot be represented.
    state_axes : mapping
        ``{parameter name: axis}`` for every :class:`flax.nnx.Param` attribute with one entry
        per state along ``axis``; used to slice states by index.
    real_output : bool
        Whether the layer's output is the real part of the system's output.
    on_resize : callable, optional
        Called with the layer after its state size changed (update cached attributes).
    """

    to_state_space: Callable[[Any], DiagonalStateSpace]
    from_state_space: Callable[[Any, DiagonalStateSpace], dict[str, Any]]
    state_axes: Mapping[str, int]
    real_output: bool = True
    on_resize: Callable[[Any], None] | None = field(default=None)

    def state_size(self, layer: nnx.Module) -> int:
        """Number of states of ``layer``."""
        name, axis = next(iter(self.state_axes.items()))
        return int(getattr(layer, name).shape[axis])


def _check_state_axes(adapter: LayerAdapter) -> None:
    if not adapter.state_axes:
        msg = "`adapter.state_axes` must name at least one parameter."
        raise ValueError(msg)


# Third-party layers may be registered by qualified type name, so their packages are never
# imported here.
_ADAPTERS: AdapterRegistry[LayerAdapter] = AdapterRegistry(
    nnx.Module, "flax.nnx.Module", "compressm_jax", (LayerAdapter,), _check_state_axes
)


def register_adapter(layer_type: type[nnx.Module] | str, adapter: LayerAdapter) -> None:
    """Register ``adapter`` for ``layer_type``, an NNX layer class or a qualified class name.

    The adapter serves the class and its subclasses, replacing an earlier one; a class named by
    a string is matched without importing its package
    (:class:`compressm_core.registry.AdapterRegistry`).

    Examples
    --------
    >>> from flax import nnx
    >>> from compressm_jax import LRU, get_adapter, register_adapter
    >>> class MyLRU(LRU): ...
    >>> register_adapter(MyLRU, get_adapter(LRU(2, 2, rngs=nnx.Rngs(0))))
    """
    _ADAPTERS.register(layer_type, adapter)


def get_adapter(layer: nnx.Module) -> LayerAdapter:
    """The adapter of ``layer``'s nearest registered class; a ``TypeError`` if none is."""
    return _ADAPTERS.get(layer)


def to_state_space(layer: nnx.Module) -> DiagonalStateSpace:
    """The layer's standard realization as a core system, as JAX arrays on the layer's device.

    float64/complex128 when ``jax_enable_x64`` is on, float32/complex64 otherwise (the values
    are computed in float64 on the host either way).

    Raises
    ------
    TypeError
        If no adapter is registered for the layer's type.

    Examples
    --------
    >>> from flax import nnx
    >>> from compressm_jax import LRU, to_state_space
    >>> sys = to_state_space(LRU(d_model=3, d_state=5, rngs=nnx.Rngs(0)))
    >>> sys.poles.shape, sys.b.shape, sys.c.shape
    ((5,), (5, 3), (3, 5))
    """
    adapter = get_adapter(layer)
    name = next(iter(adapter.state_axes))
    like = getattr(layer, name)[...]
    return device_system(host_system(adapter.to_state_space(layer)), like)


def _iter_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, LayerAdapter]]:
    for path, module in nnx.iter_modules(model):
        adapter = _ADAPTERS.lookup(module)
        if adapter is not None:
            yield ".".join(str(p) for p in path), module, adapter


def find_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every submodule of ``model`` (itself included, as ``""``) with a registered adapter, by
    dotted path (``"blocks.0.ssm"``)."""
    return {name: layer for name, layer, _ in _iter_layers(model)}


def state_sizes(model: nnx.Module) -> dict[str, int]:
    """``{layer path: number of states}`` for every supported layer of ``model``."""
    return {name: adapter.state_size(layer) for name, layer, adapter in _iter_layers(model)}


def _host(layer: nnx.Module, *names: str) -> list[np.ndarray]:
    return [np.asarray(getattr(layer, name)[...], dtype=np.float64) for name in names]


# --- LRU -------------------------------------------------------------------------------------


def _lru_to_state_space(layer: nnx.Module) -> DiagonalStateSpace:
    assert isinstance(layer, LRU)
    poles, b, c = lru_discrete(*_host(layer, *LRU_STATE_AXES), xp=np)
    (d,) = _host(layer, "D")
    return DiagonalStateSpace(poles, b, c, np.diag(d))


def _lru_from_state_space(layer: nnx.Module, sys: DiagonalStateSpace) -> dict[str, np.ndarray]:
    assert isinstance(layer, LRU)
    return lru_from_state_space(sys)


register_adapter(
    LRU,
    LayerAdapter(
        to_state_space=_lru_to_state_space,
        from_state_space=_lru_from_state_space,
        state_axes=LRU_STATE_AXES,
    ),
)

# --- S5 --------------------------------------------------------------------------------------


def _s5_to_state_space(layer: nnx.Module) -> DiagonalStateSpace:
    assert isinstance(layer, S5)
    poles, b_bar, c_out = s5_zoh(
        *_host(layer, *S5_STATE_AXES),
        clip_eigs=layer.clip_eigs,
        output_scale=layer.output_scale,
        xp=np,
    )
    (d,) = _host(layer, "D")
    return DiagonalStateSpace(poles, b_bar, c_out, np.diag(d))


def _s5_from_state_space(layer: nnx.Module, sys: DiagonalStateSpace) -> dict[str, np.ndarray]:
    assert isinstance(layer, S5)
    (log_step,) = _host(layer, "log_step")
    return s5_from_state_space(
        sys, log_step=log_step, clip_eigs=layer.clip_eigs, output_scale=layer.output_scale
    )


register_adapter(
    S5,
    LayerAdapter(
        to_state_space=_s5_to_state_space,
        from_state_space=_s5_from_state_space,
        state_axes=S5_STATE_AXES,
    ),
)

# --- S4D -------------------------------------------------------------------------------------


def _s4d_to_state_space(layer: nnx.Module) -> DiagonalStateSpace:
    """``H`` SISO systems: poles (H, N/2), ``b`` (H, N/2, 1), ``c = 2 C`` (H, 1, N/2) of the
    output ``Re(c x)``, ``d`` (H, 1, 1)."""
    assert isinstance(layer, S4D)
    poles, b_bar, c_out = s4d_zoh(*_host(layer, *S4D_NAMES), xp=np)
    (d,) = _host(layer, "D")
    return DiagonalStateSpace(poles, b_bar[..., None], c_out[..., None, :], d[:, None, None])


def _s4d_from_state_space(layer: nnx.Module, sys: DiagonalStateSpace) -> dict[str, np.ndarray]:
    assert isinstance(layer, S4D)
    (log_dt,) = _host(layer, "log_dt")
    return s4d_from_state_space(sys, log_dt=log_dt)


register_adapter(
    S4D,
    LayerAdapter(
        to_state_space=_s4d_to_state_space,
        from_state_space=_s4d_from_state_space,
        state_axes=S4D_STATE_AXES,
    ),
)
