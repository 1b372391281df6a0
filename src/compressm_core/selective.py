"""Gramian statistics and state importance for selective (Mamba-style) state-space layers.

The names of this module live in two others and are re-exported here (and from the
``compressm_core`` top level):

- :mod:`compressm_core.selective_statistics`: the streaming accumulator
  (:class:`SelectiveStatistics`, :func:`init_selective_statistics`,
  :func:`update_selective_statistics`, :func:`merge_selective_statistics`,
  :func:`finalize_selective_statistics`), its result :class:`SelectiveGramians` and the one-pass
  :func:`selective_gramians` and :func:`mean_lti_surrogate`;
- :mod:`compressm_core.importance`: one score per state index (:func:`state_importance`) and
  the indices to keep (:func:`select_state_indices`).
"""

from __future__ import annotations

from .importance import select_state_indices, state_importance
from .selective_statistics import (
    SelectiveGramians,
    SelectiveStatistics,
    finalize_selective_statistics,
    init_selective_statistics,
    mean_lti_surrogate,
    merge_selective_statistics,
    selective_gramians,
    update_selective_statistics,
)

__all__ = [
    "SelectiveGramians",
    "SelectiveStatistics",
    "finalize_selective_statistics",
    "init_selective_statistics",
    "mean_lti_surrogate",
    "merge_selective_statistics",
    "select_state_indices",
    "selective_gramians",
    "state_importance",
    "update_selective_statistics",
]
