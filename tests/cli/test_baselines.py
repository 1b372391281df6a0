"""`compressm compare --baselines`: the kd, hnn and post arms end to end, and their refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch

import compressm_cli.training as training
from compressm_cli.app import main
from compressm_cli.baselines import BASELINES

TINY = ["--task", "digits", "--steps", "8", "--eval-every", "4", "--d-state", "8"]
TINY += ["--seeds", "0", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    """The runs use one torch thread (``--threads 1``); the others get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``; check exit status 2 and a single error line; return it."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def train(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before checking the options")

    monkeypatch.setattr(training, "train", train)


def test_baselines_run_end_to_end_in_compare(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", *TINY, "--baselines", "post,kd,hnn", "--out", str(out)]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    for label in (
        "knowledge distillation",
        "Hankel-norm penalty + cut",
        "cut after training + fine-tune",
    ):
        assert f"| {label} |" in printed
    assert "before the cut" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {row["run"]: row for row in report["summary"]}
    assert list(rows) == ["full", "compressm", "small", "post", "kd", "hnn"]
    assert set(report["runs"]) == set(rows)
    sizes = rows["compressm"]["final_state"]
    for name in BASELINES:
        assert rows[name]["final_state"] == sizes
        (run,) = report["runs"][name]
        assert run["config"]["baseline"]["name"] == name
        assert 0 <= run["test_metric"] <= 1
    full = report["runs"]["full"][0]
    kd, hnn, post = (report["runs"][n][0] for n in ("kd", "hnn", "post"))
    assert set(kd["stages"]) == {"teacher", "student"}
    assert kd["stages"]["teacher"]["test"] == full["test_metric"]
    assert kd["train_seconds"] > full["train_seconds"]  # the teacher's time counts
    assert set(hnn["stages"]) == {"before_cut", "after_cut"}
    assert hnn["test_metric"] == hnn["stages"]["after_cut"]["test"]
    assert hnn["initial_sizes"] == full["initial_sizes"]
    assert set(post["stages"]) == {"trained", "after_cut", "fine_tuned"}
    assert post["stages"]["trained"]["test"] == full["test_metric"]
    assert post["config"]["baseline"]["finetune_steps"] == 1  # 10 % of 8 steps, rounded
    assert post["train_seconds"] > full["train_seconds"]
    assert post["curve"][-1][0] == 9  # the fine-tuning step follows the full run's 8
    for run in (hnn, post):
        reduced = [e for e in run["events"] if e["status"] == "reduced"]
        assert [e["new_rank"] for e in reduced] == list(sizes.values())
    pairs = {(p["arm"], p["other"]) for p in report["paired"]}
    assert {("compressm", name) for name in BASELINES} <= pairs
    assert "- Hankel-norm penalty + cut, test accuracy: " in (out / "report.md").read_text()


def test_distillation_on_a_regression_task(tmp_path):
    out = tmp_path / "run"
    argv = ["compare", "--task", "sysid", "--steps", "6", "--eval-every", "3", "--d-state", "8"]
    argv += ["--seeds", "0", "--threads", "1", "--no-progress", "--baselines", "kd"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    (kd,) = report["runs"]["kd"]
    assert kd["metric_name"] == "mse"
    assert kd["stages"]["student"]["test"] == kd["test_metric"] > 0


def test_post_and_kd_with_selective_layers(tmp_path):
    """Mamba: post keeps the state indices by their importance over training batches."""
    out = tmp_path / "run"
    argv = ["compare", *TINY, "--model", "mamba", "--baselines", "post,kd", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {row["run"]: row for row in report["summary"]}
    sizes = rows["compressm"]["final_state"]
    assert rows["post"]["final_state"] == rows["kd"]["final_state"] == sizes
    (post,) = report["runs"]["post"]
    cut = [e for e in post["events"] if e["status"] == "reduced"]
    assert cut
    assert [e["new_rank"] for e in cut] == [n for n in sizes.values() if n < 8]
    assert all(e["error_bound"] is None for e in cut)  # index selection has no bound


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--baselines", "kd,distill"], "argument --baselines: expected a comma-separated subset"),
        (["--baselines", ""], "argument --baselines: expected a comma-separated subset"),
        (["--baselines", "hnn", "--model", "mamba"], "argument --baselines: hnn penalises"),
        (["--baselines", "kd", "--backend", "jax"], "argument --baselines: the JAX backend"),
        (["--baselines", "post", "--finetune-fraction", "0"], "argument --finetune-fraction:"),
        (["--baselines", "hnn", "--hnn-weight", "-1"], "argument --hnn-weight:"),
    ],
)
def test_bad_baseline_options_are_refused_before_training(argv, message, tmp_path, capsys):
    line = _usage_error(["compare", *TINY, *argv, "--out", str(tmp_path)], capsys)
    assert message in line


@pytest.mark.usefixtures("no_training")
def test_distillation_needs_a_teacher_signal(tmp_path, capsys):
    path = tmp_path / "one_class.npz"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5, 2)).astype(np.float32)
    np.savez(
        path, x_train=x, y_train=np.zeros(40, np.int64), x_test=x, y_test=np.zeros(40, np.int64)
    )
    argv = ["compare", "--task", str(path), "--baselines", "post,kd", "--out", str(tmp_path)]
    line = _usage_error(argv, capsys)
    assert "argument --baselines: kd needs a teacher signal" in line
    assert "single class" in line
