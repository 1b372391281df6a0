"""The diagonal paths are traceable under jax.jit and keep arrays on their device."""

from __future__ import annotations

import numpy as np
import pytest

from compressm_core import (
    BackendMismatchError,
    DiagonalStateSpace,
    ShapeError,
    StabilityError,
    StateSpace,
    balanced_truncation,
    controllability_gramian,
    gramian_factors,
    hankel_singular_values,
    observability_gramian,
    solve_discrete_lyapunov,
)
from tests._helpers import Spec, assert_close, build, to_xp

SPEC = Spec(12, 3, 2, 0.99, True, True, (4,), 11)


def test_jit_diagonal_paths_equal_eager() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    sys = to_xp(build(SPEC), jnp)
    for fn in (controllability_gramian, observability_gramian, hankel_singular_values):
        assert_close(jax.jit(fn)(sys), fn(sys), 1e-12)
    hsv_l = jax.jit(lambda s: hankel_singular_values(s, horizon=40))(sys)
    assert_close(hsv_l, hankel_singular_values(sys, horizon=40), 1e-12)
    lc = jax.jit(gramian_factors)(sys).controllability  # eigh factor (eagerly: Cholesky)
    gram = lc @ jnp.conj(jnp.swapaxes(lc, -1, -2))
    assert_close(gram, controllability_gramian(sys), 1e-10)
    jitted = jax.jit(lambda s: balanced_truncation(s, 5))(sys)
    eager = balanced_truncation(sys, 5)
    for got, want in zip(jitted.system[:3], eager.system[:3], strict=True):
        assert_close(got, want, 1e-9)
    assert_close(jitted.error_bound, eager.error_bound, 1e-12)


def test_jit_dense_smith() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    a = jnp.asarray(0.4 * np.random.default_rng(0).normal(size=(5, 5)) / np.sqrt(5))
    q = jnp.eye(5)
    x = jax.jit(lambda a, q: solve_discrete_lyapunov(a, q, method="smith", max_iter=30))(a, q)
    assert_close(x, solve_discrete_lyapunov(a, q), 1e-12)


def test_gradients_flow_through_hsvs() -> None:
    """The diagonal path is differentiable (e.g. for Hankel-norm regularisers)."""
    torch = pytest.importorskip("torch")
    poles = torch.tensor([0.9, 0.5, -0.3], dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, 1, dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    hsv = hankel_singular_values(DiagonalStateSpace(poles, b, c))
    hsv.sum().backward()
    assert poles.grad is not None
    assert torch.all(torch.isfinite(poles.grad))


def test_device_is_preserved() -> None:
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    sys_np = build(SPEC)
    sys = DiagonalStateSpace(*(xps.asarray(f, device=dev) for f in sys_np))
    hsv = hankel_singular_values(sys)
    assert hsv.device == dev
    res = balanced_truncation(sys, 4)
    assert res.system.a.device == dev
    assert res.T.device == dev
    assert_close(hsv, hankel_singular_values(sys_np), 1e-12, xp=xps, device=dev)


def test_mixed_backends_and_devices_are_refused() -> None:
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    sys = build(SPEC)
    with pytest.raises(BackendMismatchError, match="one array library"):
        hankel_singular_values(sys._replace(b=torch.asarray(sys.b)))
    mixed = DiagonalStateSpace(
        xps.asarray(sys.poles),
        xps.asarray(sys.b, device=xps.Device("device1")),
        xps.asarray(sys.c),
        xps.asarray(sys.d),
    )
    with pytest.raises(BackendMismatchError, match="one device"):
        hankel_singular_values(mixed)


def test_bad_systems_name_the_argument(xp) -> None:
    sys = to_xp(build(Spec(3, 2, 1, 0.5, False, True, (), 0)), xp)
    with pytest.raises(ShapeError, match=r"`sys.b` must have shape \(..., n, m\) with n = 3"):
        hankel_singular_values(sys._replace(b=xp.ones((4, 2))))
    with pytest.raises(ShapeError, match=r"`sys.c` must have shape \(..., p, n\)"):
        hankel_singular_values(sys._replace(c=xp.ones((1, 2))))
    with pytest.raises(ShapeError, match=r"`sys.d` must have shape"):
        hankel_singular_values(sys._replace(d=xp.ones((2, 2))))
    with pytest.raises(ShapeError, match="broadcastable leading dimensions"):
        hankel_singular_values(sys._replace(b=xp.ones((2, 3, 2)), c=xp.ones((5, 1, 3)), d=None))
    with pytest.raises(StabilityError, match=r"every \|pole\| < 1.*modulus 1.5"):
        hankel_singular_values(sys._replace(poles=xp.asarray([0.5, -1.5, 0.1])))
    unstable = StateSpace(xp.asarray([[0.5, 1.0], [0.0, 1.01]]), xp.ones((2, 1)), xp.ones((1, 2)))
    with pytest.raises(StabilityError, match=r"`sys.a` must be Schur stable.*radius 1\.0(1|099)"):
        hankel_singular_values(unstable)
    with pytest.raises(StabilityError, match="`sys.b` must contain only finite values"):
        hankel_singular_values(sys._replace(b=xp.asarray(np.full((3, 2), np.inf))))
    with pytest.raises(TypeError, match="StateSpace or DiagonalStateSpace; received tuple"):
        hankel_singular_values((sys.poles, sys.b, sys.c))  # type: ignore[arg-type]
    not_square = StateSpace(xp.ones((3, 2)), sys.b, sys.c)
    with pytest.raises(ShapeError, match="`sys.a` must be a"):
        hankel_singular_values(not_square)
