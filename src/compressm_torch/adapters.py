"""Map layers onto core systems and back: one adapter per layer family, and a registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from compressm_core import DiagonalStateSpace
from compressm_core import layer_parameters as layout
from compressm_core.layers import check_layer_sizes
from compressm_core.parameterizations import (
    s4d_discrete,
)
from compressm_core.registry import AdapterRegistry

from ._params import assign, resolve
from .lru import LRU
from .s4d import S4D
from .s5 import S5

__all__ = [
    "LayerAdapter",
    "SelectiveAdapter",
    "find_layers",
    "get_adapter",
    "register_adapter",
    "resize_layers",
    "state_sizes",
    "to_state_space",
]

_COMPILED_PREFIX = "_orig_mod."


@dataclass(frozen=True)
class LayerAdapter:
    """How to read a layer family as a diagonal system and write a reduced one back.

    Attributes
    ----------
    to_state_space : callable
        ``layer -> DiagonalStateSpace`` in float64/complex128 on the layer's device: the
        standard realization :math:`(\\lambda, B, C, D)` of the layer, whose output is
        ``Re(C x) + D u`` if ``real_output`` else ``C x + D u``. A layer made of independent
        systems (:class:`S4D`: one SISO system per channel) returns them as a batch (leading
        axes); all members are reduced to one shared rank, chosen from
        :func:`compressm_core.rank.shared_rank_hsv`.
    from_state_space : callable
        ``(layer, DiagonalStateSpace) -> {parameter name: tensor}``: the parameter values that
        realise a (reduced) system in the layer's parameterisation. Pure: the caller writes
        them, after checking them, so a failed reduction leaves the layer as it was. Raise
        :class:`~compressm_core.StabilityError` when the system cannot be represented.
    state_axes : mapping
        ``{parameter name: axis}`` for every parameter with one entry per state along ``axis``;
        used to slice states by index, to resize layers from checkpoints and to find the
        optimizer state a reduction touches. Names may be dotted paths into submodules
        (``"kernel.C"``) and may name buffers.
    real_output : bool
        Whether the layer's output is the real part of the system's output.
    on_resize : callable, optional
        Called with the layer after its state size changed (update cached attributes).
    differentiable_state_space : callable, optional
        The realization of ``to_state_space`` with autograd through the layer's parameters
        (``to_state_space`` returns detached tensors): what
        :func:`hankel_nuclear_norm` differentiates. ``None`` if the family offers none.
    """

    to_state_space: Callable[[nn.Module], DiagonalStateSpace]
    from_state_space: Callable[[nn.Module, DiagonalStateSpace], dict[str, torch.Tensor]]
    state_axes: Mapping[str, int]
    real_output: bool = True
    on_resize: Callable[[nn.Module], None] | None = field(default=None)
    differentiable_state_space: Callable[[nn.Module], DiagonalStateSpace] | None = field(
        default=None
    )

    def state_size(self, layer: nn.Module) -> int:
        """Number of states of ``layer``."""
        name, axis = next(iter(self.state_axes.items()))
        return int(resolve(layer, name).shape[axis])

    def incoming_size(
        self, layer: nn.Module, state_dict: Mapping[str, object], prefix: str = ""
    ) -> int | None:
        """State size of ``layer``'s entries in ``state_dict`` (``None`` if absent)."""
        name, axis = next(iter(self.state_axes.items()))
        incoming = state_dict.get(prefix + name)
        if not torch.is_tensor(incoming) or incoming.ndim <= axis:
            return None
        return int(incoming.shape[axis])

    def resize(self, layer: nn.Module, size: int) -> None:
        """Give ``layer`` ``size`` states (uninitialised values, Parameter objects kept)."""
        for pname, axis in self.state_axes.items():
            param = resolve(layer, pname)
            shape = list(param.shape)
            shape[axis] = size
            assign(param, param.new_zeros(shape))
        if self.on_resize is not None:
            self.on_resize(layer)


