"""An S5-style MIMO layer: continuous-time diagonal complex state, per-state step, ZOH."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from compressm_core.layer_init import log_uniform_steps, s5_hippo_basis
from compressm_core.layer_shapes import S5Shape
from compressm_core.layers import check_s5_args
from compressm_core.parameterizations import hippo_n_eigenpairs

from ._precision import working_dtype
from ._scan import real_output_layer

__all__ = ["S5", "hippo_n_eigenpairs"]


class S5(S5Shape, nn.Module):
    """S5-style layer: one complex diagonal state shared by all channels (MIMO).

    Continuous-time :math:`\\Lambda = \\Lambda_{re} + i \\Lambda_{im}` and a step
    :math:`\\Delta_j = e^{\\text{log\\_step}_j}` per state, discretised by zero-order hold:

    .. math::

        \\bar\\lambda = e^{\\Lambda \\Delta}, \\quad
        \\bar B = \\frac{\\bar\\lambda - 1}{\\Lambda} \\odot \\tilde B, \\quad
        x_k = \\bar\\lambda \\odot x_{k-1} + \\bar B u_k, \\quad
        y_k = s \\operatorname{Re}(\\tilde C x_k) + D \\odot u_k,

    with :math:`s = 2` when ``conj_sym`` (the state stores one member of each conjugate pair,
    as in lindermanlab/S5) and :math:`s = 1` otherwise. ``B`` (P, H, 2) and ``C`` (H, P, 2) hold
    real and imaginary parts.

    Parameters
    ----------
    d_model : int
        Input and output width ``H``.
    d_state : int
        Number of stored complex states ``P`` (half the real order with ``conj_sym``).
    blocks : int, optional
        Number of HiPPO-N blocks on the diagonal of the initial :math:`\\Lambda`.
    conj_sym : bool, optional
        Output ``2 Re(C x)``: keep one state per conjugate pair.
    dt_min, dt_max : float, optional
        Range of the log-uniform initial steps.
    clip_eigs : bool, optional
        Clip :math:`\\operatorname{Re}\\Lambda` to at most ``-1e-4`` in the forward pass.
    device, dtype : optional
        Factory keywords for the parameters.

    Notes
    -----
    Initialisation as in S5: :math:`\\Lambda` from the eigenvalues of HiPPO-N
    (:func:`hippo_n_eigenpairs`), :math:`\\tilde B = V^{-1} B` and :math:`\\tilde C = C V` for
    random ``B`` (variance ``1/P``) and ``C`` (variance ``1/P``), ``D`` standard normal.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        *,
        blocks: int = 1,
        conj_sym: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        clip_eigs: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_s5_args(d_model, d_state, blocks, dt_min, dt_max)
        self.d_model, self.blocks, self.conj_sym = d_model, blocks, conj_sym
        self.dt_min, self.dt_max, self.clip_eigs = dt_min, dt_max, clip_eigs
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        p, h = d_state, d_model
        self.Lambda_re = nn.Parameter(torch.empty(p, **kw))
        self.Lambda_im = nn.Parameter(torch.empty(p, **kw))
        self.B = nn.Parameter(torch.empty(p, h, 2, **kw))
        self.C = nn.Parameter(torch.empty(h, p, 2, **kw))
        self.D = nn.Parameter(torch.empty(h, **kw))
        self.log_step = nn.Parameter(torch.empty(p, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the S5 initialisation (block-diagonal HiPPO-N eigenbasis)."""
        p, h = self.d_state, self.d_model
        lam_all, v = s5_hippo_basis(p, self.blocks, self.conj_sym)
        full, block = v.shape
        g = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ()).item()))
        b_tilde = np.zeros((p, h), dtype=complex)
        c_tilde = np.zeros((h, p), dtype=complex)
        for k in range(self.blocks):
            rows = slice(k * block, (k + 1) * block)
            b = torch.randn(full, h, generator=g, dtype=torch.float64).numpy() / math.sqrt(full)
            c = torch.randn(h, full, 2, generator=g, dtype=torch.float64).numpy()
            c = (c[..., 0] + 1j * c[..., 1]) / math.sqrt(2 * full)
            b_tilde[rows] = v.conj().T @ b
            c_tilde[:, rows] = c @ v
        self.Lambda_re.copy_(torch.from_numpy(lam_all.real))
        self.Lambda_im.copy_(torch.from_numpy(lam_all.imag))
        self.B.copy_(torch.from_numpy(np.stack([b_tilde.real, b_tilde.imag], axis=-1)))
        self.C.copy_(torch.from_numpy(np.stack([c_tilde.real, c_tilde.imag], axis=-1)))
        nn.init.normal_(self.D)
        u = torch.rand_like(self.log_step)
        self.log_step.copy_(log_uniform_steps(u, self.dt_min, self.dt_max))

    def continuous_system(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:math:`\\Lambda` (P,), :math:`\\tilde B` (P, H), :math:`\\tilde C` (H, P), complex,
        and the steps :math:`\\Delta` (P,), in the real precision ``dtype`` (default: float32,
        or float64 for float64 parameters)."""
        real = dtype or working_dtype(self.Lambda_re)
        lam_re = self.Lambda_re.to(real)
        if self.clip_eigs:
            lam_re = torch.clamp(lam_re, max=-1e-4)
        lam = torch.complex(lam_re, self.Lambda_im.to(real))
        b = torch.complex(self.B[..., 0].to(real), self.B[..., 1].to(real))
        c = torch.complex(self.C[..., 0].to(real), self.C[..., 1].to(real))
        return lam, b, c, torch.exp(self.log_step.to(real))

    def discrete_system(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH poles :math:`\\bar\\lambda` (P,), :math:`\\bar B` (P, H) and the output matrix
        :math:`s \\tilde C` (H, P) of the layer's output ``Re(C x)``."""
        lam, b, c, step = self.continuous_system(dtype)
        poles = torch.exp(lam * step)
        return poles, ((poles - 1) / lam)[:, None] * b, self.output_scale * c

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Map ``u`` of shape (batch, length, d_model) to ``y`` of the same shape."""
        return real_output_layer(u, self.d_model, self.discrete_system, self.D)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, conj_sym={self.conj_sym}"
