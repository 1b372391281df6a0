"""The `compressm` command end to end: real (short) training runs, real files."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("mnist1d")

from compressm_cli.app import main

FAST = ["--steps", "60", "--eval-every", "20", "--d-state", "16", "--no-progress"]


def test_compare_writes_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compare", *FAST, "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "CompreSSM" in printed
    assert "small from scratch" in printed
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "complete"
    assert report["task"] == "mnist1d"
    rows = {row["run"]: row for row in report["summary"]}
    assert set(rows) == {"full", "compressm", "small"}
    assert rows["full"]["final_state"] == {"blocks.0.ssm": 16}
    reduced = rows["compressm"]["final_state"]["blocks.0.ssm"]
    assert reduced < 16
    assert rows["small"]["final_state"] == {"blocks.0.ssm": reduced}
    assert rows["full"]["speedup_vs_full"] == pytest.approx(1.0)
    for row in rows.values():
        assert 0 <= row["test_metric"] <= 1
        assert row["train_seconds"] > 0
    events = report["runs"]["compressm"][0]["events"]
    assert next(e["step"] for e in events if e["status"] == "reduced") == 2
    for name in ("report.md", "hsv_spectra.png", "state_size.png", "metric_vs_time.png"):
        assert (out / name).stat().st_size > 0
    assert "| CompreSSM |" in (out / "report.md").read_text()


def test_train_then_analyze(tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["train", *FAST, "--task", "digits", "--out", str(out)]) == 0
    checkpoint = out / "checkpoint.pt"
    assert checkpoint.is_file()
    capsys.readouterr()
    assert main(["analyze", str(checkpoint), "--taus", "0.05", "0.5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.ssm" in printed
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    layer = analysis["layers"]["blocks.0.ssm"]
    trained = json.loads((out / "report.json").read_text())["runs"]["compressm"][0]
    assert layer["state_size"] == trained["final_sizes"]["blocks.0.ssm"]
    ranks = [row["rank"] for row in layer["ranks"]]
    assert ranks[0] >= ranks[1] >= 1
    assert (tmp_path / "hsv.png").stat().st_size > 0


def test_pragmatic_mode_is_judged_by_the_validation_metric(tmp_path):
    out = tmp_path / "pragmatic"
    argv = ["train", "--steps", "100", "--eval-every", "2", "--d-state", "16", "--no-progress"]
    assert main([*argv, "--task", "digits", "--mode", "pragmatic", "--out", str(out)]) == 0
    run = json.loads((out / "report.json").read_text())["runs"]["compressm"][0]
    statuses = {e["status"] for e in run["events"]}
    # each reduction follows a metric and is judged by the next one: kept or rolled back
    assert statuses & {"reduced", "rolled_back"}
    assert not any("needs a val_metric" in e["reason"] for e in run["events"])


def test_mamba_compare_train_and_analyze(tmp_path, capsys):
    out = tmp_path / "mamba"
    argv = ["--model", "mamba", "--task", "digits", "--seeds", "0"]
    assert main(["compare", *FAST, *argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {row["run"]: row for row in report["summary"]}
    reduced = rows["compressm"]["final_state"]["blocks.0.ssm"]
    assert reduced < 16
    assert rows["small"]["final_state"] == {"blocks.0.ssm": reduced}
    events = report["runs"]["compressm"][0]["events"]
    assert all(e["error_bound"] is None for e in events if e["status"] == "reduced")
    train = tmp_path / "train"
    assert main(["train", *FAST, "--model", "mamba", "--task", "digits", "--out", str(train)]) == 0
    capsys.readouterr()
    checkpoint = str(train / "checkpoint.pt")
    assert main(["analyze", checkpoint, "--taus", "0.05", "0.5", "--out", str(tmp_path)]) == 0
    assert "none (selective layer)" in capsys.readouterr().out
    layer = json.loads((tmp_path / "analysis.json").read_text())["layers"]["blocks.0.ssm"]
    assert layer["kind"] == "selective"
    assert layer["hsv"] == sorted(layer["hsv"], reverse=True)
    assert layer["ranks"][0]["rank"] >= layer["ranks"][1]["rank"] >= 1


def test_max_bound_keeps_each_cut_within_its_error_bound(tmp_path, capsys):
    """``--max-bound b``: every event keeps enough states that the cut HSVs satisfy
    ``2 sum sigma_i <= b sigma_1`` of the HSVs it measured, and the report stores ``b``. With
    ``tau 0.5`` the tolerance rule alone cuts far deeper, so the first event keeps the smallest
    rank within the bound."""
    out = tmp_path / "run"
    argv = ["train", *FAST, "--tau", "0.5", "--max-cut", "1", "--max-bound", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    run = json.loads((out / "report.json").read_text())["runs"]["compressm"][0]
    assert run["config"]["max_bound"] == 1.0
    reduced = [e for e in run["events"] if e["status"] == "reduced"]
    assert reduced
    for event in reduced:
        hsv = event["hsv"]
        assert 2 * sum(hsv[event["new_rank"] :]) <= hsv[0] * (1 + 1e-9)
    first = reduced[0]
    assert 2 * sum(first["hsv"][first["new_rank"] - 1 :]) > first["hsv"][0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--task", "cifar"], "argument --task"),
        (["compare", "--tau", "1.5"], "argument --tau"),
        (["compare", "--steps", "0"], "argument --steps"),
        (["compare", "--device", "gpu0"], "argument --device"),
        (["train", "--horizon", "-3"], "argument --horizon"),
        (["train", "--max-bound", "0"], "argument --max-bound"),
        (["analyze", "missing.pt"], "no such file"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_analyze_rejects_a_foreign_checkpoint(tmp_path, capsys):
    import torch

    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(path)])
    assert exc.value.code == 2
    assert "not a checkpoint written by `compressm train`" in capsys.readouterr().err


def test_interrupted_compare_leaves_a_partial_report(tmp_path, monkeypatch):
    import compressm_cli.training as training

    calls = {"n": 0}
    original = training.task_loss

    def interrupting(task, out, target):
        calls["n"] += 1
        if calls["n"] == 100:  # inside the second (CompreSSM) run
            raise KeyboardInterrupt
        return original(task, out, target)

    monkeypatch.setattr(training, "task_loss", interrupting)
    out = tmp_path / "run"
    assert main(["compare", *FAST, "--out", str(out)]) == 130
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert len(report["runs"]["full"]) == 1
    partial = report["runs"]["compressm"][0]
    assert partial["status"] == "interrupted at step 40"
    assert partial["final_sizes"]["blocks.0.ssm"] < 16
    assert (out / "report.md").is_file()


def test_sysid_report_states_the_true_order(tmp_path):
    out = tmp_path / "sysid"
    assert main(["compare", *FAST, "--task", "sysid", "--seeds", "0", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task_info"]["true_order"] == 6
    assert len(report["task_info"]["true_hsv"]) == 6
    assert {row["metric_name"] for row in report["summary"]} == {"mse"}
    text = (out / "report.md").read_text()
    assert "True system order: 6 real states = 3 complex" in text
    (info,) = [line for line in text.splitlines() if line.startswith("- task_info: ")]
    assert "true_order = 6" in info
    assert "{'" not in info  # not a Python dict
    hsv = report["task_info"]["true_hsv"]
    assert f"true_hsv = [{hsv[0]:.4g}, " in info
    mse = report["summary"][0]["test_metric"]
    assert f"| full size | {mse:.3g} |" in text  # not rounded to 0.00
    rows = {row["run"]: row for row in report["summary"]}
    assert rows["below"]["final_state"] == {"blocks.0.ssm": 2}  # 3 complex states needed
    assert "| small below the true order |" in text
    assert "One state below the true order" in text


def test_compare_prints_paired_differences_and_the_sweep(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["compare", "--steps", "40", "--eval-every", "20", "--d-state", "8", "--no-progress"]
    assert main([*args, "--seeds", "0", "1", "--sweep", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    runs = report["runs"]
    diffs = [
        a["test_metric"] - b["test_metric"]
        for a, b in zip(runs["compressm"], runs["small"], strict=True)
    ]
    small_vs = report["paired"][0]
    assert (small_vs["arm"], small_vs["other"], small_vs["seeds"]) == (
        "compressm",
        "small",
        [0, 1],
    )
    assert small_vs["differences"] == pytest.approx(diffs)
    assert small_vs["better"] == sum(d > 0 for d in diffs)
    assert "CompreSSM - small from scratch, paired by seed:" in printed
    sweep = report["sweep"]
    assert sweep["sizes"] == [2, 4, 8]
    assert sweep["total_seconds"] == pytest.approx(sum(sweep["seconds"]))
    best = max(range(3), key=lambda i: sweep["val"][i])
    assert (sweep["best_size"], sweep["best_test"]) == (sweep["sizes"][best], sweep["test"][best])
    assert sweep["seconds"][-1] == runs["full"][0]["train_seconds"]  # the full run closes it
    assert "Sweep of sizes 2, 4, 8 (seed 0)" in printed
    assert "Sweep of sizes" in (out / "report.md").read_text()


def test_quick_says_it_is_a_smoke_test(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--quick", *FAST, "--seeds", "0", "--out", str(out)]) == 0
    assert "too short to compare the methods" in capsys.readouterr().out
    assert "too short to compare" in json.loads((out / "report.json").read_text())["note"]


@pytest.mark.parametrize("layer", ["lru", "s5", "s4d"])
def test_analyze_reads_a_save_checkpoint_file(tmp_path, capsys, layer):
    """A checkpoint of compressm_torch.save_checkpoint (no CLI config): the LTI layers are
    found by their tensors and their HSVs are those of the saved model's layers."""
    import numpy as np
    import torch

    from compressm_core import hankel_singular_values
    from compressm_core.rank import shared_rank_hsv
    from compressm_torch import CompreSSM, SequenceModel, save_checkpoint, to_state_space

    torch.manual_seed(0)
    model = SequenceModel(2, 3, d_model=8, d_state=16, n_layers=2, layer=layer)
    opt = torch.optim.Adam(model.parameters())
    CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5).reduce()
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    assert main(["analyze", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "an")]) == 0
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert sorted(result["layers"]) == ["blocks.0.ssm", "blocks.1.ssm"]
    for name, entry in result["layers"].items():
        with torch.no_grad():
            hsv = shared_rank_hsv(
                hankel_singular_values(to_state_space(model.get_submodule(name)))
            )
        np.testing.assert_allclose(entry["hsv"], hsv.numpy(), rtol=1e-9, atol=1e-12)
    assert "blocks.0.ssm" in capsys.readouterr().out
