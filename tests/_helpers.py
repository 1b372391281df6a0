"""Builders and assertions shared by the tests.

Hypothesis draws the *structure* of a system (sizes, spectral radius, real or complex, diagonal or
dense, seed); the builders here turn it deterministically into a well-conditioned stable system
with NumPy, which the tests then move to the backend under test.

One Hypothesis idiom: a check run on every backend is an inner function decorated with
``@backend_settings(xp)`` and ``@given(...)``, called once by the test; NumPy-only properties
use ``@given`` alone. Both follow the active profile of ``tests/conftest.py``; no test sets
example counts or deadlines of its own.

:func:`assert_close` compares a backend result (namespace, dtype, device, shape, values);
:func:`assert_rel` compares NumPy arrays only.
"""

from __future__ import annotations

import doctest
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat
import numpy as np
import pytest
from array_api_compat import is_jax_namespace
from hypothesis import settings
from hypothesis import strategies as st

from compressm_core import DiagonalStateSpace, StateSpace
from compressm_core._xp import to_host


class Spec(NamedTuple):
    n: int
    m: int
    p: int
    radius: float
    complex_: bool
    diagonal: bool
    batch: tuple[int, ...]
    seed: int


@st.composite
def specs(
    draw: Any,
    *,
    min_n: int = 1,
    max_n: int = 8,
    max_io: int = 3,
    diagonal: bool | None = None,
    complex_: bool | None = None,
    batch: bool = True,
    min_radius: float = 0.05,
    max_radius: float = 0.999,
) -> Spec:
    return Spec(
        n=draw(st.integers(min_n, max_n)),
        m=draw(st.integers(1, max_io)),
        p=draw(st.integers(1, max_io)),
        radius=draw(st.floats(min_radius, max_radius)),
        complex_=draw(st.booleans()) if complex_ is None else complex_,
        diagonal=draw(st.booleans()) if diagonal is None else diagonal,
        batch=draw(st.sampled_from([(), (2,)])) if batch else (),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _poles(rng: np.random.Generator, spec: Spec) -> np.ndarray:
    size = (*spec.batch, spec.n)
    moduli = rng.uniform(0.0, spec.radius, size=size)
    moduli[..., 0] = spec.radius
    if spec.complex_:
        return moduli * np.exp(1j * rng.uniform(-np.pi, np.pi, size=size))
    return moduli * rng.choice([-1.0, 1.0], size=size)


def _real_block(rng: np.random.Generator, spec: Spec) -> np.ndarray:
    """Real matrix with spectral radius ``spec.radius``: 2x2 rotation blocks and real poles."""
    a = np.zeros((*spec.batch, spec.n, spec.n))
    k = 0
    first = True
    while k < spec.n:
        r = spec.radius if first else rng.uniform(0.0, spec.radius, size=spec.batch)
        first = False
        if k + 1 < spec.n and rng.random() < 0.6:
            th = rng.uniform(0.05, np.pi - 0.05, size=spec.batch)
            c, s = r * np.cos(th), r * np.sin(th)
            a[..., k, k], a[..., k, k + 1], a[..., k + 1, k], a[..., k + 1, k + 1] = c, -s, s, c
            k += 2
        else:
            a[..., k, k] = r * rng.choice([-1.0, 1.0], size=spec.batch)
            k += 1
    return a


def build(spec: Spec) -> DiagonalStateSpace | StateSpace:
    """A NumPy system of the given structure (stable, generically minimal)."""
    rng = np.random.default_rng(spec.seed)
    cdt = complex if spec.complex_ else float

    def mat(*shape: int) -> np.ndarray:
        x = rng.normal(size=(*spec.batch, *shape))
        if spec.complex_:
            x = x + 1j * rng.normal(size=(*spec.batch, *shape))
        return x.astype(cdt)

    b, c, d = mat(spec.n, spec.m), mat(spec.p, spec.n), mat(spec.p, spec.m)
    if spec.diagonal:
        return DiagonalStateSpace(_poles(rng, spec), b, c, d)
    core = np.zeros((*spec.batch, spec.n, spec.n), dtype=cdt)
    if spec.complex_:
        core = core + _poles(rng, spec)[..., None, :] * np.eye(spec.n)
        core = core + np.triu(mat(spec.n, spec.n), 1) * 0.2 / np.sqrt(spec.n)
    else:
        core = _real_block(rng, spec)
    v = np.eye(spec.n) + 0.3 * mat(spec.n, spec.n) / np.sqrt(spec.n)
    a = v @ core @ np.linalg.inv(v)
    return StateSpace(a.astype(cdt), b, c, d)


def time_varying_sequences(spec: Spec, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A_t, B_t, C_t)``: ``steps`` systems of one structure (:func:`build` with seeds derived
    from ``spec.seed``) stacked along the time axis (``-2`` for diagonal poles, else ``-3``)."""
    systems = [build(spec._replace(seed=(spec.seed + 7919 * t) % 2**32)) for t in range(steps)]
    axis = -2 if spec.diagonal else -3
    a = np.stack([s[0] for s in systems], axis=axis)
    b = np.stack([s.b for s in systems], axis=-3)
    c = np.stack([s.c for s in systems], axis=-3)
    return a, b, c


def selective_inputs(
    xp: ModuleType,
    *,
    groups: int | None = None,
    seed: int = 0,
    batch: int = 3,
    steps: int = 5,
    channels: int = 4,
    states: int = 6,
) -> tuple[Any, Any, Any, Any]:
    """Inputs ``(dt, A, B, C)`` of a selective (Mamba-style) layer, as ``xp`` arrays.

    ``dt`` (batch, L, D) in ``[0.01, 1]``, ``A`` (D, N) negative, ``B`` and ``C`` standard normal
    of shape (batch, L, N), or (batch, L, G, N) with ``groups=G``.
    """
    rng = np.random.default_rng(seed)
    dt = rng.uniform(0.01, 1.0, size=(batch, steps, channels))
    a = -np.exp(rng.uniform(-1.0, 1.5, size=(channels, states)))
    shape = (batch, steps, states) if groups is None else (batch, steps, groups, states)
    return tuple(to_xp(x, xp) for x in (dt, a, rng.normal(size=shape), rng.normal(size=shape)))  # type: ignore[return-value]


def skip_jax(xp: ModuleType) -> None:
    """Skip on JAX, whose eager mode compiles every new shape (its traced paths are tested
    under ``jax.jit`` separately)."""
    if is_jax_namespace(xp):
        pytest.skip("JAX compiles every new shape eagerly; covered by the other backends")


def assert_doctests(module: ModuleType, monkeypatch: Any) -> None:
    """Run the docstring examples of ``module`` with its names also set on ``compressm_core``
    (the examples import from the package top level)."""
    import compressm_core

    for name in module.__all__:
        monkeypatch.setattr(compressm_core, name, getattr(module, name), raising=False)
    failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0, f"{module.__name__} has no docstring examples"
    assert failures == 0


def herm(x: np.ndarray) -> np.ndarray:
    """Conjugate transpose of the last two axes."""
    return np.conj(np.swapaxes(x, -1, -2))


def to_xp(sys: Any, xp: ModuleType) -> Any:
    """Move every field of a NumPy system (or an array) to ``xp``."""
    if isinstance(sys, np.ndarray):
        return xp.asarray(sys)
    return type(sys)(*(None if f is None else xp.asarray(f) for f in sys))


def to_np(x: Any) -> Any:
    """A backend array (or system) as NumPy."""
    if isinstance(x, tuple):
        return type(x)(*(None if f is None else to_np(f) for f in x))
    return to_host(x, allow_transfer=True)


def dense_np(sys: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(A, B, C, D)`` of a NumPy system."""
    sys = to_np(sys)
    if isinstance(sys, DiagonalStateSpace):
        return sys.poles[..., None, :] * np.eye(sys.poles.shape[-1]), sys.b, sys.c, sys.d
    return sys.a, sys.b, sys.c, sys.d


def markov(sys: Any, k: int, *, real_output: bool = False) -> np.ndarray:
    """Markov parameters ``[D, CB, CAB, ..., C A^{k-2} B]`` (real part for real output)."""
    a, b, c, d = dense_np(sys)
    out = [np.zeros(c.shape[:-1] + b.shape[-1:]) if d is None else d]
    x = b
    for _ in range(k - 1):
        out.append(c @ x)
        x = a @ x
    res = np.stack(out, axis=-3)
    return res.real if real_output else res


def assert_rel(actual: Any, desired: Any, rtol: float, *, scale: float | None = None) -> None:
    """``max|actual - desired| <= rtol * scale`` with ``scale = max|desired|`` by default."""
    actual, desired = np.asarray(to_np(actual)), np.asarray(to_np(desired))
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    ref = np.max(np.abs(desired), initial=0.0) if scale is None else scale
    err = np.max(np.abs(actual - desired), initial=0.0)
    assert err <= rtol * max(ref, 1e-300), f"max error {err:.3e} > {rtol:.1e} * {ref:.3e}"


def _dtype_name(dtype: Any) -> str:
    """A dtype's name without its namespace (``torch.float64`` -> ``"float64"``)."""
    if isinstance(dtype, (np.dtype, type)):
        return str(np.dtype(dtype))
    return str(dtype).split(".")[-1]


def assert_close(
    actual: Any,
    desired: Any,
    rtol: float,
    *,
    scale: float | None = None,
    xp: ModuleType | None = None,
    dtype: Any = None,
    device: Any = None,
) -> None:
    """Check an array's namespace, dtype, device and shape, then ``max|actual - desired| <=
    rtol * scale`` (``scale = max|desired|`` by default), as :func:`assert_rel` does.

    Parameters
    ----------
    actual : array
        The computed array; it must be an Array API array of namespace ``xp``.
    desired : array or array_like
        The expected values (any namespace, compared on the host).
    rtol : float
        Allowed error relative to ``scale``.
    scale : float, optional
        Reference magnitude of the error; ``max|desired|`` by default.
    xp : module, optional
        Expected namespace of ``actual``; that of ``desired`` by default.
    dtype : dtype, optional
        Expected dtype of ``actual`` (compared by name when ``desired`` is of another
        namespace); that of ``desired`` by default.
    device : device, optional
        Expected device of ``actual``; that of ``desired`` when it is of namespace ``xp``,
        else the default device of ``xp``.

    Raises
    ------
    AssertionError
        On a different namespace, dtype, device, shape, or values farther apart than allowed.
    """
    assert array_api_compat.is_array_api_obj(actual), f"not an array: {type(actual).__name__}"
    got_xp = array_api_compat.array_namespace(actual)
    desired_xp = (
        array_api_compat.array_namespace(desired)
        if array_api_compat.is_array_api_obj(desired)
        else None
    )
    want_xp = desired_xp if xp is None else xp
    assert want_xp is not None, "give `xp` when `desired` is not an array"
    want_xp = array_api_compat.array_namespace(want_xp.asarray(0.0))
    assert got_xp is want_xp, f"namespace {got_xp.__name__} != {want_xp.__name__}"
    same_xp = desired_xp is want_xp
    if dtype is None:
        assert desired_xp is not None, "give `dtype` when `desired` is not an array"
        dtype = desired.dtype
    assert _dtype_name(actual.dtype) == _dtype_name(dtype), f"dtype {actual.dtype} != {dtype}"
    if device is None:
        source = desired if same_xp else want_xp.asarray(0.0)
        device = array_api_compat.device(source)
    got_device = array_api_compat.device(actual)
    assert got_device == device, f"device {got_device} != {device}"
    host = to_np(desired) if desired_xp is not None else np.asarray(desired)
    assert_rel(actual, host, rtol, scale=scale)


def backend_settings(xp: ModuleType, *, jax_examples: int = 2) -> settings:
    """Hypothesis settings for a backend.

    JAX's eager mode compiles every new shape, so it runs only ``jax_examples`` examples (its
    traced paths are tested under ``jax.jit`` separately); the others follow the active profile.
    """
    return settings(max_examples=jax_examples) if is_jax_namespace(xp) else settings()
