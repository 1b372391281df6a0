"""`compressm --backend jax` end to end: real (short) training runs, real files."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

from compressm_cli.app import main

# One reduction (at step 6): every reduction recompiles the training step.
FAST = [
    *("--backend", "jax", "--task", "digits", "--steps", "60", "--eval-every", "20"),
    *("--d-state", "16", "--num-reductions", "1", "--no-progress"),
]


def test_compare_writes_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    json_path = str(tmp_path / "r.json")
    assert main(["compare", *FAST, "--seeds", "0", "--out", str(out), "--json", json_path]) == 0
    printed = capsys.readouterr().out
    assert "| CompreSSM |" in printed
    assert "| small from scratch |" in printed
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert (report["status"], report["task"], report["backend"]) == ("complete", "digits", "jax")
    assert report["jax_device"] == "cpu:0"
    rows = {row["run"]: row for row in report["summary"]}
    assert set(rows) == {"full", "compressm", "small"}
    assert rows["full"]["final_state"] == {"blocks.0.ssm": 16}
    reduced = rows["compressm"]["final_state"]["blocks.0.ssm"]
    assert reduced < 16
    assert rows["small"]["final_state"] == {"blocks.0.ssm": reduced}
    assert rows["full"]["speedup_vs_full"] == pytest.approx(1.0)
    assert rows["compressm"]["reduction_events"] == 1
    for row in rows.values():
        assert 0 <= row["test_metric"] <= 1
        assert row["train_seconds"] > 0
    run = report["runs"]["compressm"][0]
    assert run["config"]["backend"] == "jax"
    assert [e["step"] for e in run["events"] if e["status"] == "reduced"] == [6]
    assert [c[0] for c in run["curve"]] == [20, 40, 60]
    assert [c[3] for c in run["curve"]] == [reduced] * 3
    assert run["val_metric"] == run["curve"][-1][2]
    for name in ("report.md", "hsv_spectra.png", "state_size.png", "metric_vs_time.png"):
        assert (out / name).stat().st_size > 0
    assert "| CompreSSM |" in (out / "report.md").read_text()


def test_train_then_analyze(tmp_path, capsys):
    from compressm_cli.data import load_task
    from compressm_cli.training_jax import evaluate, load_checkpoint

    out = tmp_path / "train"
    assert main(["train", *FAST, "--out", str(out)]) == 0
    checkpoint = out / "checkpoint.npz"
    assert checkpoint.is_file()
    trained = json.loads((out / "report.json").read_text())["runs"]["compressm"][0]
    size = trained["final_sizes"]["blocks.0.ssm"]
    assert size < 16
    # the checkpoint restores the trained model at its reduced size, bit for bit
    model, extra = load_checkpoint(checkpoint)
    assert extra["task"] == "digits"
    assert extra["config"]["d_state"] == 16
    task = load_task("digits")
    assert evaluate(task, model, task.x_test, task.y_test) == trained["test_metric"]
    capsys.readouterr()
    assert main(["analyze", str(checkpoint), "--taus", "0.05", "0.5", "--out", str(tmp_path)]) == 0
    assert "| blocks.0.ssm |" in capsys.readouterr().out
    layer = json.loads((tmp_path / "analysis.json").read_text())["layers"]["blocks.0.ssm"]
    assert (layer["state_size"], layer["kind"]) == (size, "lti")
    assert layer["hsv"] == sorted(layer["hsv"], reverse=True)
    (low, high) = layer["ranks"]
    assert low["rank"] >= high["rank"] >= 1
    tail = np.asarray(layer["hsv"])[high["rank"] :]
    assert high["error_bound"] == pytest.approx(2 * tail.sum())
    assert (tmp_path / "hsv.png").stat().st_size > 0


def test_interrupted_train_leaves_a_partial_report_and_a_checkpoint(tmp_path, monkeypatch):
    import compressm_cli.training_jax as training_jax
    from compressm_jax import state_sizes

    def interrupting(task, out, target):  # called while the first step is traced
        raise KeyboardInterrupt

    monkeypatch.setattr(training_jax, "_loss", interrupting)
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out)]) == 130
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    (partial,) = report["runs"]["compressm"]
    assert partial["status"] == "interrupted at step 1"
    assert partial["final_sizes"] == {"blocks.0.ssm": 16}
    assert 0 <= partial["test_metric"] <= 1
    model, extra = training_jax.load_checkpoint(out / "checkpoint.npz")  # the state reached
    assert state_sizes(model) == {"blocks.0.ssm": 16}
    assert extra["config"]["backend"] == "jax"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--model", "mamba"], "argument --model: the JAX backend has no Mamba"),
        (["train", "--model", "mamba"], "argument --model: the JAX backend has no Mamba"),
        (["compare", "--device", "gpu0"], "argument --device: not a JAX device"),
        (["compare", "--device", "cpu:7"], "argument --device: not a JAX device"),
        (["compare", "--threads", "2"], "argument --threads"),
    ],
)
def test_unsupported_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--backend", "jax"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_rewarmup_steps_chain_the_optax_rewarmup_after_adamw():
    import dataclasses

    import jax
    from flax import nnx

    from compressm_cli.training import RunConfig
    from compressm_cli.training_jax import _optimizer
    from compressm_jax import RewarmupState, mark_cut

    config = RunConfig(steps=20, rewarmup_steps=2, backend="jax")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))  # the transformation does not depend on it
    tx = _optimizer(model, config).tx
    plain = _optimizer(model, dataclasses.replace(config, rewarmup_steps=0)).tx
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    for chained, has in [(tx, True), (plain, False)]:
        leaves = jax.tree_util.tree_leaves(
            chained.init(params), is_leaf=lambda n: isinstance(n, RewarmupState)
        )
        assert any(isinstance(n, RewarmupState) for n in leaves) is has
    grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
    # the first update after a cut: 1/3 of the AdamW update (schedule and weight decay included)
    marked, _ = tx.update(grads, mark_cut(tx.init(params)), params)
    own, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(
        jax.tree_util.tree_leaves(marked), jax.tree_util.tree_leaves(own), strict=True
    ):
        np.testing.assert_allclose(a, b / 3, rtol=1e-6)
