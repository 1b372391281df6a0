"""compressm_core against NumPy/Fortran references: SciPy, SLICOT (through slycot), python-control.

1. ``solve_discrete_lyapunov`` against :func:`scipy.linalg.solve_discrete_lyapunov`: values,
   residuals, batching, SciPy's own test cases, and the equations without a unique solution.
2. Hankel singular values and balanced truncation against SLICOT ``AB09AD`` (``dico='D'``):
   ``job='B'`` is the square-root method (``method="sqrt"``), ``job='N'`` the balancing-free one
   (``method="bfsr"``).
3. python-control 0.10.2: ``balred`` runs the continuous-time algorithm on discrete systems and
   ``hsvd`` refuses them; the tests pin that behaviour down next to a true discrete reduction.

Random systems are :func:`tests._helpers.build` of a Hypothesis-drawn structure (size, spectral
radius, real or complex, seed), never drawn matrix entries. Properties that need no reference
library (invariances, the error bound) are tested in the modules' own files.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

import compressm_core as cc
from compressm_core import ConditioningError, DiagonalStateSpace, StateSpace
from tests._helpers import Spec, build, dense_np, specs

try:
    import slycot
except ImportError:  # pragma: no cover - slycot is part of the test extra
    slycot = None

try:
    import control
except ImportError:  # pragma: no cover - control is part of the test extra
    control = None

needs_slycot = pytest.mark.skipif(slycot is None, reason="needs slycot")
needs_control = pytest.mark.skipif(
    control is None or slycot is None, reason="needs python-control and slycot"
)

METHODS = [None, "kronecker", "scipy", "smith"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _normal(rng: np.random.Generator, shape: tuple[int, ...], complex_: bool) -> np.ndarray:
    """Standard normal right-hand side (complex with independent parts)."""
    x = rng.standard_normal(shape)
    if complex_:
        x = x + 1j * rng.standard_normal(shape)
    return x


def _system(spec: Spec) -> StateSpace | DiagonalStateSpace:
    """:func:`build` without the feedthrough (SLICOT's AB09AD reduces ``(A, B, C)``)."""
    return build(spec)._replace(d=None)


def _dense_arrays(sys: StateSpace | DiagonalStateSpace) -> tuple[np.ndarray, ...]:
    dense = cc.to_dense(sys)
    return np.asarray(dense.a), np.asarray(dense.b), np.asarray(dense.c)


def _lyap_residual(a: np.ndarray, x: np.ndarray, q: np.ndarray) -> float:
    """``max|A X A^H - X + Q|`` relative to the size of its terms."""
    n = a.shape[-1]
    res = a @ x @ a.conj().swapaxes(-1, -2) - x + q
    scale = n * np.max(np.abs(a)) ** 2 * np.max(np.abs(x)) + np.max(np.abs(q))
    return float(np.max(np.abs(res)) / scale)


_SQRT_EPS = float(np.sqrt(np.finfo(np.float64).eps))


def _hsv_tol(*systems: StateSpace | DiagonalStateSpace) -> float:
    """Absolute accuracy to expect of computed HSVs.

    The Gramian factors come from ``eigh`` with the eigenvalues clamped at zero, so a Gramian is
    resolved to ``eps * ||P||`` and its factor, in the directions of tiny eigenvalues, only to
    ``sqrt(eps * ||P||)``. HSVs therefore carry absolute errors up to a small multiple of
    ``sqrt(eps * ||P|| ||Q||)`` (measured: at most 0.06 of it over 4000 random systems, i.e.
    ~1e-9 sigma_1 for well-balanced ones), where SLICOT's Hammarling factors reach ``eps``.
    """
    scale = 0.0
    for sys in systems:
        a, b, c = _dense_arrays(sys)
        p = scipy.linalg.solve_discrete_lyapunov(a, b @ b.conj().T)
        q = scipy.linalg.solve_discrete_lyapunov(a.conj().T, c.conj().T @ c)
        scale = max(scale, float(np.sqrt(np.linalg.norm(p, 2) * np.linalg.norm(q, 2))))
    return 0.25 * _SQRT_EPS * scale


def _grid(n_freq: int = 97) -> np.ndarray:
    return np.linspace(0.0, 2 * np.pi, n_freq, endpoint=False)


def _response(sys: StateSpace | DiagonalStateSpace) -> np.ndarray:
    return np.asarray(cc.frequency_response(sys, _grid()))


def _gap_ranks(hsv: np.ndarray, *, ratio: float = 1.05, floor: float = 1e-7) -> list[int]:
    """Ranks ``r < n`` whose truncation is well posed: ``sigma_r > ratio * sigma_{r+1}``."""
    return [
        r
        for r in range(1, hsv.size)
        if hsv[r - 1] > ratio * hsv[r] and hsv[r - 1] > floor * hsv[0]
    ]


# --------------------------------------------------------------------------------------------
# 1. solve_discrete_lyapunov against scipy.linalg.solve_discrete_lyapunov
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@given(specs(diagonal=False, batch=False), st.booleans())
def test_lyapunov_matches_scipy_on_stable_a(method, spec, hermitian):
    a, *_ = dense_np(build(spec))
    n, complex_ = spec.n, spec.complex_
    rng = np.random.default_rng(spec.seed + 1)
    if hermitian:
        g = _normal(rng, (n, 2), complex_)
        q = g @ g.conj().T
    else:
        q = _normal(rng, (n, n), complex_)

    x = np.asarray(cc.solve_discrete_lyapunov(a, q, method=method))
    ref = scipy.linalg.solve_discrete_lyapunov(a, q)

    assert x.shape == (n, n)
    assert x.dtype == (np.complex128 if complex_ else np.float64)
    assert np.max(np.abs(x - ref)) <= 1e-9 * np.max(np.abs(ref))
    assert _lyap_residual(a, x, q) <= 1e-12
    if hermitian:
        # X = sum_k A^k Q (A^H)^k is Hermitian positive semi-definite for Q = G G^H.
        assert np.max(np.abs(x - x.conj().T)) <= 1e-12 * np.max(np.abs(x))
        assert np.min(np.linalg.eigvalsh((x + x.conj().T) / 2)) >= -1e-10 * np.max(np.abs(x))


@pytest.mark.parametrize("method", METHODS)
@given(
    st.sampled_from([(3,), (2, 3)]),
    st.sampled_from(["both", "a_shared", "q_shared"]),
    specs(max_n=6, diagonal=False, batch=False),
)
def test_lyapunov_batched_matches_scipy_loop(method, batch, layout, spec):
    n = spec.n
    a, *_ = dense_np(build(spec._replace(batch=batch)))
    q = _normal(np.random.default_rng(spec.seed + 1), (*batch, n, n), spec.complex_)
    if layout == "a_shared":
        a = a[(0,) * len(batch)]
    elif layout == "q_shared":
        q = q[(0,) * len(batch)]

    x = np.asarray(cc.solve_discrete_lyapunov(a, q, method=method))

    assert x.shape == (*batch, n, n)
    a_full = np.broadcast_to(a, x.shape)
    q_full = np.broadcast_to(q, x.shape)
    for idx in np.ndindex(*batch):
        ref = scipy.linalg.solve_discrete_lyapunov(a_full[idx], q_full[idx])
        assert np.max(np.abs(x[idx] - ref)) <= 1e-9 * np.max(np.abs(ref))
        assert _lyap_residual(a_full[idx], x[idx], q_full[idx]) <= 1e-12


# SciPy's own cases for solve_discrete_lyapunov (scipy/linalg/tests/test_solvers.py,
# TestSolveLyapunov.cases): unstable and complex A, non-Hermitian Q; "stable" marks those for
# which squared Smith applies.
_COMPANION = np.zeros((11, 11), dtype=complex)
_COMPANION[0] = np.linspace(0.1, 0.01, 11)
_COMPANION[np.arange(1, 11), np.arange(10)] = 1.0

SCIPY_CASES = {
    "integer_unstable": (
        np.array([[1, 2], [3, 4]]),
        np.array([[9, 10], [11, 12]]),
        False,
    ),
    "a_q_complex": (
        np.array([[1.0 + 1j, 2.0], [3.0 - 4.0j, 5.0]]),
        np.array([[2.0 - 2j, 2.0 + 2j], [-1.0 - 1j, 2.0]]),
        False,
    ),
    "a_real_q_complex": (
        np.array([[1.0, 2.0], [3.0, 5.0]]),
        np.array([[2.0 - 2j, 2.0 + 2j], [-1.0 - 1j, 2.0]]),
        False,
    ),
    "a_complex_q_real": (
        np.array([[1.0 + 1j, 2.0], [3.0 - 4.0j, 5.0]]),
        np.array([[2.0, 2.0], [-1.0, 2.0]]),
        False,
    ),
    "kitagawa_1977": (
        np.array(
            [
                [3, 9, 5, 1, 4],
                [1, 2, 3, 8, 4],
                [4, 6, 6, 6, 3],
                [1, 5, 2, 0, 7],
                [5, 3, 3, 1, 5],
            ]
        ),
        np.array(
            [
                [2, 4, 1, 0, 1],
                [4, 1, 0, 2, 0],
                [1, 0, 3, 0, 3],
                [0, 2, 0, 1, 0],
                [1, 0, 3, 0, 4],
            ]
        ),
        False,
    ),
    "companion_complex_11": (_COMPANION, np.eye(11), True),
    "gh4176": (
        np.array([[0.0, 1.0], [-0.5, -1.0]]),
        np.array([[0.0, 0.0], [0.0, 9.0]]),
        True,
    ),
}


@pytest.mark.parametrize(
    ("case", "method"),
    [
        (case, method)
        for case in sorted(SCIPY_CASES)
        for method in METHODS
        # squared Smith needs a Schur-stable A (see test_smith_rejects_unstable_a)
        if method != "smith" or SCIPY_CASES[case][2]
    ],
)
def test_lyapunov_scipy_reference_cases(case, method):
    a, q, _ = SCIPY_CASES[case]
    x = np.asarray(cc.solve_discrete_lyapunov(a, q, method=method))
    ref = scipy.linalg.solve_discrete_lyapunov(a, q)

    assert x.shape == a.shape
    assert _lyap_residual(a, x, q) <= 1e-12
    assert np.max(np.abs(x - ref)) <= 1e-9 * np.max(np.abs(ref))


_DTYPES = [np.int64, np.float32, np.float64, np.complex64, np.complex128]


@pytest.mark.parametrize("dtype_q", _DTYPES)
@pytest.mark.parametrize("dtype_a", _DTYPES)
def test_lyapunov_size_zero(dtype_a, dtype_q):
    # SciPy's test_size_0: an empty problem returns an empty solution of the dtype that a
    # non-empty problem with the same input dtypes would have.
    a0 = np.zeros((0, 0), dtype=dtype_a)
    q0 = np.zeros((0, 0), dtype=dtype_q)
    a2 = np.array([[0.5, 0.0], [1.0, -0.25]]).astype(dtype_a)
    q2 = np.array([[2.0, 1.0], [0.0, 3.0]]).astype(dtype_q)
    for method in METHODS:
        x0 = cc.solve_discrete_lyapunov(a0, q0, method=method)
        x2 = cc.solve_discrete_lyapunov(a2, q2, method=method)
        assert x0.shape == (0, 0)
        assert x0.dtype == x2.dtype


_THETA = 0.3
_V = np.array([[2.0, 1.0, 0.5], [0.0, 1.0, -1.0], [1.0, 0.0, 1.0]])
_JORDAN = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.3]])

