"""Hankel nuclear-norm regularisation: a differentiable sum of Hankel singular values."""

from __future__ import annotations

import torch
from torch import nn

from compressm_core import hankel_singular_values

from .adapters import LayerAdapter, find_layers, get_adapter

__all__ = ["hankel_nuclear_norm", "hankel_nuclear_norms"]


def hankel_nuclear_norms(
    model: nn.Module, *, horizon: int | None = None, real_output: bool = False
) -> dict[str, torch.Tensor]:
    """The Hankel nuclear norm of every LTI layer of ``model``, differentiable.

    For a layer with Hankel singular values :math:`\\sigma_1 \\ge \\dots \\ge \\sigma_n`
    (:func:`compressm_core.hankel_singular_values` of its realization, square-root method),

    .. math::

        \\|G\\|_{H,*} = \\sum_{i=1}^{n} \\sigma_i = \\|L_o^H L_c\\|_*,

    summed over the systems of a layer made of a batch of them (:class:`S4D`). Gradients flow
    to the layer's parameters through its adapter's ``differentiable_state_space``, the
    closed-form Gramians of the diagonal system, their square-root factors and the singular
    values (whose gradient :math:`U V^H` needs no distinct singular values).

    Parameters
    ----------
    model : torch.nn.Module
        A model, or one layer; every submodule with a registered adapter counts
        (:func:`find_layers`).
    horizon : int, optional
        Time-limited Gramians over ``horizon`` steps; ``None`` for the infinite horizon.
    real_output : bool, optional
        HSVs of the real realization of a layer with output ``Re(C x)`` (see
        :func:`compressm_core.hankel_singular_values`).

    Returns
    -------
    dict
        ``{layer name: 0-d float64 tensor}`` on each layer's device.

    Raises
    ------
    ValueError
        ``model`` has no supported layer.
    TypeError
        A layer is selective (it has no fixed system), or its adapter has no
        ``differentiable_state_space``.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import LRU, hankel_nuclear_norms
    >>> norms = hankel_nuclear_norms(LRU(d_model=2, d_state=4))
    >>> list(norms), norms[""].requires_grad
    ([''], True)
    """
    layers = find_layers(model)
    if not layers:
        msg = f"`model` of type {type(model).__name__} has no layer with a registered adapter."
        raise ValueError(msg)
    norms = {}
    for name, layer in layers.items():
        adapter = get_adapter(layer)
        if not isinstance(adapter, LayerAdapter):
            msg = (
                f"layer {name!r} of type {type(layer).__name__} is selective: it has no fixed "
                "system, so no Hankel singular values to regularise."
            )
            raise TypeError(msg)
        if adapter.differentiable_state_space is None:
            msg = (
                f"the adapter of layer {name!r} ({type(layer).__name__}) has no "
                "`differentiable_state_space`; register one to regularise the layer."
            )
            raise TypeError(msg)
        sys = adapter.differentiable_state_space(layer)
        hsv = hankel_singular_values(sys, horizon=horizon, real_output=real_output)
        norms[name] = torch.sum(hsv)
    return norms


def hankel_nuclear_norm(
    model: nn.Module, *, horizon: int | None = None, real_output: bool = False
) -> torch.Tensor:
    """The sum over the LTI layers of ``model`` of their Hankel nuclear norms, differentiable.

    .. math::

        R(\\theta) = \\sum_{\\ell} \\sum_{i} \\sigma_i^{(\\ell)}(\\theta)

    Added to a training loss as :math:`\\mathcal{L} + \\lambda R`, it pushes the Hankel
    spectrum of every layer towards a low rank, so that a balanced truncation after training
    loses little (Hankel nuclear-norm regularisation). Each call costs, per layer, two
    Gramians in closed form, two factorisations and one SVD of size ``n`` (and their
    gradients): far more than a training step of a small model.

    Parameters
    ----------
    model : torch.nn.Module
        A model, or one layer.
    horizon, real_output : optional
        As for :func:`hankel_nuclear_norms`.

    Returns
    -------
    torch.Tensor
        A 0-d float64 tensor on the device of the first layer.

    Raises
    ------
    ValueError, TypeError
        As :func:`hankel_nuclear_norms`.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import SequenceModel, hankel_nuclear_norm
    >>> model = SequenceModel(1, 2, d_model=4, d_state=8, n_layers=2)
    >>> penalty = hankel_nuclear_norm(model)
    >>> penalty.backward()
    >>> model.blocks[0].ssm.nu_log.grad.shape
    torch.Size([8])
    """
    norms = list(hankel_nuclear_norms(model, horizon=horizon, real_output=real_output).values())
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms]).sum()
