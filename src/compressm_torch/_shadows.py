"""Shadow copies of a model (EMA, ``AveragedModel``) kept in step with its reductions.

A shadow has the structure of the trained model (``AveragedModel`` wraps it as ``module``) and
its own values. After a reduction of a layer, its counterpart in every shadow gets the new
state size:

- after an index selection (``"random"``/``"smallest"`` LTI selections, selective layers) the
  shadow's own values are sliced at the kept positions, so its average is kept;
- after a change of basis (balanced truncation) the shadow's state tensors take the reduced
  layer's new values: an average of values in two different state bases would mean nothing, so
  the average of those tensors restarts there. Its other tensors keep their own values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ._params import assign, resolve
from .adapters import _ADAPTERS, LayerAdapter, SelectiveAdapter, get_adapter
from .adapters import find_layers as _find_layers
from .reduction import LayerReduction

__all__ = ["Shadows", "match_shadows", "snapshot_shadows", "sync_shadows"]

Shadows = list[dict[str, nn.Module]]


def match_shadows(extra_models: Iterable[nn.Module], layers: Mapping[str, nn.Module]) -> Shadows:
    """For every shadow, its layer matching each managed layer of ``layers`` by name (the same
    name, or the only one ending in ``"." + name``, as in ``AveragedModel``'s ``module.``).

    Raises
    ------
    TypeError
        A shadow that is not a module.
    ValueError
        A managed layer without exactly one counterpart, or one of another type or state size.
    """
    return _ADAPTERS.match_layers(extra_models, layers, _find_layers)


def snapshot_shadows(shadows: Shadows, names: Sequence[str]) -> Callable[[], None]:
    """What undoes :func:`sync_shadows` on the layers ``names``: their tensors (aliases: a
    reduction replaces values, never changes them in place) and state sizes."""
    saved = []
    for pairs in shadows:
        for name in names:
            twin = pairs[name]
            tensors = [(t, t.detach()) for t in (*twin.parameters(), *twin.buffers())]
            saved.append((twin, get_adapter(twin).state_size(twin), tensors))

    @torch.no_grad()
    def undo() -> None:
        for twin, size, tensors in saved:
            for tensor, value in tensors:
                assign(tensor, value)
            _on_resize(twin, size)

    return undo


def sync_shadows(
    shadows: Shadows, live: Mapping[str, nn.Module], reports: Mapping[str, LayerReduction]
) -> None:
    """Give every shadow's counterparts of the reduced layers (``reports``) their new sizes
    (see the module's description). All new values are computed before any is written."""
    staged: list[tuple[nn.Module, int, dict[str, torch.Tensor]]] = []
    for pairs in shadows:
        for name, report in reports.items():
            twin, layer = pairs[name], live[name]
            values = {}
            for pname in report.changed:
                new = resolve(layer, pname).detach()
                if pname in report.slices:
                    axis, pos = report.slices[pname]
                    own = resolve(twin, pname).detach()
                    new = own.index_select(axis, pos.to(own.device)).contiguous()
                values[pname] = new.clone().to(resolve(twin, pname).device)
            staged.append((twin, report.new_rank, values))
    with torch.no_grad():
        for twin, size, values in staged:
            for pname, value in values.items():
                tensor = resolve(twin, pname)
                assign(tensor, value)
            _on_resize(twin, size)


def _on_resize(layer: nn.Module, size: int) -> None:
    adapter = get_adapter(layer)
    if isinstance(adapter, SelectiveAdapter):
        adapter.on_resize(layer, size)
    elif isinstance(adapter, LayerAdapter) and adapter.on_resize is not None:
        adapter.on_resize(layer)
