"""Pure functions on LRU parameter trees: Equinox-style modules and Flax linen param dicts.

The official CompreSSM code (an Equinox ``LRULayer``) and minimal-LRU (a Flax linen ``LRU``)
store the same eight arrays under the same names as :class:`compressm_jax.LRU`:

============================  ========  ==========================================
name                          shape     role
============================  ========  ==========================================
``nu_log``, ``theta_log``     (N,)      :math:`\\lambda = \\exp(-e^{\\nu} + i e^{\\theta})`
``gamma_log``                 (N,)      input scale :math:`e^{\\gamma}` (rows of ``B``)
``B_re``, ``B_im``            (N, H)    :math:`B = \\mathrm{diag}(e^\\gamma)(B_{re} + i B_{im})`
``C_re``, ``C_im``            (H, N)    :math:`C = C_{re} + i C_{im}`
``D``                         (H,)      :math:`y = \\operatorname{Re}(C x) + D \\odot u`
============================  ========  ==========================================

These functions take any object with those attributes (an Equinox module, a dataclass, a
NamedTuple) or any mapping with those keys (a linen ``params`` sub-dict such as
``params["encoder"]["layers_0"]["seq"]``) and never import Equinox.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import numpy as np

from compressm_core import DiagonalStateSpace, h_infinity_norm
from compressm_core.reduction import ReduceArguments, ReduceKeywords, reduction_report
from compressm_core.training import signature_with

from ._systems import (
    LRU_NAMES,
    LRU_STATE_AXES,
    device_system,
    host_system,
    lru_discrete,
    lru_from_state_space,
)
from .reduction import LayerReduction, _arguments, _cast_like, _plan

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["lru_to_state_space", "reduce_lru_params"]

T = TypeVar("T")


def _fields(params: object) -> dict[str, Any]:
    if isinstance(params, Mapping):
        missing = [n for n in LRU_NAMES if n not in params]
        values = {n: params[n] for n in LRU_NAMES if n in params}
    else:
        missing = [n for n in LRU_NAMES if not hasattr(params, n)]
        values = {n: getattr(params, n) for n in LRU_NAMES if hasattr(params, n)}
    if missing:
        kind = "keys" if isinstance(params, Mapping) else "attributes"
        msg = (
            f"`params` must have the LRU {kind} {list(LRU_NAMES)}; missing {missing} "
            f"(received {type(params).__name__})."
        )
        raise TypeError(msg)
    return values


def _host_lru(values: Mapping[str, Any]) -> DiagonalStateSpace:
    arrays = [np.asarray(values[n], dtype=np.float64) for n in LRU_STATE_AXES]
    poles, b, c = lru_discrete(*arrays, xp=np)
    return DiagonalStateSpace(poles, b, c, np.diag(np.asarray(values["D"], dtype=np.float64)))


def _replace(params: T, new: Mapping[str, Any]) -> T:
    """A copy of ``params`` with the entries in ``new`` replaced (``params`` is untouched)."""
    if isinstance(params, Mapping):
        out = {**params, **new}
        if type(params) is dict:
            return out  # type: ignore[return-value]
        try:  # flax.core.FrozenDict and other mappings built from a dict
            return type(params)(out)  # type: ignore[call-arg]
        except TypeError:
            return out  # type: ignore[return-value]
    # A pytree whose children are its attributes (Equinox modules, registered dataclasses,
    # NamedTuples): rebuild it from its leaves, as ``eqx.tree_at`` does.
    pairs, treedef = jax.tree_util.tree_flatten_with_path(params)
    top = {
        path[0].name: i
        for i, (path, _) in enumerate(pairs)
        if len(path) == 1 and isinstance(path[0], jax.tree_util.GetAttrKey)
    }
    if set(new) <= set(top):
        leaves = [leaf for _, leaf in pairs]
        for name, value in new.items():
            leaves[top[name]] = value
        out_tree: T = jax.tree_util.tree_unflatten(treedef, leaves)
        return out_tree
    clone = copy.copy(params)
    for name, value in new.items():
        object.__setattr__(clone, name, value)
    return clone


def lru_to_state_space(params: object) -> DiagonalStateSpace:
    """The standard realization :math:`(\\lambda, \\operatorname{diag}(e^\\gamma) B, C,
    \\operatorname{diag}(D))` of LRU parameters, as JAX arrays.

    Parameters
    ----------
    params : mapping or object
        The LRU's eight arrays by name (see the module docstring): a linen param dict or an
        Equinox-style module.

    Returns
    -------
    DiagonalStateSpace
        float64/complex128 with ``jax_enable_x64``, else float32/complex64 (computed in float64
        on the host either way).

    Raises
    ------
    TypeError
        If ``params`` lacks one of the names.
    """
    values = _fields(params)
    like = values["nu_log"] if isinstance(values["nu_log"], jax.Array) else None
    return device_system(_host_lru(values), like)


@signature_with(ReduceArguments.parameters())
def reduce_lru_params(
    params: T,
    rank: int | None = None,
    *,
    key: jax.Array | None = None,
    **keywords: Unpack[ReduceKeywords],
) -> tuple[T, LayerReduction]:
    """Reduce the LRU held in a parameter tree: a pure function returning new parameters.

    Balanced truncation of :math:`(\\lambda, \\operatorname{diag}(e^\\gamma) B, C)` to ``rank``
    states, re-diagonalisation, and the LRU parameterisation of the result, exactly as
    :func:`reduce_layer` does for :class:`compressm_jax.LRU` (same arguments, same report):

    .. math::

        \\nu = \\log(-\\log|\\mu|), \\quad \\theta = \\log \\arg \\mu \\in (0, 2\\pi], \\quad
        \\gamma = \\log\\sqrt{1 - |\\mu|^2}, \\quad B = V^{-1} B_r / e^{\\gamma},
        \\quad C = C_r V,

    with ``D`` unchanged and :math:`\\|G - G_r\\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i>r}
    \\sigma_i`.

    Parameters
    ----------
    params : mapping or object
        An Equinox-style module (any object with attributes ``nu_log, theta_log, B_re, B_im,
        C_re, C_im, D, gamma_log``) or a Flax linen param dict of one LRU with those keys.
    rank, key : optional
        As in :func:`reduce_layer`.
    **keywords
        ``tau``, ``energy``, ``method``, ``selection``, ``real_output``, ``horizon``,
        ``compute_error``, ``max_condition``: as in :func:`reduce_layer`.

    Returns
    -------
    new_params : same kind as ``params``
        A new mapping (same type when it can be built from a dict) or a new object (rebuilt from
        its pytree leaves like ``eqx.tree_at``, else a shallow copy) whose seven state arrays
        have ``new_rank`` states, in the dtypes of the old ones; every other entry is shared.
        ``params`` itself is not modified.
    report : LayerReduction
        Ranks, HSVs, bound, measured error and what changed.

    Raises
    ------
    TypeError
        ``params`` lacks an LRU name; neither or both of ``rank`` and ``tau``; no ``key`` for
        ``selection="random"``.
    ValueError, StabilityError, ConditioningError
        As in :func:`reduce_layer`; nothing is returned then.

    Notes
    -----
    A linen module checks parameter shapes against its definition, so apply the reduced
    params with a module rebuilt with the new state size (minimal-LRU: ``d_hidden=new_rank``).

    Examples
    --------
    >>> import jax
    >>> from compressm_jax import reduce_lru_params
    >>> n, h = 16, 3
    >>> k = jax.random.split(jax.random.key(0), 5)
    >>> params = {
    ...     "nu_log": jax.random.uniform(k[0], (n,), minval=-4.0, maxval=0.0),
    ...     "theta_log": jax.random.uniform(k[1], (n,), minval=-2.0, maxval=1.0),
    ...     "gamma_log": jax.numpy.zeros(n),
    ...     "B_re": jax.random.normal(k[2], (n, h)), "B_im": jax.random.normal(k[3], (n, h)),
    ...     "C_re": jax.random.normal(k[4], (h, n)), "C_im": jax.numpy.zeros((h, n)),
    ...     "D": jax.numpy.ones(h),
    ... }
    >>> new, report = reduce_lru_params(params, 4)
    >>> new["B_re"].shape, report.old_rank, new["D"] is params["D"]
    ((4, 3), 16, True)
    """
    arguments = _arguments(keywords, rank, key, owner="reduce_lru_params")
    values = _fields(params)
    sys = _host_lru(values)
    plan = _plan(
        sys,
        rank,
        arguments,
        key,
        from_state_space=lru_from_state_space,
        sliced=lambda idx: {
            name: np.take(np.asarray(values[name]), idx, axis=axis)
            for name, axis in LRU_STATE_AXES.items()
        },
    )
    new = {name: _cast_like(name, value, values[name]) for name, value in plan.values.items()}
    hinf = None
    if arguments.compute_error:
        after = _host_lru({**values, **new})
        hinf = float(h_infinity_norm(sys, host_system(after), real_output=True))
    report = reduction_report(
        old_rank=int(sys.poles.shape[-1]),
        new_rank=int(new["nu_log"].shape[0]),
        hsv=plan.hsv,
        bound=plan.bound,
        hinf_error=hinf,
        selection=arguments.selection,
        indices=plan.indices,
        changed=plan.values,
        state_axes=LRU_STATE_AXES,
    )
    return _replace(params, new), report
