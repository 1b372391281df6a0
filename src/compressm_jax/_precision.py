"""Working precision of the recurrent core of a layer, and of the systems read from it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["complex_of", "highest_dtype", "working_dtype"]


def working_dtype(*arrays: Any) -> Any:
    """float64 if any array is float64, else float32 (half and bfloat16 are promoted)."""
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def complex_of(dtype: Any) -> Any:
    """The complex dtype with ``dtype``'s real precision."""
    return jnp.complex128 if dtype == jnp.float64 else jnp.complex64


def highest_dtype() -> Any:
    """float64 when ``jax_enable_x64`` is on, else float32."""
    return (
        jnp.float64 if jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64 else jnp.float32
    )
