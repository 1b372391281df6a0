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


def test_state_size_curve_changes_at_the_event_steps_not_at_evaluations() -> None:
    from compressm_cli.report import size_steps
    from compressm_cli.training import RunResult

    def event(step: int, layer: str, new: int, status: str = "reduced") -> dict[str, Any]:
        return {"step": step, "layer": layer, "status": status, "new_rank": new}

    run = RunResult(
        config={"steps": 100},
        metric_name="accuracy",
        test_metric=0.5,
        val_metric=0.5,
        train_seconds=1.0,
        reduction_seconds=0.1,
        initial_sizes={"a": 32, "b": 32},
        final_sizes={"a": 4, "b": 6},
        curve=[(50, 0.5, 0.4, 12), (100, 1.0, 0.5, 10)],  # evaluations at 50 and 100 only
        events=[
            event(15, "a", 20),
            event(15, "b", 20),
            event(30, "a", 12),
            event(30, "b", 30, "skipped"),
            event(45, "a", 6),
            event(60, "a", 4),
            event(60, "b", 6),
        ],
    )
    assert size_steps(run) == ([0, 15, 30, 45, 60, 100], [64, 40, 32, 26, 10, 10])
    rolled = RunResult(
        **{**run.__dict__, "events": [event(10, "a", 8), event(20, "a", 32, "rolled_back")]}
    )
    assert size_steps(rolled) == ([0, 10, 20, 100], [64, 40, 64, 64])


def test_hsv_plots_tick_whole_state_indices(tmp_path: Path, monkeypatch: Any) -> None:
    import matplotlib.ticker

    from compressm_cli import report
    from compressm_cli.training import RunResult

    seen: list[Any] = []
    real = report.save_figure

    def keep(fig: Figure, path: Path) -> None:
        seen.append(fig.axes[0].xaxis.get_major_locator())
        real(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    event = {"step": 3, "layer": "l", "old_rank": 5, "new_rank": 2, "hsv": [3.0, 2.0, 1.0]}
    run = RunResult({}, "accuracy", 0.5, 0.5, 1.0, 0.0, {"l": 5}, {"l": 2}, events=[event])
    report.plot_hsv_spectra(run, tmp_path / "hsv.png")
    (locator,) = seen
    assert isinstance(locator, matplotlib.ticker.MaxNLocator)
    assert all(float(t).is_integer() for t in locator.tick_values(1, 3.5))
