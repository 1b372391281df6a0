"""Weyl perturbation bounds (Lemma 3.1), ranking certificates and the rank tracker."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressm_core import (
    DiagonalStateSpace,
    ShapeError,
    StabilityError,
    StateSpace,
    hankel_singular_values,
)
from compressm_core.perturbation import (
    RankingCertificate,
    RankTracker,
    hankel_operator,
    hsv_a_priori_bound,
    hsv_perturbation_bound,
    ranking_certificate,
)
from tests._helpers import (
    Spec,
    assert_rel,
    backend_settings,
    build,
    dense_np,
    herm,
    specs,
    to_np,
    to_xp,
)


def _perturb(sys: Any, log_eps: float, seed: int) -> Any:
    """A nearby stable system: relative changes of size ``10**log_eps`` in every parameter."""
    eps = 10.0**log_eps
    rng = np.random.default_rng(seed)
    complex_ = np.iscomplexobj(sys.b)

    def noise(shape: tuple[int, ...]) -> np.ndarray:
        x = rng.uniform(-1.0, 1.0, size=shape)
        return x + 1j * rng.uniform(-1.0, 1.0, size=shape) if complex_ else x

    b = sys.b + eps * np.abs(sys.b).max() * noise(sys.b.shape)
    c = sys.c + eps * np.abs(sys.c).max() * noise(sys.c.shape)
    if isinstance(sys, DiagonalStateSpace):
        margin = 1.0 - np.abs(sys.poles)  # |l'| <= |l| + eps (1 - |l|) / sqrt(2) < 1
        poles = sys.poles + eps * margin * noise(sys.poles.shape) / np.sqrt(2)
        return sys._replace(poles=poles, b=b, c=c)
    a = sys.a
    step = eps * noise(a.shape) / np.sqrt(a.shape[-1])
    while np.abs(np.linalg.eigvals(a + step)).max() >= 1.0:
        step = step / 2
    return sys._replace(a=a + step, b=b, c=c)


def _movement(before: Any, after: Any, *, real_output: bool) -> tuple[np.ndarray, np.ndarray]:
    """``max_i |sigma_i' - sigma_i|`` and ``sigma_1`` (NumPy reference, square-root method)."""
    h0 = hankel_singular_values(to_np(before), real_output=real_output)
    h1 = hankel_singular_values(to_np(after), real_output=real_output)
    return np.abs(h1 - h0).max(axis=-1), h0[..., 0]


def _slack(sigma_1: np.ndarray) -> np.ndarray:
    """Rounding allowance: the computed operators are exact only to a small multiple of eps."""
    return 1e-10 * sigma_1


# ---------------------------------------------------------------------------------------------
# The Hermitian operator H
# ---------------------------------------------------------------------------------------------


def test_hankel_operator_is_hermitian_psd_with_the_hsvs_as_spectrum(xp) -> None:
    @backend_settings(xp)
    @given(specs(max_n=6), st.sampled_from([None, 7]))
    def check(spec: Spec, horizon: int | None) -> None:
        sys = build(spec)
        for real_output in (False, True) if spec.complex_ else (False,):
            h = to_np(hankel_operator(to_xp(sys, xp), horizon=horizon, real_output=real_output))
            n = 2 * spec.n if real_output else spec.n
            assert h.shape == (*spec.batch, n, n)
            assert np.iscomplexobj(h) == (spec.complex_ and not real_output)
            hsv = to_np(hankel_singular_values(sys, horizon=horizon, real_output=real_output))
            assert_rel(h, herm(h), 1e-14, scale=float(hsv.max()))
            eigenvalues = np.linalg.eigvalsh(h)[..., ::-1]
            assert np.all(eigenvalues >= -1e-12 * hsv.max())
            assert_rel(eigenvalues, hsv, 1e-7)

    check()


def test_hankel_operator_moves_with_coordinates_but_its_spectrum_does_not(xp) -> None:
    a, b, c, d = dense_np(build(Spec(5, 2, 2, 0.9, True, False, (), 3)))
    t = np.eye(5) + 0.5 * np.random.default_rng(0).normal(size=(5, 5))
    t_inv = np.linalg.inv(t)
    sys, moved = StateSpace(a, b, c, d), StateSpace(t_inv @ a @ t, t_inv @ b, c @ t, d)
    h, h_moved = (to_np(hankel_operator(to_xp(s, xp))) for s in (sys, moved))
    assert np.abs(h_moved - h).max() > 1e-3 * np.abs(h).max()
    assert_rel(np.linalg.eigvalsh(h_moved), np.linalg.eigvalsh(h), 1e-8)