Signals = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SelectiveAdapter:
    """How to read a selective (Mamba-style) layer's recurrence and keep a subset of its states.

    A selective layer has per channel ``d`` the recursion
    :math:`s_t[d, n] = e^{\\Delta_t[d] A[d, n]} s_{t-1}[d, n] + \\Delta_t[d] B_t[n] u_t[d]`,
    :math:`y_t[d] = \\sum_n C_t[n] s_t[d, n]`, with ``B_t``, ``C_t`` shared by all channels (or
    by the channels of a group). Its state is reduced by keeping the same state indices in every
    channel of a group; every change is a slice of existing tensors, so the optimizer moments can
    be sliced exactly.

    Attributes
    ----------
    signals : callable
        ``(layer, hidden_states) -> (dt, A, B, C)`` from the layer's input (batch, L, d_model):
        ``dt`` (batch, L, D) after softplus, ``A`` (D, N) negative, ``B`` and ``C``
        (batch, L, N) or (batch, L, G, N) (see
        :func:`compressm_core.update_selective_statistics`). Called under ``torch.no_grad``.
    positions : callable
        ``(layer, indices) -> {parameter name: (axis, positions)}``: for kept state indices
        ``indices`` of shape (r,) or (G, r), the positions along ``axis`` that every parameter
        with a state dimension keeps (dotted names such as ``"x_proj.weight"`` allowed).
    state_size : callable
        ``layer -> N`` (per group).
    groups : callable
        ``layer -> G`` or ``None`` (one index set for all channels).
    on_resize : callable
        ``(layer, N) -> None``: update the layer's attributes (``d_state``, convolution groups,
        ...) after its tensors were sliced to ``N`` states.
    incoming_size : callable
        ``(layer, state_dict, prefix) -> N or None``: the state size of the layer's entries in a
        state dict (used to resize layers before loading).
    rank_multiple : callable, optional
        ``(layer, r) -> r'``: the smallest rank ``>= r`` that the layer's kernels accept.
    """

    signals: Callable[[nn.Module, torch.Tensor], Signals]
    positions: Callable[[nn.Module, torch.Tensor], dict[str, tuple[int, torch.Tensor]]]
    state_size: Callable[[nn.Module], int]
    groups: Callable[[nn.Module], int | None]
    on_resize: Callable[[nn.Module, int], None]
    incoming_size: Callable[[nn.Module, Mapping[str, object], str], int | None]
    rank_multiple: Callable[[nn.Module, int], int] | None = field(default=None)

    def resize(self, layer: nn.Module, size: int) -> None:
        """Give ``layer`` ``size`` states per group (uninitialised values, Parameter objects
        kept)."""
        groups = self.groups(layer) or 1
        first = torch.arange(size).expand(groups, size)
        for pname, (axis, pos) in self.positions(layer, first).items():
            param = layer.get_parameter(pname)
            shape = list(param.shape)
            shape[axis] = int(pos.numel())
            assign(param, param.new_zeros(shape))
        self.on_resize(layer, size)


Adapter = LayerAdapter | SelectiveAdapter


def _check_state_axes(adapter: Adapter) -> None:
    if isinstance(adapter, LayerAdapter) and not adapter.state_axes:
        msg = "`adapter.state_axes` must name at least one parameter."
        raise ValueError(msg)


# Third-party layers may be registered by qualified type name, so their packages are never
# imported here.
_ADAPTERS: AdapterRegistry[Adapter] = AdapterRegistry(
    nn.Module,
    "torch.nn.Module",
    "compressm_torch",
    (LayerAdapter, SelectiveAdapter),
    _check_state_axes,
)


def register_adapter(layer_type: type[nn.Module] | str, adapter: Adapter) -> None:
    """Register ``adapter`` for ``layer_type`` and its subclasses (replacing an earlier one).

    ``layer_type`` may be a qualified class name (``"package.module.Class"``): the class is then
    matched by name, without importing its package
    (:class:`compressm_core.registry.AdapterRegistry`).

    Examples
    --------
    >>> from compressm_torch import LRU, LayerAdapter, get_adapter, register_adapter
    >>> class MyLRU(LRU): ...
    >>> register_adapter(MyLRU, get_adapter(LRU(2, 2)))
    """
    _ADAPTERS.register(layer_type, adapter)


