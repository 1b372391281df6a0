"""CPU stand-ins for ``mamba_ssm``'s ``Mamba2`` and ``Mamba`` (for ``gpu_suite.py --smoke``).

``mamba_ssm`` builds only with nvcc and CUDA, so it is never importable on a CPU machine. The
smoke run of the GPU suite exercises the code path of its ``mamba_ssm`` parts (timing against
``d_state``, the controller reducing a layer mid-training, the loss after) on these classes,
which carry the real layers' module paths, class names, parameter names and shapes, so that
:mod:`compressm_torch` picks the same adapters for them. They are not the real kernels: their
times mean nothing.

``Mamba2`` follows ``mamba_ssm.modules.mamba2.Mamba2`` with ``d_ssm = d_inner`` (no gated MLP
part): ``in_proj`` rows ``[z | xBC | dt]``, a depthwise causal ``conv1d`` over
``xBC = [x | B | C]`` (``d_inner + 2 G N`` channels), a scalar ``A = -exp(A_log)`` per head
and the recurrence, per head ``h`` and step ``t``,

.. math::

    s_t = e^{\\Delta_t A_h} s_{t-1} + \\Delta_t\\, x_t B_t^T, \\qquad
    y_t = s_t C_t + D_h x_t,

gated by ``silu(z)``. ``Mamba`` is :class:`compressm_torch.Mamba` (mamba_ssm's Mamba-1 layout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from compressm_torch import Mamba as _TorchMamba

__all__ = ["Mamba", "Mamba2"]


class Mamba2(torch.nn.Module):
    """Stand-in with the module path and layout of ``mamba_ssm.modules.mamba2.Mamba2``."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        device: Any = None,
        dtype: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if (expand * d_model) % headdim:
            msg = f"`headdim` must divide expand * d_model = {expand * d_model}; got {headdim}."
            raise ValueError(msg)
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.headdim, self.ngroups = d_model, d_state, headdim, ngroups
        self.d_inner = self.d_ssm = expand * d_model
        self.nheads = self.d_ssm // headdim
        self.dt_limit = (0.0, float("inf"))
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.in_proj = torch.nn.Linear(d_model, self.d_ssm + conv_dim + self.nheads, **kw)
        self.conv1d = torch.nn.Conv1d(
            conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, **kw
        )
        self.dt_bias = torch.nn.Parameter(torch.rand(self.nheads, **kw) - 3)
        self.A_log = torch.nn.Parameter(torch.log(torch.linspace(1, 16, self.nheads, **kw)))
        self.D = torch.nn.Parameter(torch.ones(self.nheads, **kw))
        self.out_proj = torch.nn.Linear(self.d_inner, d_model, bias=False, **kw)

    def forward(self, u: torch.Tensor, inference_params: Any = None) -> torch.Tensor:
        """(batch, length, d_model) -> same shape; a plain loop over time."""
        batch, length, _ = u.shape
        g, hd, heads = self.ngroups, self.headdim, self.nheads
        n = (self.conv1d.weight.shape[0] - self.d_ssm) // (2 * g)  # the current state size
        z, xbc, dt = torch.split(self.in_proj(u), [self.d_ssm, self.d_ssm + 2 * g * n, heads], -1)
        xbc = self.conv1d(xbc.transpose(1, 2))[..., :length]
        x, b, c = torch.split(F.silu(xbc).transpose(1, 2), [self.d_ssm, g * n, g * n], dim=-1)
        x = x.reshape(batch, length, heads, hd)
        b = b.reshape(batch, length, g, n).repeat_interleave(heads // g, dim=2)
        c = c.reshape(batch, length, g, n).repeat_interleave(heads // g, dim=2)
        dt = F.softplus(dt + self.dt_bias)
        decay = torch.exp(dt * -torch.exp(self.A_log))  # (batch, length, heads)
        s = x.new_zeros(batch, heads, hd, n)
        ys = []
        for t in range(length):
            s = decay[:, t, :, None, None] * s + (
                dt[:, t, :, None, None] * x[:, t, :, :, None] * b[:, t, :, None, :]
            )
            ys.append((s * c[:, t, :, None, :]).sum(-1) + self.D[:, None] * x[:, t])
        y = torch.stack(ys, dim=1).reshape(batch, length, -1) * F.silu(z)
        out: torch.Tensor = self.out_proj(y)
        return out


class Mamba(_TorchMamba):
    """Stand-in with the module path of ``mamba_ssm.modules.mamba_simple.Mamba``."""


Mamba2.__module__ = "mamba_ssm.modules.mamba2"
Mamba.__module__ = "mamba_ssm.modules.mamba_simple"
Mamba.__qualname__ = Mamba.__name__ = "Mamba"
