"""Argument checks of the reference layers and models, shared by the torch and JAX packages.

The layers :class:`compressm_torch.LRU`, :class:`compressm_torch.S5`, :class:`compressm_torch.S4D`
and their Flax NNX twins in :mod:`compressm_jax` take the same arguments and check them here;
so do the two ``SSMBlock``/``SequenceModel`` pairs and the two ``resize_layers``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TypeVar

from .checks import check_int, check_size

T = TypeVar("T")

__all__ = [
    "check_block_norm",
    "check_layer_sizes",
    "check_lru_args",
    "check_s4d_args",
    "check_s5_args",
    "counterpart_layers",
    "sequence_layer_sizes",
]


def _check_steps(dt_min: float, dt_max: float) -> None:
    if not 0 < dt_min <= dt_max:
        msg = f"Need 0 < `dt_min` <= `dt_max`; received {dt_min!r}, {dt_max!r}."
        raise ValueError(msg)


def check_lru_args(
    d_model: object, d_state: object, r_min: float, r_max: float, max_phase: float
) -> None:
    """Check the arguments of an LRU layer.

    Parameters
    ----------
    d_model, d_state : int
        Width ``H`` and number of complex states ``N``: positive ints.
    r_min, r_max : float
        Ring of the initial pole moduli: ``0 <= r_min < r_max < 1``.
    max_phase : float
        Largest initial pole phase: positive.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> from compressm_core.layers import check_lru_args
    >>> check_lru_args(4, 16, 0.9, 0.999, 6.28)
    >>> check_lru_args(4, 16, 0.9, 1.0, 6.28)
    Traceback (most recent call last):
    ...
    ValueError: Need 0 <= `r_min` < `r_max` < 1; received r_min=0.9, r_max=1.0.
    """
    check_size(d_model, "d_model")
    check_size(d_state, "d_state")
    if not 0 <= r_min < r_max < 1:
        msg = f"Need 0 <= `r_min` < `r_max` < 1; received r_min={r_min!r}, r_max={r_max!r}."
        raise ValueError(msg)
    if not max_phase > 0:
        msg = f"`max_phase` must be positive; received {max_phase!r}."
        raise ValueError(msg)


def check_s5_args(
    d_model: object, d_state: object, blocks: object, dt_min: float, dt_max: float
) -> None:
    """Check the arguments of an S5 layer.

    Parameters
    ----------
    d_model, d_state, blocks : int
        Width ``H``, stored complex states ``P`` and HiPPO-N blocks: positive ints, ``P`` a
        multiple of ``blocks``.
    dt_min, dt_max : float
        Range of the initial steps: ``0 < dt_min <= dt_max``.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> from compressm_core.layers import check_s5_args
    >>> check_s5_args(4, 8, 3, 1e-3, 1e-1)
    Traceback (most recent call last):
    ...
    ValueError: `d_state` (8) must be a multiple of `blocks` (3).
    """
    check_size(d_model, "d_model")
    p = check_size(d_state, "d_state")
    if p % check_size(blocks, "blocks"):
        msg = f"`d_state` ({d_state}) must be a multiple of `blocks` ({blocks})."
        raise ValueError(msg)
    _check_steps(dt_min, dt_max)


def check_s4d_args(d_model: object, d_state: object, dt_min: float, dt_max: float) -> None:
    """Check the arguments of an S4D layer.

    Parameters
    ----------
    d_model, d_state : int
        Channels ``H`` and real state size ``N`` per channel: positive ints, ``N`` even.
    dt_min, dt_max : float
        Range of the initial steps: ``0 < dt_min <= dt_max``.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> from compressm_core.layers import check_s4d_args
    >>> check_s4d_args(4, 7, 1e-3, 1e-1)
    Traceback (most recent call last):
    ...
    ValueError: `d_state` must be even (N/2 conjugate-pair modes); received 7.
    """
    check_size(d_model, "d_model")
    if check_size(d_state, "d_state") % 2:
        msg = f"`d_state` must be even (N/2 conjugate-pair modes); received {d_state}."
        raise ValueError(msg)
    _check_steps(dt_min, dt_max)


def check_block_norm(norm: object) -> None:
    """Check the pre-norm of an ``SSMBlock``: ``"layer"`` or ``"batch"``.

    Raises
    ------
    ValueError
        If ``norm`` is neither.

    Examples
    --------
    >>> from compressm_core.layers import check_block_norm
    >>> check_block_norm("layer")
    """
    if norm not in ("layer", "batch"):
        msg = f"`norm` must be 'layer' or 'batch'; received {norm!r}."
        raise ValueError(msg)


def sequence_layer_sizes(
    layer: str,
    known: Collection[str],
    pool: object,
    d_state: int | Sequence[int],
    n_layers: int,
) -> list[int]:
    """Check the arguments of a ``SequenceModel`` and give its layers' ``d_state`` arguments.

    ``d_state`` is counted as the library counts a layer's state: complex states for the LRU
    and S5, stored complex modes per channel for S4D, whose layers are built with
    ``d_state = 2 * size``.

    Parameters
    ----------
    layer : str
        The layer type, one of ``known``.
    known : collection of str
        The layer types of the framework.
    pool : {"mean", None}
        Pooling of the outputs.
    d_state : int or sequence of int
        One state size for every layer, or ``n_layers`` sizes.
    n_layers : int
        Number of blocks.

    Returns
    -------
    list of int
        The ``d_state`` argument of each layer's constructor.

    Raises
    ------
    ValueError
        If ``layer`` is unknown, ``pool`` is neither ``"mean"`` nor ``None``, or ``d_state``
        does not give ``n_layers`` sizes.

    Examples
    --------
    >>> from compressm_core.layers import sequence_layer_sizes
    >>> sequence_layer_sizes("s4d", ["lru", "s4d"], "mean", [8, 4], 2)
    [16, 8]
    """
    if layer not in known:
        msg = f"`layer` must be one of {sorted(known)}; received {layer!r}."
        raise ValueError(msg)
    if pool not in ("mean", None):
        msg = f"`pool` must be 'mean' or None; received {pool!r}."
        raise ValueError(msg)
    sizes = [d_state] * n_layers if isinstance(d_state, int) else list(d_state)
    if len(sizes) != n_layers:
        msg = f"`d_state` must be an int or {n_layers} ints; received {d_state!r}."
        raise ValueError(msg)
    return [2 * size if layer == "s4d" else size for size in sizes]


def check_layer_sizes(sizes: Mapping[str, object], names: Collection[str]) -> dict[str, int]:
    """Check the ``sizes`` argument of ``resize_layers`` against a model's layer names.

    Parameters
    ----------
    sizes : mapping
        ``{layer name: new state size}``.
    names : collection of str
        The names of the model's supported layers.

    Returns
    -------
    dict
        ``sizes`` with Python ``int`` values.

    Raises
    ------
    KeyError
        If ``sizes`` names a layer that is not in ``names``.
    ValueError
        If a size is not an int >= 1.

    Examples
    --------
    >>> from compressm_core.layers import check_layer_sizes
    >>> check_layer_sizes({"blocks.0.ssm": 4}, ["blocks.0.ssm", "blocks.1.ssm"])
    {'blocks.0.ssm': 4}
    """
    unknown = sorted(set(sizes) - set(names))
    if unknown:
        msg = f"`sizes` names layers that `model` does not have: {unknown}."
        raise KeyError(msg)
    return {name: check_int(size, f"sizes[{name!r}]", low=1) for name, size in sizes.items()}


def counterpart_layers(
    layers: Mapping[str, T],
    found: Mapping[str, T],
    state_size: Callable[[T], int],
    argument: str,
) -> dict[str, T]:
    """For each layer of a model (``layers``), its counterpart among the layers of a copy
    (``found``): the one with the same name, or the only one ending in ``"." + name`` (a
    wrapper's prefix, e.g. ``AveragedModel``'s ``module.``), of the same type and state size.

    Raises
    ------
    ValueError
        A layer with no such counterpart, or several; the message names ``argument``.
    """
    matched = {}
    for name, layer in layers.items():
        hits = [n for n in found if n == name]
        if not hits:
            hits = [n for n in found if n.endswith("." + name)]
        if len(hits) != 1:
            msg = (
                f"`{argument}` must have one layer named {name!r} (or ending in '.{name}'); "
                f"found {hits or 'none'}."
            )
            raise ValueError(msg)
        twin = found[hits[0]]
        size = state_size(layer)
        if type(twin) is not type(layer) or state_size(twin) != size:
            msg = (
                f"`{argument}`'s layer {hits[0]!r} must be a {type(layer).__name__} with "
                f"{size} states, like the model's; received a {type(twin).__name__}."
            )
            raise ValueError(msg)
        matched[name] = twin
    return matched