def get_adapter(layer: nn.Module) -> Adapter:
    """The adapter registered for ``type(layer)`` or its nearest registered base class.

    Raises
    ------
    TypeError
        If no adapter is registered for the layer's type.
    """
    return _ADAPTERS.get(layer)


def to_state_space(layer: nn.Module) -> DiagonalStateSpace:
    """The layer's standard realization as a core system (float64/complex128, layer's device).

    Examples
    --------
    >>> from compressm_torch import LRU, to_state_space
    >>> sys = to_state_space(LRU(d_model=3, d_state=5))
    >>> sys.poles.shape, sys.b.shape, sys.c.shape
    (torch.Size([5]), torch.Size([5, 3]), torch.Size([3, 5]))
    """
    adapter = get_adapter(layer)
    if not isinstance(adapter, LayerAdapter):
        msg = (
            f"`layer` of type {type(layer).__name__} is selective: it has no fixed state-space "
            "system. Use compressm_torch.SelectiveRecorder to collect its statistics."
        )
        raise TypeError(msg)
    return adapter.to_state_space(layer)


def _iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Adapter]]:
    for name, module in model.named_modules():
        adapter = _ADAPTERS.lookup(module)
        if adapter is not None:
            yield name.replace(_COMPILED_PREFIX, ""), module, adapter


