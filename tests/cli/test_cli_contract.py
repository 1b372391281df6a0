"""The `compressm` command's contract: bad input exits 2 with one line naming the option or
file, before any training; a run finishes with strict JSON; Ctrl-C keeps a checkpoint."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch

import compressm_cli.training as training
from compressm_cli.app import main, version
from compressm_cli.report import write_report
from compressm_cli.training import RunResult

TINY = ["--task", "digits", "--steps", "4", "--eval-every", "2", "--d-state", "4", "--no-progress"]


def _strict(text: str) -> object:
    """``json.loads`` that refuses NaN and Infinity, as strict parsers do."""

    def refuse(name: str) -> object:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``; check exit status 2, one error line and no traceback; return it."""
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
    """Any training fails the test: the checks under test come first."""

    def train(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before checking the options")

    monkeypatch.setattr(training, "train", train)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("option", ["--out", "--json"])
def test_unwritable_output_is_refused_before_training(option, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    argv = ["train", *TINY, "--out", str(tmp_path / "run")]
    line = _usage_error([*argv, option, str(blocker / "below")], capsys)
    assert f"argument {option}: cannot write into the folder" in line
    assert str(blocker) in line


@pytest.mark.usefixtures("no_training")
def test_json_naming_a_folder_is_refused_before_training(tmp_path, capsys):
    line = _usage_error(["train", *TINY, "--out", str(tmp_path), "--json", str(tmp_path)], capsys)
    assert "argument --json: expected a file path; received the folder" in line


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--warmup-fraction", "0"], "argument --warmup-fraction: expected a number in"),
        (["train", "--lr", "nan"], "argument --lr: expected a finite positive float"),
        (["train", "--lr", "inf"], "argument --lr: expected a finite positive float"),
        (["compare", "--tau=-inf"], "argument --tau: expected a number in [0, 1)"),
        (["train", "--seed", "-1"], "argument --seed: expected an integer in [0, "),
        (["compare", "--seeds", "0", "1e3"], "argument --seeds: expected an integer"),
        (["train", "--schedule", "certified", "--mode", "pragmatic"], "argument --schedule:"),
        (["analyze", "x.pt", "--taus", "nan"], "argument --taus: expected a number in [0, 1)"),
    ],
)
def test_numeric_options_are_checked_before_training(argv, message, tmp_path, capsys):
    assert message in _usage_error([*argv, "--out", str(tmp_path)], capsys)


@pytest.mark.usefixtures("no_training")
def test_unavailable_device_is_refused_before_training(tmp_path, capsys):
    missing = f"cuda:{torch.cuda.device_count() + 7}"
    for device in (missing, "meta"):
        line = _usage_error(["train", *TINY, "--device", device, "--out", str(tmp_path)], capsys)
        assert f"argument --device: {device!r}" in line


def _corrupt_jax_checkpoint(path):
    """A JAX checkpoint archive whose metadata member fails its CRC check."""
    np.savez(path, compressm=np.array(json.dumps({"format": "x", "pad": "A" * 400})))
    data = bytearray(path.read_bytes())
    start = data.index(b"A\0\0\0A\0\0\0")
    data[start : start + 64] = b"B\0\0\0" * 16
    path.write_bytes(bytes(data))


