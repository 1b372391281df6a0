"""The certified schedule, cut triggers and the learning-rate re-warm-up (torch controller)."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")

from compressm_torch import CompreSSM, ReductionWarning, SequenceModel  # noqa: E402


def make(seed: int = 0, d_state: int = 32) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(2, 3, d_model=8, d_state=d_state, n_layers=1)


def run(ctl: CompreSSM, losses: list[float | None]) -> list:
    events = []
    for loss in losses:
        events += [e for e in ctl.step(loss=loss) if e.status == "reduced"]
    return events


OPTS = {
    "total_steps": 400,
    "schedule": "certified",
    "mode": "fixed",
    "fraction": 0.5,
    "check_every": 10,
    "certify_window": 2,
    "num_reductions": 2,
    "warmup_fraction": 0.5,
}


def test_waits_for_learning_then_cuts_when_certified() -> None:
    model = make()
    ctl = CompreSSM(model, None, **OPTS)  # parameters do not move: the Weyl bound is 0
    events = run(ctl, [2.3] * 30 + [1.0] * 100)
    # checks at 10 (initial loss), 20, 30 (not started), 40 (started: reference), 50, 60
    assert [(e.step, e.old_rank, e.new_rank, e.trigger) for e in events] == [
        (60, 32, 16, "certified"),
        (90, 16, 8, "certified"),
    ]
    assert all(e.loss == pytest.approx(1.0) for e in events)
    assert all(e.margin is not None and e.margin > 0 for e in events)
    assert run(ctl, [1.0] * 200) == []  # num_reductions reached; the deadline adds nothing


def test_deadline_forces_the_remaining_cuts_and_warns() -> None:
    ctl = CompreSSM(make(), None, **OPTS)
    with pytest.warns(ReductionWarning, match=r"has not fallen by `learning_drop`=0.2"):
        events = run(ctl, [2.3] * 200)
    assert [(e.step, e.new_rank, e.trigger) for e in events] == [
        (200, 16, "deadline"),
        (200, 8, "deadline"),
    ]


def test_chance_loss_waits_past_a_fall_to_the_chance_level() -> None:
    ctl = CompreSSM(make(), None, chance_loss=2.0, **OPTS)
    with pytest.warns(ReductionWarning, match=r"below `chance_loss` \(2\)"):
        events = run(ctl, [3.1] * 10 + [2.05] * 190)  # a plateau at chance after a quick fall
    assert [(e.step, e.trigger) for e in events] == [(200, "deadline"), (200, "deadline")]
    ctl = CompreSSM(make(), None, chance_loss=2.0, **OPTS)
    events = run(ctl, [3.1] * 10 + [2.05] * 30 + [1.0] * 100)
    # learning is seen at check 50 (the interval 41-50 below 0.8 x 2.0): certified two checks on
    assert [(e.step, e.trigger) for e in events] == [(70, "certified"), (100, "certified")]


def test_without_a_loss_the_certificate_alone_decides() -> None:
    ctl = CompreSSM(make(), None, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        events = run(ctl, [None] * 40)
    assert [(e.step, e.trigger) for e in events] == [(30, "certified")]
    assert events[0].loss is None


def test_fixed_steps_warn_when_learning_has_not_started() -> None:
    ctl = CompreSSM(make(), None, total_steps=100, reduction_steps=[20], check_every=10)
    with pytest.warns(ReductionWarning, match="Reduction at step 20 \\(scheduled\\)"):
        events = run(ctl, [2.3] * 20)
    assert events[0].trigger == "scheduled"
    ctl = CompreSSM(make(), None, total_steps=100, reduction_steps=[20], check_every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(ctl, [2.3] * 10 + [1.0] * 10)[0].loss == pytest.approx(1.0)


def test_certified_schedule_trains_a_real_model() -> None:
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = CompreSSM(model, opt, total_steps=300, schedule="certified", warmup_fraction=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, 2, generator=g)
    y = (x[:, :, 0].mean(1) > 0).long()
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step(loss=loss.detach())
    reduced = [e for e in ctl.history if e.status == "reduced"]
    assert reduced
    assert all(e.trigger in ("certified", "stable", "deadline") for e in reduced)
    assert all(e.step <= 150 for e in reduced)
    assert math.isfinite(float(loss.detach()))
    state = ctl.state_dict()
    other = CompreSSM(model, opt, total_steps=300, schedule="certified", warmup_fraction=0.5)
    other.load_state_dict(state)
    assert other.certify.state_dict() == ctl.certify.state_dict()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"schedule": "weekly"}, "`schedule` must be one of"),
        ({"schedule": "certified", "mode": "pragmatic"}, "works with mode 'tolerance'"),
        ({"schedule": "certified", "reduction_steps": [5]}, "excludes `schedule='certified'`"),
        ({"rewarmup_steps": -1}, "`rewarmup_steps` must be an int >= 0"),
        ({"learning_drop": 1.0}, "`learning_drop` must be a number in \\(0, 1\\)"),
    ],
)
def test_bad_options(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CompreSSM(make(), None, total_steps=100, **kw)


def _lrs(schedulers: str, rewarmup: int, steps: int = 14) -> tuple[list[float], list[float]]:
    """Learning rates seen by ``optimizer.step`` and the scheduler's own, per update."""
    model = make(d_state=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    if schedulers == "exponential":  # chainable: computes the next lr from group["lr"]
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    else:
        sched = torch.optim.lr_scheduler.ChainedScheduler(
            [
                torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
                torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95),
            ]
        )
    ctl = CompreSSM(
        model,
        opt,
        total_steps=steps,
        reduction_steps=[4],
        mode="fixed",
        fraction=0.5,
        rewarmup_steps=rewarmup,
        lr_scheduler=sched,
    )
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    own: list[float] = []
    x = torch.randn(4, 8, 2)
    for _ in range(steps):
        own.append(sched.get_last_lr()[0])
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ctl.step()
    return seen, own


