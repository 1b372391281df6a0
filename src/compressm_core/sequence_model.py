"""The forward pass of the reference sequence model, shared by the torch and JAX packages.

``compressm_torch.SequenceModel`` and ``compressm_jax.SequenceModel`` hold the same layers
under the same names (a linear encoder, residual SSM blocks, optional mean pooling, a linear
decoder); :func:`sequence_forward` chains them. Arrays are used through their own methods
(``x.mean(-2)``), so any framework's layers and arrays fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["sequence_forward"]


def sequence_forward(
    x: Any,
    encoder: Callable[[Any], Any],
    blocks: Iterable[Callable[[Any], Any]],
    decoder: Callable[[Any], Any],
    pool: str | None,
) -> Any:
    """``decoder(pool(blocks(encoder(x))))``: the output of a sequence model.

    Parameters
    ----------
    x : array
        Input of shape (batch, length, d_input).
    encoder, decoder : callable
        The linear maps into and out of the model width.
    blocks : iterable of callable
        The residual blocks, applied in order.
    pool : {"mean", None}
        ``"mean"``: average over the length axis (one output per sequence); ``None``: one
        output per step.

    Returns
    -------
    array
        (batch, d_output) with ``pool="mean"``, else (batch, length, d_output).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.sequence_model import sequence_forward
    >>> x = np.ones((2, 5, 3))
    >>> sequence_forward(x, lambda z: 2 * z, [lambda z: z + 1], lambda z: z[..., :1], "mean")
    array([[3.],
           [3.]])
    """
    z = encoder(x)
    for block in blocks:
        z = block(z)
    if pool == "mean":
        z = z.mean(-2)
    return decoder(z)
