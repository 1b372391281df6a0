"""Exceptions raised by compressm.

Every exception subclasses a builtin so that callers who do not know compressm can still catch
it (``except ValueError``), and :class:`CompressmError` so that callers who do can catch all of
them at once.
"""

from __future__ import annotations

__all__ = [
    "BackendCapabilityError",
    "BackendMismatchError",
    "CheckpointError",
    "CompressmError",
    "ConditioningError",
    "ShapeError",
    "StabilityError",
]


class CompressmError(Exception):
    """Base class of every exception raised by compressm."""


class ShapeError(CompressmError, ValueError):
    """An argument has the wrong number of dimensions or mismatching sizes."""


class StabilityError(CompressmError, ValueError):
    """A system is not (Schur) stable: a pole has modulus ``>= 1``, or a value is non-finite."""


class ConditioningError(CompressmError, ValueError):
    """A problem is singular or too ill-conditioned to solve reliably.

    Raised for Lyapunov equations without a unique solution, for balancing transforms of
    (numerically) non-minimal systems, and for eigenvector bases too ill-conditioned to
    re-diagonalise.
    """


class BackendMismatchError(CompressmError, TypeError):
    """Arrays from different array libraries or on different devices were mixed."""


class BackendCapabilityError(CompressmError, NotImplementedError):
    """The array library or device lacks a routine and no allowed fallback exists."""


class CheckpointError(CompressmError, ValueError):
    """A checkpoint or data file cannot be read, is not what it claims to be, or does not fit.

    Raised when loading a file that is truncated or corrupt, is not a compressm checkpoint,
    records sizes or shapes that the model cannot take, or holds values outside their documented
    bounds. The message names the file and the problem. The model, optimizer and controller given
    to the loader are left as they were.
    """