def find_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule of ``model`` (itself included) with a registered adapter, by name.

    Names are those of ``model.named_modules()``, without the ``_orig_mod.`` segment that
    ``torch.compile`` inserts, so they match between compiled and plain models.
    """
    return {name: layer for name, layer, _ in _iter_layers(model)}


def state_sizes(model: nn.Module) -> dict[str, int]:
    """``{layer name: number of states}`` for every supported layer of ``model``."""
    return {name: adapter.state_size(layer) for name, layer, adapter in _iter_layers(model)}


@torch.no_grad()
def resize_layers(model: nn.Module, sizes: Mapping[str, int]) -> None:
    """Give the named layers of ``model`` the given state sizes (uninitialised values).

    Used before ``load_state_dict`` to restore a reduced model into a freshly built one;
    the Parameter objects are kept, so optimizers built on ``model`` stay valid.

    Raises
    ------
    KeyError, ValueError
        As :func:`compressm_core.layers.check_layer_sizes`: an unknown layer, a bad size.
    """
    layers = {name: (layer, adapter) for name, layer, adapter in _iter_layers(model)}
    for name, size in check_layer_sizes(sizes, layers).items():
        layer, adapter = layers[name]
        if adapter.state_size(layer) != size:
            adapter.resize(layer, size)


# --- LRU -------------------------------------------------------------------------------------


def _detached(
    read: Callable[[nn.Module], DiagonalStateSpace],
) -> Callable[[nn.Module], DiagonalStateSpace]:
    """``read`` evaluated under ``torch.no_grad``, every field detached (the
    ``to_state_space`` of an adapter whose differentiable reader is ``read``; a field can be a
    view of a parameter, which keeps ``requires_grad`` even under ``no_grad``)."""

    def detached(layer: nn.Module) -> DiagonalStateSpace:
        with torch.no_grad():
            sys = read(layer)
        return DiagonalStateSpace(*(None if f is None else f.detach() for f in sys))

    return detached


def _discrete_state_space(layer: nn.Module) -> DiagonalStateSpace:
    """``(lambda, B, C, diag(D))`` of a layer with ``discrete_system(dtype)`` and ``D`` (H,)."""
    assert isinstance(layer, (LRU, S5))
    poles, b, c = layer.discrete_system(torch.float64)
    d = torch.diag(layer.D.to(torch.float64))
    return DiagonalStateSpace(poles, b, c, d)


_discrete_to_state_space = _detached(_discrete_state_space)


def _complex128(sys: DiagonalStateSpace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    poles, b, c = (torch.as_tensor(x).to(torch.complex128) for x in sys[:3])
    return poles, b, c


def _lru_from_state_space(layer: nn.Module, sys: DiagonalStateSpace) -> dict[str, torch.Tensor]:
    assert isinstance(layer, LRU)
    return layout.lru_parameters(*_complex128(sys))


register_adapter(
    LRU,
    LayerAdapter(
        to_state_space=_discrete_to_state_space,
        from_state_space=_lru_from_state_space,
        state_axes=layout.LRU_STATE_AXES,
        differentiable_state_space=_discrete_state_space,
    ),
)

# --- S5 --------------------------------------------------------------------------------------


def _s5_from_state_space(layer: nn.Module, sys: DiagonalStateSpace) -> dict[str, torch.Tensor]:
    assert isinstance(layer, S5)
    log_step = layer.log_step.detach().to(torch.float64)
    return layout.s5_parameters(
        *_complex128(sys),
        log_step,
        clip_eigs=layer.clip_eigs,
        output_scale=layer.output_scale,
    )


register_adapter(
    S5,
    LayerAdapter(
        to_state_space=_discrete_to_state_space,
        from_state_space=_s5_from_state_space,
        state_axes=layout.S5_STATE_AXES,
        differentiable_state_space=_discrete_state_space,
    ),
)

# --- S4D -------------------------------------------------------------------------------------

# state-spaces' minimal S4D (``models/s4/s4d.py``), matched by name: its kernel's tensors are
# ``kernel.log_dt`` (H,), ``kernel.log_A_real``, ``kernel.A_imag`` (H, N/2), ``kernel.C``
# (H, N/2, 2) (parameters, or buffers when registered with ``lr=0``), and ``D`` (H,).
_S4D_STATE_SPACES = "models.s4.s4d.S4D"


def _s4d_to_state_space(prefix: str) -> Callable[[nn.Module], DiagonalStateSpace]:
    def read(layer: nn.Module) -> DiagonalStateSpace:
        log_dt, log_a_real, a_imag, c = (
            resolve(layer, prefix + name).to(torch.float64)
            for name in ("log_dt", "log_A_real", "A_imag", "C")
        )
        poles, b_bar, c_out = s4d_discrete(
            log_dt, log_a_real, a_imag, torch.complex(c[..., 0], c[..., 1])
        )
        d = resolve(layer, "D").to(torch.float64)
        return DiagonalStateSpace(poles, b_bar[..., None], c_out[..., None, :], d[:, None, None])

    return read


def _s4d_from_state_space(
    prefix: str,
) -> Callable[[nn.Module, DiagonalStateSpace], dict[str, torch.Tensor]]:
    def write(layer: nn.Module, sys: DiagonalStateSpace) -> dict[str, torch.Tensor]:
        log_dt = resolve(layer, prefix + "log_dt").detach().to(torch.float64)
        # Each channel keeps its step; the reduced poles fix A = log(mu) / dt.
        params = layout.s4d_parameters(*_complex128(sys), log_dt)
        return {prefix + name: value for name, value in params.items()}

    return write


def _s4d_adapter(prefix: str, on_resize: Callable[[nn.Module], None] | None) -> LayerAdapter:
    """The adapter of an S4D layer whose kernel tensors are ``prefix + name``.

    The layer is read as ``H`` SISO systems (a batch): poles, inputs and outputs (H, N/2),
    ``b`` (H, N/2, 1), ``c`` (H, 1, N/2) with ``c = 2 C`` for the output ``Re(c x)``, ``d``
    (H, 1, 1). A reduction gives every channel the same number of modes; each channel keeps
    its ``log_dt`` and the reduced poles and residues are written back through
    :func:`compressm_core.parameterizations.s4d_from_discrete` (the fixed ``B = 1`` is absorbed
    into ``C``).
    """
    read = _s4d_to_state_space(prefix)
    return LayerAdapter(
        to_state_space=_detached(read),
        from_state_space=_s4d_from_state_space(prefix),
        state_axes={prefix + name: axis for name, axis in layout.S4D_STATE_AXES.items()},
        on_resize=on_resize,
        differentiable_state_space=read,
    )


def _state_spaces_s4d_resized(layer: nn.Module) -> None:
    """state-spaces' S4D keeps its real state size in ``n``."""
    setattr(layer, "n", 2 * int(resolve(layer, "kernel.log_A_real").shape[-1]))  # noqa: B010


register_adapter(S4D, _s4d_adapter("", None))
register_adapter(_S4D_STATE_SPACES, _s4d_adapter("kernel.", _state_spaces_s4d_resized))
