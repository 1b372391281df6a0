"""The report files of the CLI are replaced whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure

from compressm_cli.report import save_figure, write_text


def test_write_text_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("old\n")
    write_text(target, "new ü\n")
    assert target.read_text(encoding="utf-8") == "new ü\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_plot_that_fails_midway_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "hsv.png"
    fig = Figure()
    fig.subplots().plot([1, 2, 3])
    save_figure(fig, target)
    before = target.read_bytes()
    assert before.startswith(b"\x89PNG")

    def broken(self: Figure, fname: Any, **kwargs: Any) -> None:
        fname.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["hsv.png"]
