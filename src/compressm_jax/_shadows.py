"""Shadow copies of an NNX model (an EMA module, any module of the same structure) kept in step
with its reductions: the rule of ``compressm_torch``'s ``extra_models``.

After an index selection a shadow's own values are sliced at the kept positions; after a change
of basis its state parameters take the reduced layer's values (an average over two state bases
would mean nothing), and its other parameters keep their own values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .adapters import _ADAPTERS, find_layers, get_adapter
from .reduction import LayerReduction

__all__ = ["Shadows", "match_shadows", "restore_shadows", "shadow_states", "sync_shadows"]

Shadows = list[dict[str, nnx.Module]]


def match_shadows(extra_models: Iterable[nnx.Module], layers: Mapping[str, nnx.Module]) -> Shadows:
    """For every shadow, its layer matching each managed layer (same name, or the only one
    ending in ``"." + name``), of the same type and state size.

    Raises
    ------
    TypeError
        A shadow that is not an ``nnx.Module``.
    ValueError
        A managed layer without exactly one such counterpart.
    """
    return _ADAPTERS.match_layers(extra_models, layers, find_layers)


def shadow_states(extra_models: Iterable[nnx.Module]) -> list[Any]:
    """The states of the shadows (arrays are immutable: nothing is copied)."""
    return [jax.tree.map(lambda x: x, nnx.state(m)) for m in extra_models]


def restore_shadows(extra_models: Iterable[nnx.Module], states: Iterable[Any]) -> None:
    """Write back :func:`shadow_states` (sizes included)."""
    for shadow, state in zip(extra_models, states, strict=True):
        nnx.update(shadow, state)
        for layer in find_layers(shadow).values():
            adapter = get_adapter(layer)
            if adapter.on_resize is not None:
                adapter.on_resize(layer)


def sync_shadows(
    shadows: Shadows, live: Mapping[str, nnx.Module], reports: Mapping[str, LayerReduction]
) -> None:
    """Give every shadow's counterparts of the reduced layers (``reports``) their new sizes.
    All new values are computed before any is written."""
    staged = []
    for pairs in shadows:
        for name, report in reports.items():
            twin, layer = pairs[name], live[name]
            values = {}
            for pname in report.changed:
                if pname in report.slices:
                    axis, pos = report.slices[pname]
                    own = getattr(twin, pname)[...]
                    values[pname] = jnp.take(own, jnp.asarray(pos), axis=axis)
                else:
                    values[pname] = getattr(layer, pname)[...]
            staged.append((twin, values))
    for twin, values in staged:
        for pname, value in values.items():
            getattr(twin, pname).set_value(value)
        adapter = get_adapter(twin)
        if adapter.on_resize is not None:
            adapter.on_resize(twin)
