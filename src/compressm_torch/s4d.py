"""The S4D layer (Gu et al., 2022): per-channel diagonal complex SSMs with zero-order hold."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compressm_core.layer_init import log_uniform_steps
from compressm_core.layer_shapes import S4DShape, check_layer_input
from compressm_core.layers import check_s4d_args
from compressm_core.parameterizations import s4d_discrete

from ._precision import complex_of, full_precision, working_dtype
from ._scan import diagonal_scan

__all__ = ["S4D"]


class S4D(S4DShape, nn.Module):
    """S4D: ``H`` independent SISO state-space models, one per channel, with a real output.

    The parameterisation of state-spaces' minimal ``models/s4/s4d.py``. Channel ``h`` has
    ``M = N/2`` stored complex modes with

    .. math::

        a_{hn} = -e^{\\text{log\\_A\\_real}_{hn}} + i\\, \\text{A\\_imag}_{hn}, \\quad
        \\Delta_h = e^{\\text{log\\_dt}_h}, \\quad
        \\bar\\lambda_{hn} = e^{\\Delta_h a_{hn}}, \\quad
        \\bar b_{hn} = \\frac{\\bar\\lambda_{hn} - 1}{a_{hn}} B_{hn},

    .. math::

        x_{k, h} = \\bar\\lambda_h \\odot x_{k-1, h} + \\bar b_h u_{k, h}, \\qquad
        y_{k, h} = 2 \\operatorname{Re}\\Big(\\sum_n C_{hn} x_{k, hn}\\Big) + D_h u_{k, h},

    zero-order hold with ``B = 1`` fixed (not a parameter, as in the minimal ``s4d.py``). The
    output ``2 Re`` is the sum of each mode and its conjugate, so the ``N/2`` stored modes
    realise ``N`` real states per channel. The state includes the current input (the layer's
    transfer function is ``z`` times that of the standard system, with the same H-infinity
    norm).

    Parameters: ``log_dt`` (H,), ``log_A_real`` and ``A_imag`` (H, N/2), ``C`` (H, N/2, 2) (real
    and imaginary parts, ``torch.view_as_real`` of the complex ``C``) and ``D`` (H,).

    Parameters
    ----------
    d_model : int
        Number of channels ``H`` (input and output width).
    d_state : int
        Real state size ``N`` per channel, even; ``N/2`` complex modes are stored. A reduced
        layer has ``d_state = 2 * n_modes``.
    dt_min, dt_max : float, optional
        Range of the log-uniform initial steps.
    device, dtype : optional
        Factory keywords for the parameters (real dtype).

    Notes
    -----
    Initialisation as in the minimal ``s4d.py`` (S4D-Lin): ``log_A_real = log 0.5``,
    ``A_imag = pi n`` for mode ``n``, ``C`` complex standard normal (real and imaginary parts of
    variance 1/2), ``D`` standard normal, ``log_dt`` uniform in ``[log dt_min, log dt_max]``.
    The recurrence runs as a parallel scan over the ``H * N/2`` modes in float32 (float64 for
    float64 parameters), also under autocast; the output has the input's dtype.

    The library counts the state of this layer in stored complex modes (``n_modes = N/2``),
    as for :class:`S5` with ``conj_sym``: :func:`state_sizes`, :func:`reduce_layer` ranks and
    checkpoints use ``n_modes``.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import S4D
    >>> layer = S4D(d_model=4, d_state=16)
    >>> layer(torch.randn(2, 10, 4)).shape, layer.n_modes
    (torch.Size([2, 10, 4]), 8)
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_s4d_args(d_model, d_state, dt_min, dt_max)
        self.d_model, self.dt_min, self.dt_max = d_model, dt_min, dt_max
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        h, m = d_model, d_state // 2
        self.log_dt = nn.Parameter(torch.empty(h, **kw))
        self.log_A_real = nn.Parameter(torch.empty(h, m, **kw))
        self.A_imag = nn.Parameter(torch.empty(h, m, **kw))
        self.C = nn.Parameter(torch.empty(h, m, 2, **kw))
        self.D = nn.Parameter(torch.empty(h, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the S4D-Lin initialisation of the minimal ``s4d.py``."""
        u = torch.rand_like(self.log_dt)
        self.log_dt.copy_(log_uniform_steps(u, self.dt_min, self.dt_max))
        self.log_A_real.fill_(math.log(0.5))
        modes = torch.arange(self.n_modes, dtype=self.A_imag.dtype, device=self.A_imag.device)
        self.A_imag.copy_(math.pi * modes.expand_as(self.A_imag))
        nn.init.normal_(self.C, std=math.sqrt(0.5))
        nn.init.normal_(self.D)

    def discrete_system(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Poles :math:`\\bar\\lambda`, inputs :math:`\\bar b` and outputs ``2 C`` of the ``H``
        SISO systems, each (H, N/2) complex, in the real precision ``dtype`` (default: float32,
        or float64 for float64 parameters); the output of channel ``h`` is
        ``Re(sum_n (2 C)_hn x_hn)`` (:func:`compressm_core.parameterizations.s4d_discrete`)."""
        real = dtype or working_dtype(self.log_A_real)
        c = torch.complex(self.C[..., 0].to(real), self.C[..., 1].to(real))
        poles, b_bar, c_out = s4d_discrete(
            self.log_dt.to(real), self.log_A_real.to(real), self.A_imag.to(real), c
        )
        return poles, b_bar, c_out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Map ``u`` of shape (..., length, d_model) to ``y`` of the same shape."""
        check_layer_input(u, self.d_model)
        with full_precision(u.device):
            real = working_dtype(self.D, u)
            poles, b_bar, c_out = (t.to(complex_of(real)) for t in self.discrete_system(real))
            x_in = u.to(real)
            v = x_in[..., None] * b_bar  # (..., L, H, M)
            x = diagonal_scan(poles.reshape(-1), v.flatten(-2)).reshape(v.shape)
            y = (x.real * c_out.real - x.imag * c_out.imag).sum(-1) + self.D.to(real) * x_in
        return y.to(u.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}"
