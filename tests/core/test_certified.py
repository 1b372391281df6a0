"""CertifiedSchedule: loss levels, certification by the Weyl bound and by rank stability."""

from __future__ import annotations

import numpy as np
import pytest

from compressm_core.certified import CertifiedSchedule


def _schedule(**kw: object) -> CertifiedSchedule:
    opts: dict[str, object] = {
        "check_every": 10,
        "deadline": 1000,
        "window": 2,
        "num_reductions": 2,
        "learning_drop": 0.2,
    }
    opts.update(kw)
    return CertifiedSchedule(["a", "b"], **opts)  # type: ignore[arg-type]


def _feed(cs: CertifiedSchedule, losses: list[float]) -> None:
    for step, loss in enumerate(losses, start=1):
        cs.observe_loss(loss)
        if cs.is_check(step):
            cs.close_interval()


def test_learning_starts_when_the_interval_mean_falls_by_learning_drop() -> None:
    cs = _schedule()
    assert cs.learning_started is None  # no loss seen
    _feed(cs, [2.3] * 10)
    assert cs.initial_loss == pytest.approx(2.3)
    assert cs.learning_started is False
    _feed(cs, [1.9] * 10)  # 17 % below: not yet
    assert cs.learning_started is False
    assert cs.recent_loss == pytest.approx(1.9)
    _feed(cs, [1.8] * 10)  # 22 % below
    assert cs.learning_started is True
    _feed(cs, [2.3] * 10)  # once started, it stays started
    assert cs.learning_started is True


def test_chance_loss_is_the_reference_of_the_learning_test() -> None:
    cs = _schedule(chance_loss=2.0)
    assert cs.learning_started is None
    _feed(cs, [3.1] * 10 + [2.05] * 10)  # the fall to the chance level is not learning
    assert cs.initial_loss == pytest.approx(3.1)
    assert cs.reference_loss == pytest.approx(2.0)
    assert cs.learning_started is False
    _feed(cs, [1.65] * 10)  # 17.5 % below chance: not yet
    assert cs.learning_started is False
    _feed(cs, [1.55] * 10)  # 22.5 % below chance
    assert cs.learning_started is True
    # without it the same losses count as learning at the second interval
    other = _schedule()
    _feed(other, [3.1] * 10 + [2.05] * 10)
    assert other.learning_started is True


def test_chance_loss_counts_from_the_first_interval() -> None:
    cs = _schedule(chance_loss=2.3)
    _feed(cs, [0.5] * 10)  # e.g. a pretrained model: below chance from the start
    assert cs.learning_started is True


def test_non_finite_intervals_are_ignored() -> None:
    cs = _schedule()
    _feed(cs, [float("nan")] * 10)
    assert cs.initial_loss is None
    _feed(cs, [2.0] * 10)
    assert cs.initial_loss == pytest.approx(2.0)


def test_checks_stop_at_the_deadline() -> None:
    cs = _schedule(deadline=30)
    assert [s for s in range(1, 60) if cs.is_check(s)] == [10, 20]


def test_weyl_certificate_needs_window_updates_with_margin() -> None:
    cs = _schedule(rank_rtol=0.0)
    hsv = np.array([3.0, 1.0, 0.01])
    # gap at rank 2 is 0.99; each update's bound 0.2 accumulates: margin 0.99 - 2 * 0.2k
    got = [cs.update("a", hsv, rank=2, bound=None if k == 0 else 0.2) for k in range(3)]
    assert [t for t, _ in got] == [None, None, "certified"]
    assert got[2][1] == pytest.approx(0.99 - 2 * 0.4)
    # a bound that eats the margin re-anchors the cut: the Weyl certificate is lost (the rank
    # itself has not moved over window + 1 checks, so the rank criterion still holds)
    trigger, margin = cs.update("a", hsv, rank=2, bound=0.3)
    assert trigger == "stable"
    assert margin == pytest.approx(0.99)
    assert not cs.trackers["a"].certified(2, 2)


def test_rank_stability_fires_when_the_bound_is_loose() -> None:
    cs = _schedule(rank_rtol=0.1)
    hsv = np.linspace(10.0, 1.0, 30)
    ranks = [20, 19, 20, 20]
    got = [
        cs.update("a", hsv, rank=r, bound=None if k == 0 else 100.0)[0]
        for k, r in enumerate(ranks)
    ]
    assert got == [None, None, "stable", "stable"]
    cs2 = _schedule(rank_rtol=0.1)
    drifting = [cs2.update("a", hsv, rank=r, bound=1.0)[0] for r in (20, 17, 14, 11)]
    assert drifting == [None, None, None, None]


def test_selective_layers_need_the_same_kept_set() -> None:
    cs = _schedule()
    hsv = np.array([3.0, 2.0, 1.0])
    outs = [cs.update("a", hsv, rank=2, bound=None, kept=k)[0] for k in [(0, 1), (0, 2)]]
    assert outs == [None, None]
    outs = [cs.update("a", hsv, rank=2, bound=None, kept=(0, 2))[0] for _ in range(2)]
    assert outs == [None, "stable"]


def test_cut_resets_and_counts() -> None:
    cs = _schedule(rank_rtol=0.5)
    hsv = np.array([3.0, 1.0, 0.01])
    for _ in range(3):
        cs.update("a", hsv, rank=2, bound=0.0)
    cs.cut("a")
    assert cs.remaining("a") == 1
    assert cs.remaining("b") == 2
    assert cs.update("a", hsv, rank=2, bound=None)[0] is None
    cs.exhaust("b")
    assert cs.remaining("b") == 0


def test_combine_pools_the_interval_with_other_processes() -> None:
    # another process's interval: 10 losses summing to 10.0 (mean 1.0)
    seen: list[list[float]] = []

    def combine(values: list[float]) -> list[float]:
        seen.append(list(values))
        return [values[0] + 10.0, values[1] + 10]

    cs = _schedule()
    for _ in range(10):
        cs.observe_loss(3.0)
    cs.close_interval(combine)
    assert seen == [[30.0, 10.0]]
    assert cs.initial_loss == pytest.approx(2.0)  # the mean of both processes
    cs.close_interval(combine)  # no loss here: combined all the same (a collective)
    assert seen[-1] == [0.0, 0.0]
    assert cs.recent_loss == pytest.approx(1.0)
    assert cs.learning_started is True


def test_state_dict_round_trip() -> None:
    cs = _schedule()
    _feed(cs, [2.3] * 10 + [1.0] * 5)
    cs.update("a", np.array([3.0, 1.0, 0.5]), rank=2, bound=None)
    cs.cut("b")
    other = _schedule()
    other.load_state_dict(cs.state_dict())
    assert other.state_dict() == cs.state_dict()
    for _ in range(5):  # the restored interval holds 5 losses; 5 more close it
        other.observe_loss(1.0)
    other.close_interval()
    assert other.learning_started is True


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("learning_drop", 0.0, "`learning_drop` must be a number in \\(0, 1\\)"),
        ("learning_drop", 1.5, "`learning_drop`"),
        ("rank_rtol", 1.0, "`rank_rtol` must be a number in \\[0, 1\\)"),
        ("check_every", 0, "`check_every`"),
        ("window", 0, "`certify_window`"),
        ("chance_loss", 0.0, "`chance_loss` must be a positive number or None"),
        ("chance_loss", float("nan"), "`chance_loss`"),
        ("chance_loss", True, "`chance_loss`"),
    ],
)
def test_bad_options_name_the_argument(option: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _schedule(**{option: value})
