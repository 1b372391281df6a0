"""The shared assertions of ``tests/_helpers.py`` fail when they should."""

from __future__ import annotations

import numpy as np
import pytest

from tests._helpers import assert_close, assert_rel

strict = pytest.importorskip("array_api_strict")


def test_assert_close_accepts_equal_arrays_within_the_tolerance() -> None:
    x = strict.asarray([1.0, -2.0, 3.0])
    assert_close(x, x, 0.0)
    assert_close(x + 1e-9, x, 1e-9)  # error 1e-9 <= 1e-9 * max|x| = 3e-9
    assert_close(x, np.array([1.0, -2.0, 3.0]), 0.0, xp=strict)  # NumPy reference
    assert_close(x, [1.0, -2.0, 3.0], 0.0, xp=strict, dtype=strict.float64)


def test_assert_close_fails_on_a_wrong_namespace() -> None:
    x = strict.asarray([1.0, 2.0])
    with pytest.raises(AssertionError, match="namespace"):
        assert_close(np.asarray([1.0, 2.0]), x, 1.0)
    with pytest.raises(AssertionError, match="namespace"):
        assert_close(x, np.asarray([1.0, 2.0]), 1.0)
    with pytest.raises(AssertionError, match="not an array"):
        assert_close([1.0, 2.0], x, 1.0)


def test_assert_close_fails_on_a_wrong_dtype() -> None:
    x = strict.asarray([1.0, 2.0], dtype=strict.float64)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(strict.astype(x, strict.float32), x, 1.0)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(x, np.asarray([1.0, 2.0]), 1.0, xp=strict, dtype=strict.float32)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(x, np.asarray([1.0, 2.0], dtype=np.float32), 1.0, xp=strict)


def test_assert_close_fails_on_a_wrong_device() -> None:
    devices = strict.__array_namespace_info__().devices()
    if len(devices) < 2:
        pytest.skip("one device only")
    x = strict.asarray([1.0, 2.0], device=devices[0])
    y = strict.asarray([1.0, 2.0], device=devices[1])
    with pytest.raises(AssertionError, match="device"):
        assert_close(y, x, 1.0)
    with pytest.raises(AssertionError, match="device"):
        assert_close(y, np.asarray([1.0, 2.0]), 1.0, xp=strict)  # default device expected
    assert_close(y, np.asarray([1.0, 2.0]), 0.0, xp=strict, device=devices[1])


def test_assert_close_fails_on_a_wrong_shape_or_value() -> None:
    x = strict.asarray([1.0, 2.0])
    with pytest.raises(AssertionError):
        assert_close(strict.asarray([[1.0, 2.0]]), x, 1.0)  # broadcastable is not enough
    with pytest.raises(AssertionError, match="max error"):
        assert_close(x + 1e-6, x, 1e-7)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(x + 1e-6, x, 1e-6, scale=0.5)


def test_assert_close_on_torch_and_jax_arrays() -> None:
    torch = pytest.importorskip("torch")
    t = torch.ones(2, dtype=torch.float64)
    assert_close(t, np.ones(2), 0.0, xp=torch)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(t.float(), t, 1.0)
    if torch.cuda.is_available():
        with pytest.raises(AssertionError, match="device"):
            assert_close(t.cuda(), t, 1.0)
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(AssertionError, match="namespace"):
        assert_close(t, jnp.ones(2), 1.0)


def test_assert_rel_fails_on_a_wrong_shape_or_value() -> None:
    assert_rel(np.ones(3), np.ones(3), 0.0)
    with pytest.raises(AssertionError):
        assert_rel(np.ones(3), np.ones(2), 1.0)
    with pytest.raises(AssertionError, match="max error"):
        assert_rel(np.ones(3) + 1e-3, np.ones(3), 1e-4)
