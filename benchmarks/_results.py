"""Writing a benchmark's results: ``<out>.json`` (the data) and ``<out>.md`` (its tables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_results"]


def write_results(out: Path, report: dict[str, Any], markdown: str) -> None:
    """Write ``report`` to ``out.json`` (indented) and ``markdown`` to ``out.md``, creating the
    folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown + "\n")
