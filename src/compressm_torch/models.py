"""Reference models built from SSM layers: the LRU block and a sequence model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from compressm_core.layers import check_block_norm, sequence_layer_sizes
from compressm_core.sequence_model import sequence_forward

from .lru import LRU
from .mamba import Mamba
from .s4d import S4D
from .s5 import S5

__all__ = ["SSMBlock", "SequenceModel"]

_LAYERS: dict[str, type[nn.Module]] = {"lru": LRU, "s5": S5, "s4d": S4D, "mamba": Mamba}


class SSMBlock(nn.Module):
    """Residual block ``x + Dropout(GLU(Dropout(GELU(SSM(Norm(x))))))`` (the LRU paper's block).

    Parameters
    ----------
    ssm : torch.nn.Module
        Sequence layer mapping (batch, length, d_model) to the same shape.
    d_model : int
        Width.
    dropout : float, optional
        Dropout probability.
    norm : {"layer", "batch"}, optional
        Pre-norm: LayerNorm, or BatchNorm over (batch, length) without affine parameters as in
        the LRU paper.
    """

    def __init__(
        self,
        ssm: nn.Module,
        d_model: int,
        *,
        dropout: float = 0.0,
        norm: Literal["layer", "batch"] = "layer",
    ) -> None:
        super().__init__()
        check_block_norm(norm)
        self.norm: nn.Module = (
            nn.LayerNorm(d_model) if norm == "layer" else nn.BatchNorm1d(d_model, affine=False)
        )
        self.ssm = ssm
        self.out = nn.Linear(d_model, 2 * d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_model) -> same shape."""
        if isinstance(self.norm, nn.BatchNorm1d):
            z = self.norm(x.transpose(-1, -2)).transpose(-1, -2)
        else:
            z = self.norm(x)
        z = self.dropout(F.gelu(self.ssm(z)))
        out: torch.Tensor = x + self.dropout(F.glu(self.out(z), dim=-1))
        return out


class SequenceModel(nn.Module):
    """Linear encoder, ``n_layers`` :class:`SSMBlock` s, optional mean pooling, linear decoder.

    Parameters
    ----------
    d_input, d_output : int
        Input features per step; outputs (classes, or regression targets per step).
    d_model : int, optional
        Width.
    d_state : int or sequence of int, optional
        State size of every SSM layer, or one per layer (e.g. the sizes a reduced model
        reached, :func:`state_sizes`, to train a small model from scratch), counted as the
        library counts it (:func:`compressm_core.layers.sequence_layer_sizes`).
    n_layers : int, optional
        Number of blocks.
    layer : {"lru", "s5", "s4d", "mamba"}, optional
        SSM layer type (:class:`LRU`, :class:`S5`, :class:`S4D` or the selective
        :class:`Mamba`).
    pool : {"mean", None}, optional
        ``"mean"``: one output per sequence (classification); ``None``: one per step.
    dropout : float, optional
        Dropout in the blocks.
    norm : {"layer", "batch"}, optional
        Pre-norm of the blocks.
    **layer_kwargs
        Passed to the SSM layer (e.g. ``r_min``, ``r_max`` for the LRU).

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import SequenceModel
    >>> model = SequenceModel(1, 10, d_model=16, d_state=32)
    >>> model(torch.randn(4, 40, 1)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        d_input: int,
        d_output: int,
        *,
        d_model: int = 64,
        d_state: int | Sequence[int] = 64,
        n_layers: int = 1,
        layer: Literal["lru", "s5", "s4d", "mamba"] = "lru",
        pool: Literal["mean"] | None = "mean",
        dropout: float = 0.0,
        norm: Literal["layer", "batch"] = "layer",
        **layer_kwargs: Any,
    ) -> None:
        super().__init__()
        sizes = sequence_layer_sizes(layer, _LAYERS, pool, d_state, n_layers)
        self.pool = pool
        self.encoder = nn.Linear(d_input, d_model)
        self.blocks = nn.ModuleList(
            SSMBlock(
                _LAYERS[layer](d_model, size, **layer_kwargs),
                d_model,
                dropout=dropout,
                norm=norm,
            )
            for size in sizes
        )
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_input) -> (batch, d_output), or (batch, length, d_output)."""
        out: torch.Tensor = sequence_forward(x, self.encoder, self.blocks, self.decoder, self.pool)
        return out
