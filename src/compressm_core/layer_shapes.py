"""Sizes of the reference layers read from their parameters, shared by the torch and JAX layers.

Each mixin gives a layer class of either framework the properties that follow from the shapes
of its parameters (any array with a ``shape``), so that a reduced layer reports its new size.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LRUShape", "S4DShape", "S5Shape", "check_layer_input"]


class LRUShape:
    """``d_state`` of an LRU layer, from ``nu_log`` (N,)."""

    nu_log: Any

    @property
    def d_state(self) -> int:
        """Current number of complex states ``N``."""
        return int(self.nu_log.shape[0])


class S5Shape:
    """``d_state`` and ``output_scale`` of an S5 layer, from ``Lambda_re`` (P,) and
    ``conj_sym``."""

    Lambda_re: Any
    conj_sym: bool

    @property
    def d_state(self) -> int:
        """Current number of stored complex states ``P``."""
        return int(self.Lambda_re.shape[0])

    @property
    def output_scale(self) -> float:
        """``2`` with ``conj_sym`` (output ``2 Re(C x)``), else ``1``."""
        return 2.0 if self.conj_sym else 1.0


class S4DShape:
    """``n_modes`` and ``d_state`` of an S4D layer, from ``log_A_real`` (H, N/2)."""

    log_A_real: Any

    @property
    def n_modes(self) -> int:
        """Number of stored complex modes ``N/2`` per channel (the library's state size)."""
        return int(self.log_A_real.shape[-1])

    @property
    def d_state(self) -> int:
        """Real state size ``N = 2 * n_modes`` per channel."""
        return 2 * self.n_modes


def check_layer_input(u: Any, d_model: int) -> None:
    """Check that a layer's input ``u`` has shape (..., length, d_model).

    Raises
    ------
    ValueError
        If it has fewer than two axes or another last axis.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.layer_shapes import check_layer_input
    >>> check_layer_input(np.ones((2, 5, 3)), 3)
    """
    if u.ndim < 2 or u.shape[-1] != d_model:
        msg = f"`u` must have shape (..., length, {d_model}); received {tuple(u.shape)}."
        raise ValueError(msg)