# lambda_i * conj(lambda_j) = 1 for some pair of eigenvalues: no unique solution.
SINGULAR_CASES = {
    "identity": np.eye(2),
    "jordan_1_1": _V @ _JORDAN @ np.linalg.inv(_V),  # eigenvalues 1, 1 (and 0.3)
    "reciprocal_pair": np.diag([2.0, 0.5]),
    "rotation": np.array([[np.cos(_THETA), -np.sin(_THETA)], [np.sin(_THETA), np.cos(_THETA)]]),
}


# Exactly singular cases (identity, reciprocal pair) make the direct solves fail; the other two
# are singular only up to round-off in A, so a direct solve "succeeds" with X ~ 1/eps, which the
# amplification check |X| / |Q| <= 1 / (10 n eps) must catch.
def _singular_params() -> list[object]:
    return [
        pytest.param(case, method, id=f"{case}-{method}")
        for case in sorted(SINGULAR_CASES)
        for method in METHODS
    ]


@pytest.mark.parametrize(("case", "method"), _singular_params())
def test_lyapunov_without_unique_solution_raises(case, method):
    a = SINGULAR_CASES[case]
    q = np.eye(a.shape[0])
    with warnings.catch_warnings():
        # SciPy warns about the ill-conditioned solve it is asked to do; only the error raised
        # by compressm_core is under test here.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        with pytest.raises(ConditioningError):
            cc.solve_discrete_lyapunov(a, q, method=method)


