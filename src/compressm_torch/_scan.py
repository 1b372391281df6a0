"""Diagonal linear recurrences evaluated by a parallel (associative) scan."""

from __future__ import annotations

import torch

__all__ = ["diagonal_scan"]


def diagonal_scan(
    poles: torch.Tensor, inputs: torch.Tensor, *, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """All states of the diagonal recurrence :math:`x_k = \\lambda \\odot x_{k-1} + v_k`.

    Evaluated by the Hillis-Steele form of the associative scan over the operator
    :math:`(\\lambda_a, v_a) \\bullet (\\lambda_b, v_b) = (\\lambda_a \\lambda_b,
    \\lambda_b v_a + v_b)`: ``ceil(log2 L)`` whole-sequence passes instead of ``L`` small steps,
    differentiable by ordinary autograd, and linear in the state size ``N``.

    Parameters
    ----------
    poles : (N,) or (..., L, N) tensor
        Time-invariant poles, or one set per step (selective layers).
    inputs : (..., L, N) tensor
        Driving terms :math:`v_k` (already multiplied by ``B``).
    initial_state : (..., N) tensor, optional
        :math:`x_{-1}`; zero by default.

    Returns
    -------
    (..., L, N) tensor
        :math:`x_0, \\dots, x_{L-1}`.
    """
    x = inputs
    if initial_state is not None:
        first = x[..., :1, :] + _first_pole(poles) * initial_state.unsqueeze(-2)
        x = torch.cat([first, x[..., 1:, :]], dim=-2)
    length = x.shape[-2]
    invariant = poles.ndim == 1
    a = poles
    offset = 1
    while offset < length:
        if invariant:
            shifted = a * x[..., :-offset, :]
        else:
            shifted = a[..., offset:, :] * x[..., :-offset, :]
            a = torch.cat([a[..., :offset, :], a[..., offset:, :] * a[..., :-offset, :]], dim=-2)
        x = torch.cat([x[..., :offset, :], x[..., offset:, :] + shifted], dim=-2)
        if invariant:
            a = a * a
        offset *= 2
    return x


def _first_pole(poles: torch.Tensor) -> torch.Tensor:
    return poles if poles.ndim == 1 else poles[..., :1, :]
