"""Former name of :mod:`compressm_core.files` (kept so that older imports still work)."""

from __future__ import annotations

from .files import READ_ERRORS, atomic_write, unreadable

__all__ = ["READ_ERRORS", "atomic_write", "unreadable"]
