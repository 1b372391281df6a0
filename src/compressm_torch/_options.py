"""The options of :class:`~compressm_torch.CompreSSM` and of the callbacks that build one.

The framework-free options are :class:`compressm_core.training.ReductionOptions`; the torch ones
(optimizer policy, horizon, managed layers, statistics of selective layers) are checked here, once
for the controller and both callbacks.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from compressm_core.checks import check_int
from compressm_core.training import (
    ReductionKeywords,
    ReductionOptions,
    option_parameters,
    resolve_options,
)

from .optim import POLICIES, OptimizerStatePolicy
from .selective import AGGREGATES, IMPORTANCES, Aggregate, Importance

__all__ = ["CompreSSMKeywords", "check_torch_options", "controller_parameters", "split_options"]

#: Keyword arguments of CompreSSM that a callback fills in itself.
_BUILT = ("total_steps", "options", "lr_scheduler")


class CompreSSMKeywords(ReductionKeywords, total=False):
    """The keyword options of :class:`~compressm_torch.CompreSSM` that a callback passes on."""

    optimizer_state: OptimizerStatePolicy
    horizon: int | Literal["auto"] | None
    layers: Iterable[str] | None
    importance: Importance
    aggregate: Aggregate
    calibration_steps: int
    calibration_batches: Iterable[Any] | None
    calibration_sequences: int | None


def check_torch_options(
    *,
    optimizer_state: object,
    horizon: object,
    importance: object,
    aggregate: object,
    calibration_steps: object,
    calibration_sequences: object,
    **_: object,
) -> None:
    """Check the options of :class:`~compressm_torch.CompreSSM` that
    :class:`~compressm_core.training.ReductionOptions` does not hold."""
    for name, value, allowed in (
        ("optimizer_state", optimizer_state, POLICIES),
        ("importance", importance, IMPORTANCES),
        ("aggregate", aggregate, AGGREGATES),
    ):
        if value not in allowed:
            msg = f"`{name}` must be one of {allowed}; received {value!r}."
            raise ValueError(msg)
    if horizon is not None and horizon != "auto":
        check_int(horizon, "horizon", low=1)
    check_int(calibration_steps, "calibration_steps", low=1)
    if calibration_sequences is not None:
        check_int(calibration_sequences, "calibration_sequences", low=1)


def controller_parameters() -> list[inspect.Parameter]:
    """The keyword-only parameters of :class:`~compressm_torch.CompreSSM` that a callback
    passes on (all but ``total_steps``, ``options`` and ``lr_scheduler``)."""
    from .controller import CompreSSM  # the controller imports this module

    parameters = inspect.signature(CompreSSM).parameters.values()
    return [p for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in _BUILT]


def split_options(
    options: ReductionOptions | None, keywords: Mapping[str, Any], *, owner: str
) -> tuple[ReductionOptions, dict[str, Any]]:
    """Check a callback's controller options: the framework-free ones and the torch ones.

    Parameters
    ----------
    options : ReductionOptions or None
        The framework-free options as one record.
    keywords : mapping
        Keyword arguments of :class:`~compressm_torch.CompreSSM` (framework-free options take
        precedence over ``options``).
    owner : str
        The callback, for the messages.

    Returns
    -------
    options : ReductionOptions
        The framework-free options.
    torch_options : dict
        Every other keyword option of the controller, defaults filled in.

    Raises
    ------
    TypeError
        If ``keywords`` names an option that the controller does not have.
    ValueError
        If an option is invalid.
    """
    allowed = {p.name: p.default for p in controller_parameters()}
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        msg = (
            f"Unknown CompreSSM options {unknown}; {owner} passes every keyword argument to "
            f"compressm_torch.CompreSSM, which accepts {sorted(allowed)}."
        )
        raise TypeError(msg)
    fields = {p.name for p in option_parameters()}
    resolved = resolve_options(
        options, {k: v for k, v in keywords.items() if k in fields}, owner=owner
    )
    torch_options = {k: keywords.get(k, v) for k, v in allowed.items() if k not in fields}
    check_torch_options(**torch_options)
    return resolved, torch_options
