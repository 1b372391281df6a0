"""Adapters of the Mamba-1 and Mamba-2 layers (index selection of their states).

Mamba-1 layers (:class:`~compressm_torch.Mamba`, ``mamba_ssm``'s ``Mamba``, Hugging Face's
``MambaMixer``) and Mamba-2 layers (``mamba_ssm``'s ``Mamba2``, Hugging Face's
``Mamba2Mixer``). Third-party classes are recognised by their qualified names; their packages
are never imported here. Importing :mod:`compressm_torch` registers them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import SelectiveAdapter, Signals, register_adapter
from .mamba import Mamba

__all__ = ["MAMBA2_ADAPTER", "MAMBA_ADAPTER"]


def _int(layer: nn.Module, name: str) -> int:
    value: Any = getattr(layer, name)
    return int(value)


def _causal_conv(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """SiLU of ``layer.conv1d`` (causal, depthwise) of (batch, L, channels) ``x``, same shape."""
    conv: Any = layer.get_submodule("conv1d")
    length = x.shape[1]
    width = conv.weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=width - 1, groups=x.shape[-1])
    return F.silu(y[..., :length]).transpose(1, 2)


def _set_attrs(layer: nn.Module, names: Iterable[str], value: int) -> None:
    for attr in names:
        if hasattr(layer, attr):
            setattr(layer, attr, value)


def _flat(indices: torch.Tensor) -> torch.Tensor:
    return indices.reshape(-1).to(torch.long)


# --- Mamba-1: A_log (D, N), x_proj rows [dt | B | C] -----------------------------------------


def _mamba1_size(layer: nn.Module) -> int:
    return int(layer.get_parameter("A_log").shape[1])


def _mamba1_signals(layer: nn.Module, hidden_states: torch.Tensor) -> Signals:
    n = _mamba1_size(layer)
    x = layer.get_submodule("in_proj")(hidden_states).chunk(2, dim=-1)[0]
    u = _causal_conv(x, layer)
    x_proj = layer.get_parameter("x_proj.weight")
    rank = int(x_proj.shape[0]) - 2 * n
    delta, b, c = torch.split(F.linear(u, x_proj), [rank, n, n], dim=-1)
    dt = F.softplus(layer.get_submodule("dt_proj")(delta))
    a = -torch.exp(layer.get_parameter("A_log").float())
    return dt, a, b, c


def _mamba1_positions(layer: nn.Module, indices: torch.Tensor) -> dict[str, tuple[int, Any]]:
    n = _mamba1_size(layer)
    idx = _flat(indices).to(layer.get_parameter("A_log").device)
    rank = int(layer.get_parameter("x_proj.weight").shape[0]) - 2 * n
    rows = torch.cat([torch.arange(rank, device=idx.device), rank + idx, rank + n + idx])
    return {"A_log": (1, idx), "x_proj.weight": (0, rows)}


def _mamba1_resize(layer: nn.Module, n: int) -> None:
    proj: Any = layer.get_submodule("x_proj")
    proj.out_features = int(proj.weight.shape[0])
    _set_attrs(layer, ("d_state", "ssm_state_size"), n)


def _mamba1_incoming(
    layer: nn.Module, state_dict: Mapping[str, object], prefix: str
) -> int | None:
    incoming = state_dict.get(prefix + "A_log")
    return int(incoming.shape[1]) if torch.is_tensor(incoming) and incoming.ndim == 2 else None


MAMBA_ADAPTER = SelectiveAdapter(
    signals=_mamba1_signals,
    positions=_mamba1_positions,
    state_size=_mamba1_size,
    groups=lambda layer: None,
    on_resize=_mamba1_resize,
    incoming_size=_mamba1_incoming,
)


# --- Mamba-2: scalar A per head, B/C rows of in_proj and channels of conv1d per group --------


class _Layout(NamedTuple):
    states: int  # N per group
    groups: int  # G
    heads: int  # number of heads = channels of the core's description
    d_x: int  # x channels at the start of xBC
    offset: int  # in_proj rows before xBC
    dt_limit: tuple[float, float]


def _mamba2_layout(layer: nn.Module) -> _Layout:
    heads = int(layer.get_parameter("A_log").shape[0])
    rows = int(layer.get_parameter("in_proj.weight").shape[0])
    conv = int(layer.get_parameter("conv1d.weight").shape[0])
    if hasattr(layer, "n_groups"):  # transformers Mamba2Mixer: [gate | xBC | dt]
        groups = _int(layer, "n_groups")
        d_x = _int(layer, "intermediate_size")
        offset = rows - conv - heads
        limit = tuple(getattr(layer, "time_step_limit", (0.0, float("inf"))))
    else:  # mamba_ssm Mamba2: [z0 | x0 | z | xBC | dt]
        groups = _int(layer, "ngroups")
        d_x = _int(layer, "d_ssm")
        offset = rows - conv - heads
        limit = tuple(getattr(layer, "dt_limit", (0.0, float("inf"))))
    states = (conv - d_x) // (2 * groups)
    return _Layout(states, groups, heads, d_x, offset, (float(limit[0]), float(limit[1])))


def _mamba2_signals(layer: nn.Module, hidden_states: torch.Tensor) -> Signals:
    lay = _mamba2_layout(layer)
    batch, length, _ = hidden_states.shape
    proj = layer.get_submodule("in_proj")(hidden_states)
    gn = lay.groups * lay.states
    xbc = _causal_conv(proj[..., lay.offset : lay.offset + lay.d_x + 2 * gn], layer)
    b = xbc[..., lay.d_x : lay.d_x + gn].reshape(batch, length, lay.groups, lay.states)
    c = xbc[..., lay.d_x + gn :].reshape(batch, length, lay.groups, lay.states)
    dt = F.softplus(proj[..., -lay.heads :] + layer.get_parameter("dt_bias"))
    if lay.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*lay.dt_limit)
    a = -torch.exp(layer.get_parameter("A_log").float())
    return dt, a[:, None].expand(lay.heads, lay.states), b, c


def _mamba2_positions(layer: nn.Module, indices: torch.Tensor) -> dict[str, tuple[int, Any]]:
    lay = _mamba2_layout(layer)
    weight = layer.get_parameter("in_proj.weight")
    dev = weight.device
    idx = indices.to(dev, torch.long).reshape(lay.groups, -1)
    gn = lay.groups * lay.states
    sel = (idx + lay.states * torch.arange(lay.groups, device=dev)[:, None]).reshape(-1)
    start = lay.offset + lay.d_x
    rows = torch.cat(
        [
            torch.arange(start, device=dev),
            start + sel,
            start + gn + sel,
            torch.arange(start + 2 * gn, int(weight.shape[0]), device=dev),
        ]
    )
    channels = torch.cat([torch.arange(lay.d_x, device=dev), lay.d_x + sel, lay.d_x + gn + sel])
    out = {"in_proj.weight": (0, rows), "conv1d.weight": (0, channels)}
    if getattr(layer.get_submodule("in_proj"), "bias", None) is not None:
        out["in_proj.bias"] = (0, rows)
    if getattr(layer.get_submodule("conv1d"), "bias", None) is not None:
        out["conv1d.bias"] = (0, channels)
    return out


def _mamba2_resize(layer: nn.Module, n: int) -> None:
    conv: Any = layer.get_submodule("conv1d")
    width = int(conv.weight.shape[0])
    conv.in_channels = conv.out_channels = conv.groups = width
    proj: Any = layer.get_submodule("in_proj")
    proj.out_features = int(proj.weight.shape[0])
    _set_attrs(layer, ("d_state", "ssm_state_size"), n)
    _set_attrs(layer, ("conv_dim",), width)


def _mamba2_incoming(
    layer: nn.Module, state_dict: Mapping[str, object], prefix: str
) -> int | None:
    incoming = state_dict.get(prefix + "conv1d.weight")
    if not torch.is_tensor(incoming):
        return None
    lay = _mamba2_layout(layer)
    return (int(incoming.shape[0]) - lay.d_x) // (2 * lay.groups)


def _mamba2_rank_multiple(layer: nn.Module, rank: int) -> int:
    # Fused Mamba-2 kernels need a multiple of 8 convolution channels: (d_x + 2 G r) % 8 == 0.
    lay = _mamba2_layout(layer)
    while (lay.d_x + 2 * lay.groups * rank) % 8 and rank < lay.states:
        rank += 1
    return rank


MAMBA2_ADAPTER = SelectiveAdapter(
    signals=_mamba2_signals,
    positions=_mamba2_positions,
    state_size=lambda layer: _mamba2_layout(layer).states,
    groups=lambda layer: _mamba2_layout(layer).groups,
    on_resize=_mamba2_resize,
    incoming_size=_mamba2_incoming,
    rank_multiple=_mamba2_rank_multiple,
)

register_adapter(Mamba, MAMBA_ADAPTER)
register_adapter("mamba_ssm.modules.mamba_simple.Mamba", MAMBA_ADAPTER)
register_adapter("transformers.models.mamba.modeling_mamba.MambaMixer", MAMBA_ADAPTER)
register_adapter("mamba_ssm.modules.mamba2.Mamba2", MAMBA2_ADAPTER)
register_adapter("mamba_ssm.modules.mamba2_simple.Mamba2Simple", MAMBA2_ADAPTER)
register_adapter("transformers.models.mamba2.modeling_mamba2.Mamba2Mixer", MAMBA2_ADAPTER)
