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
from .certificates import RankingCertificate, RankTracker, ranking_certificate
from .diagonalize import rediagonalize
from .errors import (
    BackendCapabilityError,
    BackendMismatchError,
    CheckpointError,
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
from .ordering import pole_order, tolerant_argsort
from .perturbation import hankel_operator, hsv_a_priori_bound, hsv_perturbation_bound
from .rank import hankel_error_bound, select_rank, select_ranks
from .schedule import ReductionEvent, ReductionWarning, reduction_schedule
from .selective import (
    SelectiveGramians,
    SelectiveStatistics,
    finalize_selective_statistics,
    init_selective_statistics,
    mean_lti_surrogate,
    merge_selective_statistics,
    select_state_indices,
    selective_gramians,
    state_importance,
    update_selective_statistics,
)
from .systems import DiagonalStateSpace, StateSpace, real_output_realization, to_dense
from .time_varying import TimeVaryingGramians, time_varying_gramians

__version__ = "0.1.0.dev0"

__all__ = [
    "BackendCapabilityError",
    "BackendMismatchError",
    "BalancedRealization",
    "BalancedTruncation",
    "CheckpointError",
    "CompressmError",
    "ConditioningError",
    "DiagonalStateSpace",
    "GramianFactors",
    "RankTracker",
    "RankingCertificate",
    "ReductionEvent",
    "ReductionWarning",
    "SelectiveGramians",
    "SelectiveStatistics",
    "ShapeError",
    "StabilityError",
    "StateSpace",
    "TimeVaryingGramians",
    "balanced_realization",
    "balanced_truncation",
    "controllability_gramian",
    "finalize_selective_statistics",
    "frequency_response",
    "gramian_factors",
    "h2_norm",
    "h_infinity_norm",
    "hankel_error_bound",
    "hankel_operator",
    "hankel_singular_values",
    "hsv_a_priori_bound",
    "hsv_perturbation_bound",
    "init_selective_statistics",
    "mean_lti_surrogate",
    "merge_selective_statistics",
    "observability_gramian",
    "pole_order",
    "ranking_certificate",
    "real_output_realization",
    "rediagonalize",
    "reduction_schedule",
    "select_rank",
    "select_ranks",
    "select_state_indices",
    "selective_gramians",
    "solve_discrete_lyapunov",
    "state_importance",
    "time_varying_gramians",
    "to_dense",
    "tolerant_argsort",
    "update_selective_statistics",
]