@pytest.mark.parametrize(
    "a",
    [
        np.array([[1.0, 2.0], [3.0, 4.0]]),
        np.diag([1.01, 0.3]),
        np.array([[1.0 + 1j, 2.0], [3.0 - 4.0j, 5.0]]),
        SCIPY_CASES["kitagawa_1977"][0].astype(float),
    ],
    ids=["scipy_2x2", "slightly_unstable", "complex", "kitagawa"],
)
def test_smith_rejects_unstable_a(a):
    q = np.eye(a.shape[0])
    with pytest.raises(ConditioningError):
        cc.solve_discrete_lyapunov(a, q, method="smith")
    # The equation itself has a unique solution, which the default ladder finds.
    x = np.asarray(cc.solve_discrete_lyapunov(a, q))
    assert _lyap_residual(a, x, q) <= 1e-12
    ref = scipy.linalg.solve_discrete_lyapunov(a, q)
    assert np.max(np.abs(x - ref)) <= 1e-9 * np.max(np.abs(ref))


# --------------------------------------------------------------------------------------------
# 2. Hankel singular values and balanced truncation against SLICOT AB09AD (dico='D')
# --------------------------------------------------------------------------------------------


def _ab09ad(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, rank: int, job: str
) -> tuple[StateSpace, np.ndarray]:
    """SLICOT AB09AD, discrete time, no scaling, fixed order ``rank``.

    slycot 0.7.1 sizes the integer workspace of AB09AD as ``max(m, p)``, but SLICOT needs ``n``
    of it for ``job='N'``: with ``n > max(m, p)`` the call corrupts the heap and aborts the
    process. Zero columns appended to B (``n`` extra inputs that change neither Gramian nor the
    HSVs) make the workspace large enough; they are dropped from the reduced B.
    """
    n, m = b.shape
    p = c.shape[0]
    b_padded = np.hstack([b, np.zeros((n, n))])
    nr, ar, br, cr, hsv = slycot.ab09ad(
        "D", job, "N", n, m + n, p, a.copy(), b_padded, c.copy(), nr=rank, tol=0.0
    )
    assert nr == rank
    assert not np.any(br[:, m:])
    return StateSpace(ar, br[:, :m], cr), hsv