# ---------------------------------------------------------------------------------------------
# Weyl's bound (Lemma 3.1) and the a-priori bound
# ---------------------------------------------------------------------------------------------


def test_weyl_bound_holds_for_parameter_perturbations(xp) -> None:
    @backend_settings(xp)
    @given(specs(max_n=6), st.floats(-6.0, -0.5), st.booleans())
    def check(spec: Spec, log_eps: float, real_output: bool) -> None:
        before = build(spec)
        after = _perturb(before, log_eps, spec.seed + 1)
        bound = to_np(
            hsv_perturbation_bound(to_xp(before, xp), to_xp(after, xp), real_output=real_output)
        )
        assert bound.shape == spec.batch
        assert np.all(bound >= 0)
        move, sigma_1 = _movement(before, after, real_output=real_output)
        assert np.all(move <= bound + _slack(sigma_1)), (move, bound)
        if spec.diagonal:
            a_priori = to_np(
                hsv_a_priori_bound(to_xp(before, xp), to_xp(after, xp), real_output=real_output)
            )
            assert a_priori.shape == spec.batch
            assert np.all(move <= a_priori * (1 + 1e-9) + _slack(sigma_1)), (move, a_priori)

    check()


def test_weyl_bound_is_zero_for_equal_systems_and_broadcasts(xp) -> None:
    sys = build(Spec(4, 2, 1, 0.95, True, True, (3,), 5))
    one = DiagonalStateSpace(sys.poles[0], sys.b[0], sys.c[0], sys.d[0])
    bound = to_np(hsv_perturbation_bound(to_xp(sys, xp), to_xp(one, xp)))
    assert bound.shape == (3,)
    assert bound[0] <= 1e-12 * hankel_singular_values(one)[0]
    assert np.all(bound[1:] > 0)


def test_a_priori_bound_grows_near_the_unit_circle() -> None:
    """Equal pole moves cost more when the poles are close to the unit circle."""
    b, c = np.ones((1, 1)), np.ones((1, 1))
    bounds = []
    for radius in (0.5, 0.9, 0.99):
        before = DiagonalStateSpace(np.array([radius]), b, c)
        after = before._replace(poles=np.array([radius - 1e-4]))
        hsv = hankel_singular_values(before)[0]
        bounds.append(float(hsv_a_priori_bound(before, after)) / hsv)
        move, _ = _movement(before, after, real_output=False)
        assert move <= bounds[-1] * hsv
    assert bounds[0] < bounds[1] < bounds[2]


