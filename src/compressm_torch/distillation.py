"""Knowledge distillation: the loss of a student trained on a teacher's outputs."""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

__all__ = ["distillation_loss"]


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    kind: Literal["classification", "regression"] = "classification",
) -> torch.Tensor:
    """Hinton's distillation loss: the task loss mixed with a term that matches the teacher.

    Classification, with student logits :math:`s`, teacher logits :math:`t`, labels :math:`y`
    and temperature :math:`T`:

    .. math::

        \\mathcal{L} = (1 - \\alpha)\\, \\mathrm{CE}(y, s) + \\alpha\\, T^2\\,
        \\mathrm{KL}\\big(\\operatorname{softmax}(t / T) \\,\\|\\, \\operatorname{softmax}(s / T)
        \\big),

    both terms averaged over the batch (the factor :math:`T^2` keeps the gradient of the
    second term at the scale of the first). Regression, with targets :math:`y`:

    .. math::

        \\mathcal{L} = (1 - \\alpha)\\, \\mathrm{MSE}(s, y) + \\alpha\\, \\mathrm{MSE}(s, t)

    (``temperature`` is not used).

    Parameters
    ----------
    student : (batch, classes) or (batch, ...) tensor
        The student's outputs (logits for classification).
    teacher : tensor
        The teacher's outputs, same shape; no gradient flows into it.
    target : tensor
        Class indices (batch,) for classification; targets shaped like ``student`` otherwise.
    alpha : float, optional
        Weight of the distillation term, in ``[0, 1]``.
    temperature : float, optional
        Softening temperature ``T > 0`` of both softmaxes.
    kind : {"classification", "regression"}, optional
        Which loss.

    Returns
    -------
    torch.Tensor
        The 0-d loss.

    Raises
    ------
    ValueError
        ``alpha``, ``temperature`` or ``kind`` out of range, or ``student`` and ``teacher`` of
        different shapes.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import distillation_loss
    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> label = torch.tensor([0])
    >>> same = distillation_loss(logits, logits, label, alpha=1.0)   # the KL term alone
    >>> float(same)
    0.0
    """
    if not 0 <= alpha <= 1:
        msg = f"`alpha` must be in [0, 1]; received {alpha!r}."
        raise ValueError(msg)
    if not temperature > 0:
        msg = f"`temperature` must be positive; received {temperature!r}."
        raise ValueError(msg)
    if student.shape != teacher.shape:
        msg = (
            f"`student` and `teacher` must have the same shape; received "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}."
        )
        raise ValueError(msg)
    teacher = teacher.detach()
    if kind == "regression":
        return (1 - alpha) * F.mse_loss(student, target) + alpha * F.mse_loss(student, teacher)
    if kind != "classification":
        msg = f"`kind` must be 'classification' or 'regression'; received {kind!r}."
        raise ValueError(msg)
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * F.cross_entropy(student, target) + alpha * temperature**2 * soft