def _truncated(path):
    torch.save({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("bytes.pt", lambda p: p.write_bytes(bytes(range(256)) * 8), "(UnpicklingError"),
        ("empty.pt", lambda p: p.write_bytes(b""), "(EOFError)"),
        ("truncated.pt", _truncated, "(RuntimeError"),
        ("list.pt", lambda p: torch.save([1, 2, 3], p), "not a checkpoint"),
        ("folder.pt", lambda p: p.mkdir(), "is a folder; expected a checkpoint file"),
        ("corrupt.npz", _corrupt_jax_checkpoint, "(BadZipFile"),
    ],
)
def test_analyze_refuses_unreadable_files_by_name(name, make, reason, tmp_path, capsys):
    path = tmp_path / name
    make(path)
    line = _usage_error(["analyze", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "argument checkpoint: " in line
    assert repr(str(path)) in line
    assert reason in line
    assert not (tmp_path / "out" / "analysis.json").exists()


def test_nan_validation_metric_finishes_with_a_strict_report(tmp_path, capsys, monkeypatch):
    """A diverged regression run (NaN validation MSE) finishes; no reduction is judged by NaN."""
    original = training.evaluate

    def diverged(task, model, x, y, device="cpu"):
        return math.nan if x is task.x_val else original(task, model, x, y, device)

    monkeypatch.setattr(training, "evaluate", diverged)
    out = tmp_path / "run"
    argv = ["train", "--task", "sysid", "--steps", "12", "--eval-every", "3", "--d-state", "8"]
    assert (
        main([*argv, "--no-progress", "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    )
    assert "the validation metric is nan; not reported" in capsys.readouterr().err
    report = _strict((out / "report.json").read_text())
    assert report == _strict((tmp_path / "r.json").read_text())
    run = report["runs"]["compressm"][0]
    assert run["val_metric"] is None
    assert math.isfinite(run["test_metric"])
    assert "runs.compressm[0].val_metric" in report["non_finite"]["fields"]
    assert "runs.compressm[0].curve[0][2]" in report["non_finite"]["fields"]
    assert (out / "checkpoint.pt").is_file()


def test_report_json_is_strict(tmp_path):
    run = RunResult(
        config={"seed": 0},
        metric_name="mse",
        test_metric=math.inf,
        val_metric=math.nan,
        train_seconds=1.0,
        reduction_seconds=0.0,
        initial_sizes={"blocks.0.ssm": 4},
        final_sizes={"blocks.0.ssm": 4},
        curve=[(1, 0.5, math.nan, 4)],
    )
    report = write_report(tmp_path, header={"command": "train"}, results={"full": [run]})
    written = _strict((tmp_path / "report.json").read_text())
    assert written["runs"]["full"][0]["test_metric"] is None
    assert written["summary"][0]["test_metric"] is None
    fields = written["non_finite"]["fields"]
    assert set(fields) >= {
        "runs.full[0].test_metric",
        "runs.full[0].val_metric",
        "runs.full[0].curve[0][2]",
        "summary[0].test_metric",
    }
    assert "runs.full[0].final_loss" in fields  # NaN unless the run finished
    assert math.isinf(report["runs"]["full"][0]["test_metric"])  # the returned report is as is
    assert "Non-finite values (null in report.json): " in (tmp_path / "report.md").read_text()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"compressm {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())


# A shell starts background jobs with SIGINT ignored and a child inherits that (Python then
# installs no KeyboardInterrupt handler). Restore Python's handler inside the child rather than
# with ``preexec_fn``, which runs fork handlers in a threaded parent and is unsafe there.
_DEFAULT_SIGINT_MAIN = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from compressm_cli.app import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_during_train_saves_a_checkpoint(tmp_path, capsys):
    """SIGINT after the first training step: a checkpoint of the state reached, one line saying
    where, exit status 130."""
    out = tmp_path / "run"
    argv = ["train", "--task", "digits", "--d-state", "8", "--out", str(out)]
    argv += ["--steps", "1000000", "--eval-every", "1000000"]  # never done by itself
    proc = subprocess.Popen(
        [sys.executable, "-c", _DEFAULT_SIGINT_MAIN, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    chunks: list[bytes] = []
    started = threading.Event()

    def read() -> None:  # the progress bar on stderr counts the steps
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):
            chunks.append(chunk)
            if re.search(rb"\| *[1-9]\d*/1000000", b"".join(chunks)):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:  # generous limits: a loaded machine can take long to import torch
        assert started.wait(300), b"".join(chunks).decode(errors="replace")
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 130, err
    checkpoint = out / "checkpoint.pt"
    last = err.strip().splitlines()[-1].split("\r")[-1]
    assert re.match(r"interrupted at step \d+; checkpoint: ", last), err
    assert str(checkpoint) in last
    report = _strict((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    capsys.readouterr()
    assert main(["analyze", str(checkpoint), "--taus", "0.1", "--out", str(tmp_path)]) == 0
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert analysis["layers"]["blocks.0.ssm"]["state_size"] == 8