def test_bounds_hold_along_lru_gradient_steps() -> None:
    """Adam on a toy task with an LRU-parameterised layer: every step obeys both bounds."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    dt = torch.float64
    n, length, batch, steps = 8, 32, 16, 30

    def uniform(low: float, high: float, *shape: int) -> Any:
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=dt)

    modulus, phase = uniform(0.8, 0.99, n), uniform(0.1, 3.0, n)
    params = {
        "nu": torch.log(-torch.log(modulus)),
        "theta": torch.log(phase),
        "b_re": torch.randn(n, 1, generator=gen, dtype=dt) / 2**0.5,
        "b_im": torch.randn(n, 1, generator=gen, dtype=dt) / 2**0.5,
        "c_re": torch.randn(1, n, generator=gen, dtype=dt) / n**0.5,
        "c_im": torch.randn(1, n, generator=gen, dtype=dt) / n**0.5,
    }
    for p in params.values():
        p.requires_grad_(True)

    def system() -> DiagonalStateSpace:
        poles = torch.exp(torch.complex(-torch.exp(params["nu"]), torch.exp(params["theta"])))
        b = torch.complex(params["b_re"], params["b_im"])
        c = torch.complex(params["c_re"], params["c_im"])
        return DiagonalStateSpace(poles, b, c)

    def toeplitz(kernel: Any) -> Any:
        k = torch.arange(length)
        lag = k[:, None] - k[None, :]
        return torch.where(lag >= 0, kernel[lag.clamp(min=0)], torch.zeros((), dtype=dt))

    j = torch.arange(length, dtype=dt)
    teacher = toeplitz(torch.where(j > 0, 0.9**j * torch.cos(0.7 * j) + 0.5 * 0.6**j, 0.0))
    u = torch.randn(batch, length, generator=gen, dtype=dt)
    target = u @ teacher.T
    optimizer = torch.optim.Adam(params.values(), lr=0.05)

    def detached() -> DiagonalStateSpace:
        return DiagonalStateSpace(*(f.detach() for f in system()[:3]))

    tracker = RankTracker()
    previous = detached()
    tracker.update(hankel_singular_values(previous, real_output=True))
    losses, tightness = [], []
    for _ in range(steps):
        poles, b, c, _ = system()
        powers = poles[None, :] ** torch.arange(length - 1, dtype=dt)[:, None]  # y_k: C l^(j-1) B
        markov = torch.cat([torch.zeros(1, dtype=poles.dtype), powers @ (b[:, 0] * c[0])])
        kernel = torch.real(markov)
        loss = torch.mean((u @ toeplitz(kernel).T - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        current = detached()
        for real_output in (False, True):
            bound = hsv_perturbation_bound(previous, current, real_output=real_output)
            a_priori = hsv_a_priori_bound(previous, current, real_output=real_output)
            assert bound.dtype == torch.float64
            move, sigma_1 = _movement(previous, current, real_output=real_output)
            assert move <= float(bound) + _slack(sigma_1), (move, float(bound))
            assert move <= float(a_priori) * (1 + 1e-9), (move, float(a_priori))
            tightness.append(float(bound) / move)
        tracker.update(hankel_singular_values(current, real_output=True), bound)
        previous = current
    assert losses[-1] < losses[0]
    assert np.median(tightness) < 10  # Weyl's bound is close to the actual movement here
    assert tracker.updates == steps
    assert tracker.trajectories().shape == (steps + 1, 2 * n)


def test_jit_matches_eager() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    before = build(Spec(4, 1, 2, 0.95, True, True, (2,), 8))
    after = to_xp(_perturb(before, -2.0, 9), jnp)
    before = to_xp(before, jnp)
    for fn in (hsv_perturbation_bound, hsv_a_priori_bound):
        assert_rel(jax.jit(fn)(before, after), fn(before, after), 1e-12)
    assert_rel(jax.jit(hankel_operator)(before), hankel_operator(before), 1e-12)


# ---------------------------------------------------------------------------------------------
# Ranking certificates
# ---------------------------------------------------------------------------------------------


def test_ranking_certificate_margins_by_hand(xp) -> None:
    hsv = xp.asarray([1.0, 4.0, 0.5, 3.0])  # any order: sorted to 4, 3, 1, 0.5
    assert ranking_certificate(hsv, 0.25, 1) == RankingCertificate(True, 0.5)
    assert ranking_certificate(hsv, 0.25, 2) == RankingCertificate(True, 1.5)
    assert ranking_certificate(hsv, xp.asarray(0.25), 3) == RankingCertificate(False, 0.0)
    assert ranking_certificate(hsv, 0.5, 1) == RankingCertificate(False, 0.0)
    certificate = ranking_certificate(hsv, 1.5, 2)
    assert certificate == RankingCertificate(False, -1.0)
    assert isinstance(certificate.stable, bool)
    assert isinstance(certificate.margin, float)


def test_ranking_certificate_validation() -> None:
    hsv = np.array([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 2\]; received 3"):
        ranking_certificate(hsv, 0.1, 3)
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 2\]; received 0"):
        ranking_certificate(hsv, 0.1, 0)
    with pytest.raises(TypeError, match="`rank` must be an integer"):
        ranking_certificate(hsv, 0.1, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`bound` must be finite and non-negative"):
        ranking_certificate(hsv, -0.1, 1)
    with pytest.raises(ValueError, match="`bound` must be finite and non-negative"):
        ranking_certificate(hsv, float("nan"), 1)
    with pytest.raises(TypeError, match="`bound` must be a real scalar"):
        ranking_certificate(hsv, np.array([0.1, 0.2]), 1)
    with pytest.raises(ShapeError, match="`hsv` must be a 1-D array"):
        ranking_certificate(hsv[None, :], 0.1, 1)
    with pytest.raises(ValueError, match="`hsv` must be finite and non-negative"):
        ranking_certificate(np.array([3.0, -1.0]), 0.1, 1)
    with pytest.raises(TypeError, match="`hsv` must be a real array"):
        ranking_certificate(hsv + 0j, 0.1, 1)


def test_bound_validation() -> None:
    sys = build(Spec(3, 1, 1, 0.9, True, True, (), 0))
    other = build(Spec(4, 1, 1, 0.9, True, True, (), 0))
    with pytest.raises(ShapeError, match=r"`sys_after` must have the same number of states .* 3"):
        hsv_perturbation_bound(sys, other)
    with pytest.raises(ShapeError, match="`sys_after` must have the same number of states"):
        hsv_a_priori_bound(sys, other)
    with pytest.raises(ShapeError, match="leading dimensions"):
        hsv_perturbation_bound(
            build(Spec(3, 1, 1, 0.9, True, True, (2,), 0)),
            DiagonalStateSpace(*(np.stack([f] * 3) for f in sys[:3])),
        )
    with pytest.raises(TypeError, match="`sys_before` must be a StateSpace"):
        hsv_perturbation_bound(sys[:3], sys)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`sys_after` must be a DiagonalStateSpace"):
        hsv_a_priori_bound(sys, StateSpace(*dense_np(sys)))  # type: ignore[arg-type]
    unstable = sys._replace(poles=sys.poles / np.abs(sys.poles).max())
    with pytest.raises(StabilityError, match="`sys_after.poles` must be Schur stable"):
        hsv_perturbation_bound(sys, unstable)
    with pytest.raises(StabilityError, match="`sys_after.poles` must be Schur stable"):
        hsv_a_priori_bound(sys, unstable)


# ---------------------------------------------------------------------------------------------
# RankTracker
# ---------------------------------------------------------------------------------------------


def test_tracker_matches_permuted_hsvs() -> None:
    tracker = RankTracker()
    tracker.update(np.array([3.0, 2.0, 1.0]))
    tracker.update(np.array([1.05, 2.9, 2.1]), 0.1)  # the same values, shuffled and nudged
    np.testing.assert_array_equal(tracker.matchings, [[1, 2, 0]])
    np.testing.assert_allclose(tracker.trajectories(), [[3.0, 2.0, 1.0], [2.9, 2.1, 1.05]])
    np.testing.assert_allclose(tracker.snapshots, [[3.0, 2.0, 1.0], [1.05, 2.9, 2.1]])


def test_tracker_crossing_needs_a_cost_and_loses_the_certificate() -> None:
    """Two states in a fixed order whose HSVs cross: 2.0 -> 1.6 and 1.5 -> 1.9."""
    steps = [np.array([2.0, 1.5]), np.array([1.8, 1.7]), np.array([1.6, 1.9])]
    by_value, by_identity = RankTracker(), RankTracker()
    certified = []
    for k, hsv in enumerate(steps):
        bound = None if k == 0 else 0.2
        by_value.update(hsv, bound)
        by_identity.update(hsv, bound, cost=1.0 - np.eye(2))
        certified.append(by_value.certified(1, window=1))
    # values alone swap the labels at the crossing; an identity cost follows the states
    np.testing.assert_allclose(by_value.trajectories()[:, 0], [2.0, 1.8, 1.9])
    np.testing.assert_allclose(by_identity.trajectories()[:, 0], [2.0, 1.8, 1.6])
    # gap 0.5 at the reference: margin 0.5 - 2 * 0.2 > 0 after one step, < 0 after two, when
    # the cut is re-anchored at the current snapshot (gap 1.9 - 1.6, nothing accumulated yet)
    assert certified == [False, True, False]
    assert by_value.certificate(1).margin == pytest.approx(0.3)
    np.testing.assert_array_equal(by_value.stable_updates, [0])
    np.testing.assert_array_equal(by_value.anchors, [2])
    np.testing.assert_array_equal(by_value.accumulated_bound, [0.0])
    assert not by_value.certified(1, 1)


def test_tracker_certifies_after_window_and_loses_it_when_the_gap_closes() -> None:
    tracker = RankTracker()
    tracker.update(np.array([4.0, 2.0, 1.0]))
    for hsv in ([4.0, 1.8, 1.2], [4.0, 1.6, 1.4]):
        tracker.update(np.array(hsv), 0.2)
    # cut 2: reference gap 1.0, accumulated 0.4 -> margin 0.2 for two updates
    assert tracker.certificate(2).stable
    assert tracker.certificate(2).margin == pytest.approx(0.2)
    assert tracker.certified(2, window=2)
    assert not tracker.certified(2, window=3)
    assert tracker.certified(1, window=2)
    tracker.update(np.array([4.0, 1.5, 1.5]), 0.1)  # margin 1.0 - 2 * 0.5 = 0: not certified
    assert not tracker.certified(2, window=1)
    assert tracker.certificate(2) == RankingCertificate(False, 0.0)
    np.testing.assert_array_equal(tracker.stable_updates, [3, 0])
    np.testing.assert_array_equal(tracker.anchors, [0, 3])
    np.testing.assert_allclose(tracker.accumulated_bound, [0.5, 0.0])
    tracker.update(np.array([4.0, 1.7, 1.3]), 0.0)  # margin 0 - 0: re-anchored at gap 0.4
    np.testing.assert_array_equal(tracker.anchors, [0, 4])
    tracker.update(np.array([4.0, 1.7, 1.3]), 0.0)
    assert not tracker.certified(2, window=2)
    tracker.update(np.array([4.0, 1.7, 1.3]), 0.05)
    assert tracker.certified(2, window=2)
    assert tracker.certified(1, window=6)
    assert tracker.certificate(1).margin == pytest.approx(2.0 - 2 * 0.55)


def test_tracker_state_dict_round_trip() -> None:
    rng = np.random.default_rng(0)
    tracker = RankTracker(max_history=3)
    hsv = np.array([5.0, 3.0, 2.0, 0.1])
    tracker.update(hsv)
    for _ in range(5):
        hsv = np.abs(hsv + rng.normal(scale=0.05, size=4))
        tracker.update(rng.permutation(hsv), 0.05)
    state = json.loads(json.dumps(tracker.state_dict()))  # plain Python only
    restored = RankTracker()
    restored.load_state_dict(state)
    assert restored.state_dict() == tracker.state_dict()
    assert tracker.snapshots.shape == (3, 4)
    assert tracker.matchings.shape == (2, 4)
    step = np.array([5.0, 3.0, 1.9, 0.2])
    tracker.update(step, 0.02)
    restored.update(step, 0.02)
    assert restored.state_dict() == tracker.state_dict()
    np.testing.assert_array_equal(restored.trajectories(), tracker.trajectories())
    with pytest.raises(ValueError, match="missing keys"):
        restored.load_state_dict({"version": 1})
    with pytest.raises(ValueError, match="`state` must have version 1"):
        restored.load_state_dict({**state, "version": 99})


def test_tracker_accepts_backend_arrays(xp) -> None:
    tracker = RankTracker()
    tracker.update(xp.asarray([2.0, 1.0]))
    tracker.update(xp.asarray([2.0, 1.0]), xp.asarray(0.1))
    assert tracker.certified(1, 1)
    assert tracker.certificate(1).margin == pytest.approx(0.8)


def test_tracker_validation() -> None:
    tracker = RankTracker()
    with pytest.raises(ValueError, match="no snapshot yet"):
        tracker.certified(1, 1)
    tracker.update(np.array([2.0, 1.0, 0.5]), 0.3)  # the first bound is validated, then unused
    with pytest.raises(ValueError, match="`bound` is required"):
        tracker.update(np.array([2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="`bound` must be finite and non-negative"):
        tracker.update(np.array([2.0, 1.0, 0.5]), -1.0)
    with pytest.raises(ShapeError, match=r"n = 3 entries .*`reset\(\)`"):
        tracker.update(np.array([2.0, 1.0]), 0.1)
    with pytest.raises(ShapeError, match=r"`cost` must have shape \(n, n\) = \(3, 3\)"):
        tracker.update(np.array([2.0, 1.0, 0.5]), 0.1, cost=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 2\]"):
        tracker.certified(3, 1)
    with pytest.raises(ValueError, match=r"`window` must be in \[1, "):
        tracker.certified(1, 0)
    with pytest.raises(ValueError, match=r"`max_history` must be in \[1, "):
        RankTracker(max_history=0)
    assert tracker.updates == 0
    tracker.reset()
    tracker.update(np.array([2.0, 1.0]))
    assert tracker.n == 2