real_systems = specs(min_n=2, max_n=10, complex_=False, batch=False)


@needs_slycot
@given(real_systems)
def test_hsv_match_slycot(spec):
    n, diagonal = spec.n, spec.diagonal
    sys = _system(spec)
    a, b, c = _dense_arrays(sys)
    _, ref = _ab09ad(a, b, c, 1, "B")

    ours = np.asarray(cc.hankel_singular_values(sys))

    assert ours.shape == (n,)
    assert np.all(np.diff(ours) <= 0)
    tol = _hsv_tol(sys)
    assert np.max(np.abs(ours - ref)) <= tol
    if diagonal:
        dense = np.asarray(cc.hankel_singular_values(cc.to_dense(sys)))
        assert np.max(np.abs(dense - ref)) <= tol


@needs_slycot
@pytest.mark.parametrize(("job", "method"), [("B", "sqrt"), ("N", "bfsr")])
@given(real_systems)
def test_balanced_truncation_matches_slycot(job, method, spec):
    n, m, p = spec.n, spec.m, spec.p
    sys = _system(spec)
    a, b, c = _dense_arrays(sys)
    hsv = np.asarray(cc.hankel_singular_values(sys))
    g = _response(sys)
    tol = _hsv_tol(sys)
    for rank in _gap_ranks(hsv):
        ref, ref_hsv = _ab09ad(a, b, c, rank, job)
        res = cc.balanced_truncation(sys, rank, method=method)

        assert res.system.a.shape == (rank, rank)
        assert res.system.b.shape == (rank, m)
        assert res.system.c.shape == (p, rank)
        # Realizations differ by a similarity transform; the transfer functions must agree.
        diff = np.max(np.abs(_response(res.system) - _response(ref)))
        assert diff <= 1e-8 * np.max(np.abs(g))
        assert float(res.error_bound) == pytest.approx(
            2 * np.sum(ref_hsv[rank:]), rel=1e-6, abs=2 * n * tol
        )
        # No system of order r comes closer than sigma_{r+1} (Hankel-norm lower bound).
        err = float(cc.h_infinity_norm(sys, res.system))
        assert err >= hsv[rank] * (1 - 1e-6) - tol


