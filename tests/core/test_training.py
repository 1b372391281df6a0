"""ReductionOptions: defaults, checks, immutability, and the controllers' signatures."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import typing
from typing import Any

import numpy as np
import pytest

from compressm_core.training import (
    MODES,
    SCHEDULES,
    SELECTIONS,
    ControllerBase,
    Mode,
    ReductionOptions,
    Schedule,
    Selection,
)

DEFAULTS = {
    "tau": 0.1,
    "mode": "tolerance",
    "warmup_fraction": 0.1,
    "num_reductions": 4,
    "reduction_steps": None,
    "fraction": 0.1,
    "selection": "largest",
    "gate": 0.95,
    "min_rank": 1,
    "method": "sqrt",
    "real_output": False,
    "energy": "sum",
    "rollback_rtol": 0.02,
    "metric": "max",
    "compute_error": False,
    "seed": 0,
    "schedule": "steps",
    "check_every": None,
    "certify_window": 3,
    "learning_drop": 0.2,
    "chance_loss": None,
    "rank_rtol": 0.1,
    "rewarmup_steps": 0,
    "max_cut": None,
    "max_bound": None,
}


def _field_defaults() -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(ReductionOptions)}


# -- the record -----------------------------------------------------------------------------


def test_defaults() -> None:
    assert _field_defaults() == DEFAULTS
    assert dataclasses.asdict(ReductionOptions()) == DEFAULTS


def test_vocabularies_match_their_literals() -> None:
    assert typing.get_args(Mode) == MODES == ("tolerance", "fixed", "pragmatic")
    assert typing.get_args(Selection) == SELECTIONS == ("largest", "smallest", "random")
    assert typing.get_args(Schedule) == SCHEDULES == ("steps", "certified")


def test_controller_base_is_public() -> None:
    from compressm_core import _controller

    assert ControllerBase is _controller.ControllerBase


def test_frozen_keyword_only_and_hashable() -> None:
    options = ReductionOptions(tau=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tau = 0.3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ReductionOptions(0.2)  # type: ignore[misc]
    assert options == ReductionOptions(tau=0.2)
    assert hash(options) == hash(ReductionOptions(tau=0.2))
    assert dataclasses.replace(options, mode="fixed").tau == 0.2


def test_values_are_normalised() -> None:
    options = ReductionOptions(
        tau=np.float64(0.25),
        min_rank=np.int64(2),
        reduction_steps=[np.int64(10), 5],
        check_every=np.int32(7),
    )
    assert type(options.tau) is float
    assert type(options.min_rank) is int
    assert type(options.check_every) is int
    assert options.reduction_steps == (10, 5)
    assert all(type(s) is int for s in options.reduction_steps)
    assert options == ReductionOptions(
        tau=0.25, min_rank=2, reduction_steps=(10, 5), check_every=7
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tau": 1.0}, ValueError, r"`tau` must be a float in \[0, 1\); received 1.0"),
        ({"tau": "0.1"}, ValueError, r"`tau` must be a float in \[0, 1\)"),
        ({"tau": True}, ValueError, "`tau`"),
        ({"fraction": -0.1}, ValueError, r"`fraction` must be a float in \[0, 1\)"),
        ({"gate": 1.5}, ValueError, r"`gate` must be a float in \[0, 1\]"),
        ({"rollback_rtol": -1}, ValueError, r"`rollback_rtol` must be a float in \[0, 1\]"),
        ({"min_rank": 0}, ValueError, "`min_rank` must be an int >= 1; received 0"),
        ({"min_rank": 1.0}, ValueError, "`min_rank` must be an int >= 1"),
        ({"mode": "greedy"}, ValueError, "`mode` must be one of"),
        ({"selection": "best"}, ValueError, "`selection` must be one of"),
        ({"method": "svd"}, ValueError, "`method` must be one of"),
        ({"energy": "cubed"}, ValueError, "`energy` must be one of"),
        ({"metric": "mean"}, ValueError, "`metric` must be one of"),
        ({"schedule": "weekly"}, ValueError, "`schedule` must be one of"),
        (
            {"selection": "random", "real_output": True},
            ValueError,
            "`selection='random'` keeps modal states; it excludes `real_output=True`",
        ),
        (
            {"schedule": "certified", "mode": "pragmatic"},
            ValueError,
            "`schedule='certified'` works with mode 'tolerance' or 'fixed'",
        ),
        (
            {"schedule": "certified", "reduction_steps": [5]},
            ValueError,
            "`reduction_steps` is an explicit schedule; it excludes `schedule='certified'`",
        ),
        ({"rewarmup_steps": -1}, ValueError, "`rewarmup_steps` must be an int >= 0"),
        ({"max_cut": 0.0}, ValueError, "`max_cut` must be None or a number in"),
        ({"max_bound": 0.0}, ValueError, "`max_bound` must be None or a finite number > 0"),
        ({"max_bound": float("inf")}, ValueError, "`max_bound` must be None or a finite"),
        ({"max_bound": True}, ValueError, "`max_bound` must be None or a finite"),
        ({"check_every": 0}, ValueError, "`check_every` must be in"),
        ({"check_every": 2.5}, TypeError, "`check_every` must be an integer"),
        ({"certify_window": 0}, ValueError, "`certify_window` must be in"),
        ({"num_reductions": 0}, ValueError, "`num_reductions` must be in"),
        ({"num_reductions": "4"}, TypeError, "`num_reductions` must be an integer"),
        ({"learning_drop": 1.0}, ValueError, r"`learning_drop` must be a number in \(0, 1\)"),
        ({"learning_drop": 0}, ValueError, "`learning_drop`"),
        ({"rank_rtol": 1}, ValueError, r"`rank_rtol` must be a number in \[0, 1\)"),
        ({"chance_loss": -1.0}, ValueError, "`chance_loss` must be a positive number or None"),
        ({"chance_loss": float("inf")}, ValueError, "`chance_loss`"),
        ({"chance_loss": "2.3"}, TypeError, "`chance_loss` must be a positive number"),
        ({"warmup_fraction": 0}, ValueError, r"`warmup_fraction` must be in \(0, 1\]"),
        ({"warmup_fraction": 1.5}, ValueError, "`warmup_fraction`"),
        ({"reduction_steps": [3, 0]}, ValueError, r"`reduction_steps\[i\]` must be an int >= 1"),
    ],
)
def test_invalid_options_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ReductionOptions(**kwargs)


def test_warmup_fraction_is_unused_and_unchecked_with_explicit_steps() -> None:
    assert ReductionOptions(reduction_steps=[3], warmup_fraction=2.0).warmup_fraction == 2.0


def test_check_every_none_and_edges_are_accepted() -> None:
    options = ReductionOptions(
        tau=0.0, fraction=0.0, gate=1.0, rollback_rtol=0.0, warmup_fraction=1.0, rank_rtol=0.0
    )
    assert options.check_every is None
    assert options.gate == 1.0


# -- the controllers' signatures ------------------------------------------------------------


def _signature_defaults(obj: Any) -> dict[str, object]:
    return {n: p.default for n, p in inspect.signature(obj).parameters.items()}


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


TARGETS = [
    pytest.param(
        "compressm_torch",
        "CompreSSM",
        marks=pytest.mark.skipif(not _has("torch"), reason="torch is not installed"),
        id="torch",
    ),
    pytest.param(
        "compressm_jax",
        "CompreSSM",
        marks=pytest.mark.skipif(not _has("jax", "flax"), reason="jax/flax is not installed"),
        id="jax",
    ),
    pytest.param(
        "compressm_torch.lightning",
        "CompreSSMCallback",
        marks=pytest.mark.skipif(
            not _has("torch", "lightning"), reason="lightning is not installed"
        ),
        id="lightning",
    ),
]


@pytest.mark.parametrize(("module", "name"), TARGETS)
def test_signature_exposes_every_option_with_its_default(module: str, name: str) -> None:
    cls = getattr(importlib.import_module(module), name)
    params = inspect.signature(cls).parameters
    defaults = _signature_defaults(cls)
    missing = sorted(set(DEFAULTS) - set(defaults))
    assert not missing, f"{module}.{name} lacks {missing}"
    assert {n: defaults[n] for n in DEFAULTS} == _field_defaults()
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in DEFAULTS)


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_torch_controller_keeps_its_options() -> None:
    import torch

    from compressm_torch import LRU, CompreSSM

    model = torch.nn.Sequential(LRU(2, 8))
    ctl = CompreSSM(model, None, total_steps=50, mode="fixed", reduction_steps=[20, 10, 20])
    assert ctl.options == ReductionOptions(mode="fixed", reduction_steps=(20, 10, 20))
    assert ctl.schedule == [10, 20]
    assert (ctl.mode, ctl.tau, ctl.gate) == ("fixed", 0.1, 0.95)


@pytest.mark.skipif(not _has("torch", "lightning"), reason="lightning is not installed")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer_state": "keep"}, "`optimizer_state` must be one of"),
        ({"importance": "magic"}, "`importance` must be one of"),
        ({"aggregate": "max"}, "`aggregate` must be one of"),
        ({"horizon": 0}, "`horizon` must be an int >= 1"),
        ({"calibration_steps": 0}, "`calibration_steps` must be an int >= 1"),
        ({"calibration_sequences": 0}, "`calibration_sequences` must be an int >= 1"),
        ({"learning_drop": 2.0}, "`learning_drop`"),
    ],
)
def test_callback_checks_its_options_at_construction(kwargs: dict[str, Any], match: str) -> None:
    from compressm_torch.lightning import CompreSSMCallback

    with pytest.raises(ValueError, match=match):
        CompreSSMCallback(**kwargs)


@pytest.mark.skipif(not _has("torch", "lightning"), reason="lightning is not installed")
def test_callback_stores_the_record() -> None:
    from compressm_torch.lightning import CompreSSMCallback

    callback = CompreSSMCallback(tau=0.2, reduction_steps=[4, 8], horizon="auto")
    assert callback.options == ReductionOptions(tau=0.2, reduction_steps=(4, 8))


# -- one record, given whole or by keyword -------------------------------------------------


def test_resolve_options_merges_keywords_over_the_record() -> None:
    from compressm_core.training import resolve_options

    record = ReductionOptions(tau=0.2, mode="fixed")
    assert resolve_options(record, {}, owner="C") is record
    assert resolve_options(record, {"fraction": 0.5}, owner="C") == ReductionOptions(
        tau=0.2, mode="fixed", fraction=0.5
    )
    assert resolve_options(None, {}, owner="C") == ReductionOptions()
    with pytest.raises(TypeError, match=r"C\(\) got an unexpected keyword argument 'tua'"):
        resolve_options(None, {"tua": 0.1}, owner="C")
    with pytest.raises(TypeError, match="`options` must be a compressm_core.training"):
        resolve_options({"tau": 0.1}, {}, owner="C")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`tau`"):
        resolve_options(record, {"tau": 2.0}, owner="C")


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_torch_controller_takes_the_record() -> None:
    import torch

    from compressm_torch import LRU, CompreSSM

    model = torch.nn.Sequential(LRU(2, 8))
    record = ReductionOptions(mode="fixed", fraction=0.5, reduction_steps=(3,))
    ctl = CompreSSM(model, None, total_steps=10, options=record, gate=0.9)
    assert ctl.options == dataclasses.replace(record, gate=0.9)
    assert (ctl.schedule, ctl.gate) == ([3], 0.9)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tua'"):
        CompreSSM(model, None, total_steps=10, tua=0.1)  # type: ignore[call-arg]


@pytest.mark.skipif(not _has("jax", "flax"), reason="jax/flax is not installed")
def test_jax_controller_takes_the_record() -> None:
    from flax import nnx

    from compressm_jax import LRU, CompreSSM

    record = ReductionOptions(mode="fixed", fraction=0.5, reduction_steps=(1,))
    ctl = CompreSSM(LRU(2, 8, rngs=nnx.Rngs(0)), None, total_steps=10, options=record)
    assert ctl.options is record
    ctl.step()
    assert ctl.state_sizes == {"": 4}


@pytest.mark.skipif(not _has("torch", "lightning"), reason="lightning is not installed")
def test_callback_takes_the_record_and_checks_pragmatic_mode_in_it() -> None:
    from compressm_torch.lightning import CompreSSMCallback

    record = ReductionOptions(tau=0.3)
    assert CompreSSMCallback(options=record, rank_rtol=0.2).options == dataclasses.replace(
        record, rank_rtol=0.2
    )
    with pytest.raises(ValueError, match="`monitor`"):
        CompreSSMCallback(options=ReductionOptions(mode="pragmatic"))
    with pytest.raises(TypeError, match=r"Unknown CompreSSM options \['tua'\]"):
        CompreSSMCallback(tua=0.1)  # type: ignore[call-arg]
