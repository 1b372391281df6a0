"""The Linear Recurrent Unit (Orvieto et al., 2023)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compressm_core.layer_init import lru_ring_init
from compressm_core.layer_shapes import LRUShape
from compressm_core.layers import check_lru_args

from ._precision import working_dtype
from ._scan import real_output_layer

__all__ = ["LRU"]


class LRU(LRUShape, nn.Module):
    """Linear Recurrent Unit: a complex diagonal recurrence with a real output.

    .. math::

        \\lambda_j = \\exp(-e^{\\nu_j} + i e^{\\theta_j}), \\qquad
        x_k = \\lambda \\odot x_{k-1} + \\operatorname{diag}(e^{\\gamma}) (B_{re} + i B_{im}) u_k,
        \\qquad y_k = \\operatorname{Re}\\big((C_{re} + i C_{im}) x_k\\big) + D \\odot u_k,

    with ``nu_log``, ``theta_log`` and ``gamma_log`` holding :math:`\\nu, \\theta, \\gamma`. The
    state includes the current input, so the layer's transfer function is
    :math:`z C (zI - \\Lambda)^{-1} B + D`, whose H-infinity norm equals that of the standard
    system :math:`(\\Lambda, \\operatorname{diag}(e^\\gamma) B, C)` used for reduction.

    Parameters
    ----------
    d_model : int
        Input and output width ``H``.
    d_state : int
        Number of complex states ``N``; a reduced layer is rebuilt with its reduced size.
    r_min, r_max : float, optional
        Pole moduli are initialised uniformly on the ring ``r_min <= |lambda| <= r_max``.
    max_phase : float, optional
        Pole phases are initialised uniformly in ``[0, max_phase)``.
    device, dtype : optional
        Factory keywords for the parameters (real dtype).

    Notes
    -----
    Initialisation follows the LRU paper and its reference code: ``B`` entries
    :math:`\\mathcal{N}(0, 1/(2H))` (real and imaginary parts), ``C`` entries
    :math:`\\mathcal{N}(0, 1/N)`, ``D`` standard normal, and
    :math:`\\gamma = \\log\\sqrt{1 - |\\lambda|^2}`. The recurrence is evaluated by a parallel
    scan in float32 (float64 for float64 parameters), also under autocast; the output has the
    input's dtype.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import LRU
    >>> layer = LRU(d_model=4, d_state=16)
    >>> layer(torch.randn(2, 10, 4)).shape
    torch.Size([2, 10, 4])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        *,
        r_min: float = 0.9,
        r_max: float = 0.999,
        max_phase: float = 6.28,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_lru_args(d_model, d_state, r_min, r_max, max_phase)
        self.d_model = d_model
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        n, h = d_state, d_model
        self.nu_log = nn.Parameter(torch.empty(n, **kw))
        self.theta_log = nn.Parameter(torch.empty(n, **kw))
        self.gamma_log = nn.Parameter(torch.empty(n, **kw))
        self.B_re = nn.Parameter(torch.empty(n, h, **kw))
        self.B_im = nn.Parameter(torch.empty(n, h, **kw))
        self.C_re = nn.Parameter(torch.empty(h, n, **kw))
        self.C_im = nn.Parameter(torch.empty(h, n, **kw))
        self.D = nn.Parameter(torch.empty(h, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the LRU initialisation (ring-uniform poles, normalised ``B`` and ``C``)."""
        n, h = self.d_state, self.d_model
        u1 = torch.rand_like(self.nu_log)
        u2 = torch.rand_like(self.theta_log)
        init = lru_ring_init(u1, u2, self.r_min, self.r_max, self.max_phase)
        for param, value in zip((self.nu_log, self.theta_log, self.gamma_log), init, strict=True):
            param.copy_(value)
        for p, scale in ((self.B_re, 2 * h), (self.B_im, 2 * h), (self.C_re, n), (self.C_im, n)):
            nn.init.normal_(p, std=1 / math.sqrt(scale))
        nn.init.normal_(self.D)

    def discrete_system(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Poles :math:`\\lambda` (N,), input matrix :math:`\\operatorname{diag}(e^\\gamma) B`
        (N, H) and output matrix ``C`` (H, N), complex, in the real precision ``dtype``
        (default: float32, or float64 for float64 parameters)."""
        real = dtype or working_dtype(self.nu_log)
        nu, theta, gamma = (p.to(real) for p in (self.nu_log, self.theta_log, self.gamma_log))
        poles = torch.polar(torch.exp(-torch.exp(nu)), torch.exp(theta))
        scale = torch.exp(gamma)[:, None]
        b = torch.complex(self.B_re.to(real) * scale, self.B_im.to(real) * scale)
        c = torch.complex(self.C_re.to(real), self.C_im.to(real))
        return poles, b, c

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Map ``u`` of shape (batch, length, d_model) to ``y`` of the same shape."""
        return real_output_layer(u, self.d_model, self.discrete_system, self.D)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}"
