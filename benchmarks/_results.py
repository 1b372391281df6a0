"""Writing a benchmark's results: ``<out>.json`` (the data) and ``<out>.md`` (its tables)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["mean_std", "write_results"]


def mean_std(values: list[float], spec: str = ".4g", spread_spec: str = ".2g") -> str:
    """``"mean ± std"`` of ``values`` (sample standard deviation; 0 for one value, ``"-"`` for
    none), the mean formatted by ``spec`` and the spread by ``spread_spec``."""
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{spec}} ± {spread:{spread_spec}}"


def write_results(out: Path, report: dict[str, Any], markdown: str) -> None:
    """Write ``report`` to ``out.json`` (indented) and ``markdown`` to ``out.md``, creating the
    folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown + "\n")
