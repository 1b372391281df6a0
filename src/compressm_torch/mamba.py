"""A pure-PyTorch Mamba (selective state-space) layer with mamba_ssm's parameter names."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ._precision import full_precision, working_dtype
from ._scan import diagonal_scan

__all__ = ["Mamba"]


class Mamba(nn.Module):
    """Mamba-1 selective SSM layer, written in plain PyTorch (any device, no custom kernels).

    Same constructor, parameter names, shapes and initialisation as ``mamba_ssm``'s ``Mamba``
    (and Hugging Face's ``MambaMixer``), so state dicts load in both directions. Per batch,
    channel :math:`d`, state :math:`n` and step :math:`t`:

    .. math::

        [x_t; z_t] = W_{in} h_t, \\quad u_t = \\operatorname{SiLU}(\\operatorname{conv}(x)_t),
        \\quad [\\delta_t; B_t; C_t] = W_x u_t, \\quad
        \\Delta_t = \\operatorname{softplus}(W_{dt} \\delta_t + b_{dt}),

        s_t[d, n] = e^{\\Delta_t[d] A[d, n]} s_{t-1}[d, n] + \\Delta_t[d] B_t[n] u_t[d], \\quad
        y_t[d] = \\sum_n C_t[n] s_t[d, n] + D[d] u_t[d],

        \\text{out}_t = W_{out} (y_t \\odot \\operatorname{SiLU}(z_t)),

    with :math:`A = -\\exp(A_{\\log})` (zero-order hold for ``A``, Euler for ``B``, as in
    mamba_ssm). ``B_t`` and ``C_t`` are shared by all ``d_inner`` channels, so the state can
    only be reduced by keeping one set of state indices in every channel (see
    :func:`compressm_torch.reduce_selective_layer`). The recurrence runs as a parallel scan in
    float32 (float64 for float64 parameters), also under autocast; memory
    ``O(batch * L * d_inner * d_state)``.

    Parameters
    ----------
    d_model : int
        Input and output features.
    d_state : int, optional
        State size per channel ``N``.
    d_conv : int, optional
        Width of the causal depthwise convolution.
    expand : int, optional
        ``d_inner = expand * d_model``.
    dt_rank : int or "auto", optional
        Rank of the step-size projection; ``"auto"`` is ``ceil(d_model / 16)``.
    dt_min, dt_max, dt_init_floor : float, optional
        Initial step sizes are log-uniform in ``[dt_min, dt_max]``, at least ``dt_init_floor``.
    dt_init : {"random", "constant"}, optional
        Initialisation of ``dt_proj.weight`` (uniform or constant, scale
        ``dt_scale / sqrt(dt_rank)``).
    dt_scale : float, optional
        Scale of ``dt_proj.weight``.
    conv_bias, bias : bool, optional
        Biases of the convolution and of the input/output projections.
    layer_idx : int, optional
        Index of the layer in a stack (kept for compatibility).
    device, dtype : optional
        Factory arguments of the parameters.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import Mamba
    >>> layer = Mamba(d_model=8, d_state=16)
    >>> layer(torch.randn(2, 10, 8)).shape
    torch.Size([2, 10, 8])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init: Literal["random", "constant"] = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"`{name}` must be a positive int; received {value!r}."
                raise ValueError(msg)
        if dt_init not in ("random", "constant"):
            msg = f"`dt_init` must be 'random' or 'constant'; received {dt_init!r}."
            raise ValueError(msg)
        if not 0 < dt_min <= dt_max:
            msg = f"`dt_min`, `dt_max` need 0 < dt_min <= dt_max; received {dt_min}, {dt_max}."
            raise ValueError(msg)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(
                torch.rand(self.d_inner, device=device) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(a).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def selective_inputs(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u, z, dt, B, C)`` of a batch: the scan's input, gate, steps and projections.

        Shapes ``(batch, L, d_inner)`` for ``u``, ``z``, ``dt`` (after softplus) and
        ``(batch, L, d_state)`` for ``B``, ``C``.
        """
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            msg = (
                f"`hidden_states` must have shape (batch, length, {self.d_model}); received "
                f"{tuple(hidden_states.shape)}."
            )
            raise ValueError(msg)
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        x = self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2)
        u = F.silu(x)
        delta, b, c = torch.split(
            self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt = F.softplus(self.dt_proj(delta))
        return u, z, dt, b, c

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_model) -> same shape."""
        u, z, dt, b, c = self.selective_inputs(hidden_states)
        with full_precision(hidden_states.device):
            real = working_dtype(self.A_log, u)
            u, dt, b, c = (t.to(real) for t in (u, dt, b, c))
            a = -torch.exp(self.A_log.to(real))  # (d_inner, N)
            dt_c = dt.transpose(1, 2).unsqueeze(-1)  # (batch, d_inner, L, 1)
            poles = torch.exp(dt_c * a[:, None, :])  # (batch, d_inner, L, N)
            drive = (dt_c * u.transpose(1, 2).unsqueeze(-1)) * b.unsqueeze(1)
            states = diagonal_scan(poles, drive)
            y = torch.einsum("bdln,bln->bld", states, c) + u * self.D.to(real)
        out: torch.Tensor = self.out_proj((y * F.silu(z.to(real))).to(hidden_states.dtype))
        return out
