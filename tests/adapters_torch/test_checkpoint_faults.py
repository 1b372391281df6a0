"""Faults in checkpoint files and saves: kills, exceptions, corrupt, foreign and crafted files."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from compressm_core import CheckpointError  # noqa: E402
from compressm_torch import (  # noqa: E402
    SequenceModel,
    load_checkpoint,
    resize_layers,
    save_checkpoint,
    state_sizes,
)
from compressm_torch.checkpoint import FORMAT  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def model_of(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = {"d_model": 4, "d_state": 6, "n_layers": 2} | kwargs
    model = SequenceModel(2, 3, **options)
    with torch.no_grad():
        for param in model.parameters():  # no zeros anywhere (norm biases included)
            param.add_(torch.rand_like(param) + 0.5)
    return model


def snapshot(model):
    """Everything a failed load must leave as it was: sizes and every tensor, bit for bit."""
    return state_sizes(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    sizes, tensors = before
    assert state_sizes(model) == sizes
    after = model.state_dict()
    assert after.keys() == tensors.keys()
    for key, value in tensors.items():
        assert after[key].shape == value.shape, key
        assert torch.equal(after[key], value), key


def reduced_checkpoint(path, seed=0, **kwargs):
    """Save a model whose first layer was cut to 3 states (new values, all non-zero)."""
    model = model_of(seed, **kwargs)
    resize_layers(model, {"blocks.0.ssm": 3})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.rand_like(param) + 0.5)
    save_checkpoint(path, model)
    return model


# --- atomic saves ----------------------------------------------------------------------------

_KILLED_SAVE = """
import sys, time
import torch
from compressm_torch import SequenceModel, save_checkpoint

real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    import io
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("partial", flush=True)
    time.sleep(60)

torch.save = slow_save
torch.manual_seed(1)
save_checkpoint(sys.argv[1], SequenceModel(2, 3, d_model=32, d_state=64, n_layers=4))
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    good = reduced_checkpoint(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_SAVE), str(path)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "partial"  # half the bytes are on disk
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    fresh = model_of(5)
    load_checkpoint(path, fresh)
    assert_unchanged(fresh, snapshot(good))
    # the fragment, if any, is a hidden temporary file that the next save does not trip over
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["ckpt.pt"]
    newer = model_of(7)
    save_checkpoint(path, newer)
    again = model_of(5)
    load_checkpoint(path, again)
    assert_unchanged(again, snapshot(newer))


def test_an_exception_during_the_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    reduced_checkpoint(path)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model_of(3))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_new_file_gets_the_permissions_of_open(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model_of())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- unreadable files ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "text"])
def test_an_unreadable_file_names_itself(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    reduced_checkpoint(path)
    data = path.read_bytes()
    content = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": random.Random(0).randbytes(4096),
        "text": b"not a checkpoint\n",
    }[damage]
    path.write_bytes(content)
    model = model_of(1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint"):
        load_checkpoint(path, model)
    if damage == "random":  # other corruptions fail in other places of the unpickler
        for seed in range(1, 40):
            path.write_bytes(random.Random(seed).randbytes(4096))
            with pytest.raises(CheckpointError, match="not a readable checkpoint"):
                load_checkpoint(path, model)
    assert_unchanged(model, before)


def test_an_unreadable_file_object_names_its_type():
    with pytest.raises(CheckpointError, match="BytesIO: not a readable checkpoint"):
        load_checkpoint(io.BytesIO(b""), model_of())


# --- files that do not fit the model ---------------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "into"),
    [
        ({"layer": "s5"}, {"layer": "lru"}),
        ({"d_model": 8}, {"d_model": 4}),
        ({"n_layers": 3}, {"n_layers": 2}),
        ({"n_layers": 1}, {"n_layers": 2}),
    ],
    ids=["s5-into-lru", "d_model-8-into-4", "more-layers", "fewer-layers"],
)
def test_a_checkpoint_of_another_architecture_leaves_the_model_unchanged(tmp_path, saved, into):
    path = tmp_path / "ckpt.pt"
    reduced_checkpoint(path, **saved)
    model = model_of(1, **into)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=f"^{path}: .*`model`"):
        load_checkpoint(path, model)
    assert_unchanged(model, before)
    params = zip(opt.param_groups[0]["params"], model.parameters(), strict=True)
    assert all(p is q for p, q in params)


