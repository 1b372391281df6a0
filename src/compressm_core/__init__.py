"""compressm_core: discrete-time Gramians, Hankel singular values and balanced truncation.

Written once against the Python Array API standard: the same functions run on NumPy, PyTorch,
JAX, CuPy and array-api-strict arrays, batched over leading dimensions, on CPU or GPU. The arrays
choose the backend; this package imports no framework.
"""

from .balanced import (
    BalancedRealization,
    BalancedTruncation,
    balanced_realization,
    balanced_truncation,
)
from .diagonalize import rediagonalize
from .errors import (
    BackendCapabilityError,
    BackendMismatchError,
    CompressmError,
    ConditioningError,
    ShapeError,
    StabilityError,
)
from .gramians import (
    GramianFactors,
    controllability_gramian,
    gramian_factors,
    observability_gramian,
)
from .hankel import hankel_singular_values
from .lyapunov import solve_discrete_lyapunov
from .norms import frequency_response, h2_norm, h_infinity_norm
from .rank import hankel_error_bound, select_rank
from .systems import DiagonalStateSpace, StateSpace, real_output_realization, to_dense

__version__ = "0.1.0.dev0"

__all__ = [
    "BackendCapabilityError",
    "BackendMismatchError",
    "BalancedRealization",
    "BalancedTruncation",
    "CompressmError",
    "ConditioningError",
    "DiagonalStateSpace",
    "GramianFactors",
    "ShapeError",
    "StabilityError",
    "StateSpace",
    "balanced_realization",
    "balanced_truncation",
    "controllability_gramian",
    "frequency_response",
    "gramian_factors",
    "h2_norm",
    "h_infinity_norm",
    "hankel_error_bound",
    "hankel_singular_values",
    "observability_gramian",
    "real_output_realization",
    "rediagonalize",
    "select_rank",
    "solve_discrete_lyapunov",
    "to_dense",
]