@needs_slycot
@given(real_systems)
def test_sqrt_truncation_equals_slycot_up_to_state_signs(spec):
    # With distinct kept HSVs the balanced truncation is unique up to the sign of each state,
    # so the square-root method must reproduce SLICOT's (Ar, Br, Cr) entry by entry.
    sys = _system(spec)
    a, b, c = _dense_arrays(sys)
    hsv = np.asarray(cc.hankel_singular_values(sys))
    for rank in _gap_ranks(hsv, floor=1e-5):
        if not np.all(hsv[: rank - 1] > 1.05 * hsv[1:rank]):
            continue
        ref, _ = _ab09ad(a, b, c, rank, "B")
        ours = cc.balanced_truncation(sys, rank, method="sqrt").system
        signs = np.sign(np.sum(np.asarray(ours.b) * ref.b, axis=1))
        assert np.all(signs != 0)
        assert np.asarray(ours.a) == pytest.approx(
            signs[:, None] * ref.a * signs[None, :], abs=1e-6 * np.max(np.abs(ref.a))
        )
        assert np.asarray(ours.b) == pytest.approx(
            signs[:, None] * ref.b, abs=1e-6 * np.max(np.abs(ref.b))
        )
        assert np.asarray(ours.c) == pytest.approx(
            ref.c * signs[None, :], abs=1e-6 * np.max(np.abs(ref.c))
        )


# --------------------------------------------------------------------------------------------
# 3. python-control: no discrete-time HSVs, and balred is a continuous-time reduction
# --------------------------------------------------------------------------------------------

POLES = np.array([0.99, 0.95, 0.9, 0.5, -0.3, 0.2])


def _poles_system() -> StateSpace:
    """Dense system with the poles above: a random similarity transform of diag(POLES)."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 6))
    a = v @ np.diag(POLES) @ np.linalg.inv(v)
    return StateSpace(a, rng.standard_normal((6, 1)), rng.standard_normal((1, 6)))


@needs_control
def test_control_hsvd_rejects_discrete_systems():
    sys = _poles_system()
    dsys = control.ss(sys.a, sys.b, sys.c, 0, 1)
    with pytest.raises(NotImplementedError, match="discrete time"):
        control.hsvd(dsys)
    # The discrete Gramians themselves are right in python-control (SLICOT with dico='D').
    assert np.asarray(control.gram(dsys, "c")) == pytest.approx(
        np.asarray(cc.controllability_gramian(sys)), rel=1e-10, abs=1e-12
    )
    assert np.asarray(control.gram(dsys, "o")) == pytest.approx(
        np.asarray(cc.observability_gramian(sys)), rel=1e-10, abs=1e-12
    )


@needs_control
def test_control_balred_is_not_a_discrete_balanced_truncation():
    sys = _poles_system()
    dsys = control.ss(sys.a, sys.b, sys.c, 0, 1)
    hsv = np.asarray(cc.hankel_singular_values(sys))

    # python-control hard-codes dico='C': every pole with Re > 0 counts as unstable, so it
    # keeps those five, warns that order 3 is below the unstable part, and returns a
    # continuous-time (dt = 0) system with the only "stable" pole, -0.3, cut off.
    with pytest.warns(UserWarning, match="unstable part"):
        ctrl = control.balred(dsys, 3)
    assert ctrl.nstates == 5
    assert ctrl.dt == 0
    assert control.isctime(ctrl, strict=True)
    assert np.sort(np.linalg.eigvals(ctrl.A).real) == pytest.approx(
        np.sort(POLES[POLES > 0]), abs=1e-8
    )
    ctrl_sys = StateSpace(
        np.asarray(ctrl.A), np.asarray(ctrl.B), np.asarray(ctrl.C), np.asarray(ctrl.D)
    )
    ctrl_err = float(cc.h_infinity_norm(sys, ctrl_sys))

    # compressm_core: order 3, error within the bound and equal to SLICOT's discrete BT.
    ours = cc.balanced_truncation(sys, 3)
    ours_err = float(cc.h_infinity_norm(sys, ours.system))
    ref, ref_hsv = _ab09ad(np.asarray(sys.a), np.asarray(sys.b), np.asarray(sys.c), 3, "B")
    ref_err = float(cc.h_infinity_norm(sys, ref))
    assert ours.system.a.shape == (3, 3)
    assert np.max(np.abs(hsv - ref_hsv)) <= 1e-9 * hsv[0]
    assert hsv[3] <= ours_err <= float(ours.error_bound)
    assert ours_err == pytest.approx(ref_err, rel=1e-7)

    # python-control's 5-state model is farther from the system than our 3-state one, and
    # breaks the bound that any discrete balanced truncation of order 5 (or 3) satisfies.
    bound_5 = 2 * np.sum(hsv[5:])
    ours_5_err = float(cc.h_infinity_norm(sys, cc.balanced_truncation(sys, 5).system))
    assert ours_5_err <= bound_5
    assert ctrl_err > 2 * ours_err
    assert ctrl_err > float(ours.error_bound)
    assert ctrl_err > 100 * bound_5