@pytest.mark.parametrize("schedulers", ["exponential", "chained"])
def test_rewarmup_scales_the_next_updates_and_leaves_the_scheduler_alone(schedulers: str) -> None:
    seen, own = _lrs(schedulers, rewarmup=3)
    plain_seen, plain_own = _lrs(schedulers, rewarmup=0)
    assert own == pytest.approx(plain_own, rel=1e-12)  # the scheduler's values are untouched
    assert plain_seen == pytest.approx(plain_own, rel=1e-12)
    # the cut is at controller step 4: updates 5, 6, 7 get 1/4, 2/4, 3/4, then 1
    factors = [1.0] * 4 + [0.25, 0.5, 0.75] + [1.0] * 7
    assert seen == pytest.approx([f * lr for f, lr in zip(factors, own, strict=True)], rel=1e-12)


@pytest.mark.parametrize(
    ("kw", "sizes"),
    [
        ({"mode": "fixed", "fraction": 0.9}, [16, 8, 4]),  # 90 % asked, half allowed
        ({"tau": 0.99}, [16, 8, 4]),
        ({"mode": "fixed", "fraction": 0.25}, [24, 18, 13]),  # below the cap: unchanged
    ],
)
def test_max_cut_floors_each_event(kw: dict, sizes: list[int]) -> None:
    ctl = CompreSSM(make(), None, total_steps=100, reduction_steps=[1, 2, 3], max_cut=0.5, **kw)
    got = [e.new_rank for e in run(ctl, [None] * 3)]
    assert got == sizes


@pytest.mark.parametrize("value", [0.0, 1.5, True, "half"])
def test_max_cut_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"`max_cut` must be None or a number in \(0, 1\]"):
        CompreSSM(make(), None, total_steps=100, max_cut=value)


@pytest.mark.parametrize("limit", [0.3, 1.0, 4.0])
def test_max_bound_floors_each_event_at_the_smallest_rank_within_the_bound(limit: float) -> None:
    """Each event keeps the smallest rank whose bound ``2 sum_{i > r} sigma_i`` is at most
    ``limit sigma_1`` (or more, if the rule asks for more): checked on the event's own HSVs."""
    ctl = CompreSSM(
        make(),
        None,
        total_steps=100,
        reduction_steps=[1, 2, 3],
        mode="fixed",
        fraction=0.9,
        max_bound=limit,
        gate=1.0,
    )
    events = run(ctl, [None] * 3)
    assert events
    for event in events:
        hsv = sorted(event.hsv, reverse=True)
        tail = [sum(hsv[r:]) for r in range(1, len(hsv) + 1)]  # tail[r - 1] = sum_{i > r}
        fits = [r for r in range(1, len(hsv) + 1) if 2 * tail[r - 1] <= limit * hsv[0]]
        asked = math.floor(event.old_rank * (1 - 0.9))
        assert event.new_rank == max(asked, fits[0])
        assert event.error_bound <= limit * hsv[0] * (1 + 1e-9) or event.new_rank == asked
    unbounded = CompreSSM(
        make(), None, total_steps=100, reduction_steps=[1], mode="fixed", fraction=0.9, gate=1.0
    )
    assert run(unbounded, [None])[0].new_rank == 3  # the rule alone: floor(32 * 0.1)
    strict = CompreSSM(
        make(), None, total_steps=100, reduction_steps=[1], fraction=0.9, max_bound=1e-12
    )
    assert run(strict, [None]) == []  # no state can go within the bound: nothing is cut


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, True, "1"])
def test_max_bound_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"`max_bound` must be None or a finite number > 0"):
        CompreSSM(make(), None, total_steps=100, max_bound=value)


def test_selective_layers_are_cut_when_their_kept_states_are_stable() -> None:
    from compressm_torch import Mamba

    torch.manual_seed(0)
    model = torch.nn.Sequential(Mamba(8, 12), torch.nn.Linear(8, 1))
    ctl = CompreSSM(
        model,
        None,
        total_steps=400,
        schedule="certified",
        mode="fixed",
        fraction=0.5,
        check_every=10,
        certify_window=2,
        num_reductions=1,
        warmup_fraction=0.5,
        calibration_steps=2,
    )
    x = torch.randn(4, 10, 8, generator=torch.Generator().manual_seed(1))
    events = []
    for step in range(1, 81):
        with torch.no_grad():
            model(x)  # the recorder is active in the 2 steps before each check
        events += [e for e in ctl.step(loss=2.3 if step <= 10 else 1.0) if e.status == "reduced"]
    # checks at 20 (started: first kept set), 30, 40: the same set three times -> cut at 40
    assert [(e.step, e.old_rank, e.new_rank, e.trigger) for e in events] == [(40, 12, 6, "stable")]
    assert model[0].d_state == 6
