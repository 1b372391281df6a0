"""Type aliases shared by the core.

At run time they are plain aliases so that nothing heavy is imported; type checkers see the
same names.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, TypeAlias

__all__ = ["Array", "DType", "Device", "Namespace"]

Array: TypeAlias = Any
"""Any array object of an Array API compatible library."""

Namespace: TypeAlias = ModuleType
"""An Array API namespace (``array_api_compat.array_namespace(x)``)."""

Device: TypeAlias = Any
DType: TypeAlias = Any
