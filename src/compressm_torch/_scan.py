"""Diagonal linear recurrences evaluated by a parallel (associative) scan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from compressm_core.layer_shapes import check_layer_input

from ._precision import complex_of, full_precision, working_dtype

__all__ = ["diagonal_scan", "real_output_layer"]


def _scan_(a: torch.Tensor, x: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """In place: ``x_k += a_k x_{k-1}`` (``x_k += a_k x_{k+1}`` if ``reverse``) along dim -2.

    Hillis-Steele form of the associative scan over :math:`(a, x)` pairs: ``ceil(log2 L)``
    passes, each one multiply into a temporary and one in-place add (the right-hand side is
    evaluated before the add, so the overlapping update is exact). ``a`` is (N,) for
    time-invariant poles or has ``x``'s shape (it is then overwritten).
    """
    length = x.shape[-2]
    invariant = a.ndim == 1
    offset = 1
    while offset < length:
        head, tail = slice(None, -offset), slice(offset, None)
        dst, src = (head, tail) if reverse else (tail, head)
        if invariant:
            x[..., dst, :] += a * x[..., src, :]
            a = a * a
        else:
            x[..., dst, :] += a[..., dst, :] * x[..., src, :]
            a[..., dst, :] *= a[..., src, :].clone()
        offset *= 2
    return x


class _DiagonalScan(torch.autograd.Function):
    """x_k = a_k x_{k-1} + v_k with the adjoint recurrence as its backward pass."""

    @staticmethod
    def forward(ctx: Any, poles: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        a = poles if poles.ndim == 1 else poles.clone()
        with torch.no_grad():
            x = _scan_(a, inputs.clone())
        ctx.save_for_backward(poles, x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        poles, x = ctx.saved_tensors
        # delta_k = g_k + conj(a_{k+1}) delta_{k+1}: the same scan run backwards in time.
        if poles.ndim == 1:
            a = poles.conj()
        else:
            a = torch.zeros_like(poles)
            a[..., :-1, :] = poles[..., 1:, :].conj()
        delta = _scan_(a, grad.clone(), reverse=True)
        grad_poles = None
        if ctx.needs_input_grad[0]:
            prev = torch.zeros_like(x)
            prev[..., 1:, :] = x[..., :-1, :]
            grad_poles = delta * prev.conj()
            if poles.ndim == 1:
                grad_poles = grad_poles.reshape(-1, poles.shape[-1]).sum(0)
        return grad_poles, delta


def diagonal_scan(
    poles: torch.Tensor, inputs: torch.Tensor, *, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """All states of the diagonal recurrence :math:`x_k = \\lambda \\odot x_{k-1} + v_k`.

    A parallel (associative) scan: ``ceil(log2 L)`` whole-sequence passes instead of ``L``
    small steps, linear in the state size ``N``. The backward pass is the adjoint recurrence
    :math:`\\delta_k = g_k + \\bar\\lambda_{k+1} \\delta_{k+1}` evaluated by the same scan, so
    autograd stores one state sequence, not one per pass.

    Parameters
    ----------
    poles : (N,) or (..., L, N) tensor
        Time-invariant poles, or one set per step (selective layers), same shape as ``inputs``.
    inputs : (..., L, N) tensor
        Driving terms :math:`v_k` (already multiplied by ``B``).
    initial_state : (..., N) tensor, optional
        :math:`x_{-1}`; zero by default.

    Returns
    -------
    (..., L, N) tensor
        :math:`x_0, \\dots, x_{L-1}`.
    """
    if poles.ndim != 1 and poles.shape != inputs.shape:
        poles = poles.expand(inputs.shape)
    if initial_state is not None:
        first_pole = poles if poles.ndim == 1 else poles[..., :1, :]
        first = inputs[..., :1, :] + first_pole * initial_state.unsqueeze(-2)
        inputs = torch.cat([first, inputs[..., 1:, :]], dim=-2)
    out: torch.Tensor = _DiagonalScan.apply(poles, inputs)  # type: ignore[no-untyped-call]
    return out


def real_output_layer(
    u: torch.Tensor,
    d_model: int,
    system: Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    feedthrough: torch.Tensor,
) -> torch.Tensor:
    """``y_k = Re(C x_k) + D u_k``, ``x_k = lambda x_{k-1} + B u_k``, for (..., L, d_model) ``u``.

    ``system(dtype)`` returns the complex poles (N,), ``B`` (N, H) and ``C`` (H, N) in the real
    precision ``dtype``: float32 (float64 if the parameters or ``u`` are float64), also under
    autocast. The output has ``u``'s dtype.
    """
    check_layer_input(u, d_model)
    with full_precision(u.device):
        real = working_dtype(feedthrough, u)
        poles, b, c = (t.to(complex_of(real)) for t in system(real))
        x_in = u.to(real)
        v = torch.complex(x_in @ b.real.T, x_in @ b.imag.T)
        x = diagonal_scan(poles, v)
        y = x.real @ c.real.T - x.imag @ c.imag.T + feedthrough.to(real) * x_in
    return y.to(u.dtype)
