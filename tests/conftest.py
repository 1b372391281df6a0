"""Test configuration: one `xp` fixture over every installed Array API backend, and the
Hypothesis profiles (``default``; ``thorough`` with ``HYPOTHESIS_PROFILE=thorough``; ``ci``,
derandomized, when ``CI=true``). Tests take their settings from the active profile, through
``tests._helpers.backend_settings`` for the checks run on every backend."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=200)
# CI: the same examples on every run (no database, derandomized), so a red build reproduces.
settings.register_profile(
    "ci", parent=settings.get_profile("default"), derandomize=True, database=None
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "default")
)

BACKENDS = ("numpy", "array_api_strict", "torch", "jax")


def load_backend(name: str) -> ModuleType:
    """Import a backend's Array API namespace, skipping the test if it is not installed."""
    if name == "numpy":
        pytest.importorskip("numpy")
        import array_api_compat.numpy as xp

        return xp
    if name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        xp.set_array_api_strict_flags(api_version="2025.12")
        return xp
    if name == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as xp

        return xp
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        return xp
    raise ValueError(name)


@pytest.fixture(params=BACKENDS, scope="session")
def xp(request: pytest.FixtureRequest) -> ModuleType:
    """The Array API namespace under test."""
    return load_backend(request.param)
