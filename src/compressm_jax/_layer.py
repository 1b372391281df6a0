"""What the NNX reference layers share: parameters set from one dict and read as one tuple."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
from flax import nnx

from ._precision import working_dtype
from ._systems import evaluate

__all__ = ["ParamLayer"]


class ParamLayer(nnx.Module):
    """An NNX layer whose system is a function of the parameters named in ``system_names``."""

    system_names: ClassVar[tuple[str, ...]]
    D: Any  # the feedthrough (H,), an nnx.Param

    def _set_params(self, values: Mapping[str, jax.Array]) -> None:
        """One :class:`flax.nnx.Param` per entry of ``values``, in its order."""
        for name, value in values.items():
            setattr(self, name, nnx.Param(value))

    def _values(self) -> tuple[jax.Array, ...]:
        return tuple(getattr(self, name)[...] for name in self.system_names)

    def _evaluate(
        self, function: Callable[..., Any], options: tuple[tuple[str, Any], ...], dtype: Any
    ) -> Any:
        """``function`` of the parameters in the real precision ``dtype`` (default: that of the
        first parameter, :func:`working_dtype`)."""
        real = working_dtype(getattr(self, self.system_names[0])) if dtype is None else dtype
        return evaluate(function, options, real, self._values())