def test_a_failure_after_the_model_loaded_rolls_everything_back(tmp_path):
    """The optimizer state fits no optimizer over the model: the model, already resized and
    loaded by then, returns to its sizes and values, and its gradients stay."""
    path = tmp_path / "ckpt.pt"
    source = model_of(0)
    partial = torch.optim.AdamW(list(source.parameters())[:3], lr=1e-2)
    save_checkpoint(path, source, partial)
    model = model_of(1)
    resize_layers(model, {"blocks.1.ssm": 2})  # loading grows it back to 6 states first
    model(torch.randn(2, 5, 2)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()
    opt_before = {k: v.clone() for k, v in opt.state[model.encoder.weight].items()}
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=f"^{path}: the `optimizer` state does not load"):
        load_checkpoint(path, model, opt)
    assert_unchanged(model, before)
    for param, grad in zip(model.parameters(), grads, strict=True):
        assert torch.equal(param.grad, grad)
    for key, value in opt.state[model.encoder.weight].items():
        assert torch.equal(value, opt_before[key])


def test_a_missing_optimizer_state_is_refused_before_the_model_changes(tmp_path):
    path = tmp_path / "ckpt.pt"
    reduced_checkpoint(path)
    model = model_of(1)
    before = snapshot(model)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=f"{path}: .*no `optimizer` state"):
        load_checkpoint(path, model, opt)
    assert_unchanged(model, before)


# --- crafted sizes -----------------------------------------------------------------------------


def crafted(path, source, changes):
    ckpt = {
        "format": FORMAT,
        "state_sizes": state_sizes(source),
        "model": dict(source.state_dict()),
        "optimizer": None,
        "controller": None,
        "lr_scheduler": None,
        "extra": {},
    }
    ckpt.update(changes)
    torch.save(ckpt, path)


@pytest.mark.parametrize("size", [50_000_000, 0, -3, 2.5, True, "6"])
def test_a_crafted_state_size_is_refused_without_allocating(tmp_path, size):
    path = tmp_path / "crafted.pt"
    model = model_of(1)
    crafted(path, model, {"state_sizes": {"blocks.0.ssm": size, "blocks.1.ssm": 6}})
    before = snapshot(model)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"{path}: `state_sizes\['blocks.0.ssm'\]`"):
        load_checkpoint(path, model)
    assert time.perf_counter() - start < 1.0
    assert_unchanged(model, before)


def test_crafted_entries_are_refused(tmp_path):
    model = model_of(1)
    before = snapshot(model)
    cases = {
        "unknown layer": ({"state_sizes": {"blocks.7.ssm": 3}}, "does not have"),
        "sizes not a dict": ({"state_sizes": [6, 6]}, "`state_sizes` must be a dict"),
        "model not tensors": ({"model": {"encoder.weight": 3}}, "must map parameter names"),
        "extra not a dict": ({"extra": [1]}, "`extra` must be a dict"),
    }
    for name, (changes, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        crafted(path, model, changes)
        with pytest.raises(CheckpointError, match=f"{path}: .*{message}"):
            load_checkpoint(path, model)
    path = tmp_path / "no-entries.pt"
    torch.save({"format": FORMAT}, path)
    with pytest.raises(CheckpointError, match="lacks the entries"):
        load_checkpoint(path, model)
    assert_unchanged(model, before)


def test_a_reduced_checkpoint_still_loads_into_a_reduced_model(tmp_path):
    """Layers may grow on load (a checkpoint from before a reduction into the reduced model)."""
    path = tmp_path / "ckpt.pt"
    full = model_of(0)
    save_checkpoint(path, full)
    model = reduced_checkpoint(tmp_path / "other.pt", seed=1)
    load_checkpoint(path, model)
    assert_unchanged(model, snapshot(full))


def test_a_reduced_mamba_checkpoint_passes_the_shape_checks(tmp_path):
    """Selective layers: the expected shapes come from the adapter's positions."""
    path = tmp_path / "mamba.pt"
    source = reduced_checkpoint(path, layer="mamba", d_state=8)
    model = model_of(1, layer="mamba", d_state=8)
    load_checkpoint(path, model)
    assert_unchanged(model, snapshot(source))
    other = model_of(1, layer="mamba", d_state=8, d_model=8)
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="does not fit `model`"):
        load_checkpoint(path, other)
    assert_unchanged(other, before)
