"""Faults in the CLI's files: JAX checkpoints (failing saves, unreadable and crafted files),
unreadable checkpoints given to `compressm analyze`, and crafted labels in `.npz` data files."""

from __future__ import annotations

import json
import random
import re
import time
import zipfile

import numpy as np
import pytest

from compressm_core import CheckpointError


@pytest.fixture
def jax_ckpt():
    """``(make, load)``: ``make(path, **config)`` saves a JAX checkpoint of a model whose first
    layer was cut to 3 states; ``load`` is :func:`compressm_cli.training_jax.load_checkpoint`."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    from compressm_cli.training import RunConfig
    from compressm_cli.training_jax import _model, load_checkpoint, save_checkpoint
    from compressm_jax import resize_layers

    def make(path, **config):
        cfg = RunConfig(**({"d_model": 4, "d_state": 6, "n_layers": 2, "backend": "jax"} | config))
        model = _model(2, 3, "classification", cfg)
        resize_layers(model, {"blocks.0.ssm": 3})
        dims = {"d_input": 2, "d_output": 3, "kind": "classification"}
        save_checkpoint(path, model, extra={"config": cfg.to_dict(), "model": dims})
        return model

    return make, load_checkpoint


def rewrite_metadata(path, change):
    """Apply ``change`` to the JSON metadata of the JAX checkpoint at ``path``."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays["compressm"]))
    change(meta)
    arrays["compressm"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


# --- JAX checkpoints ---------------------------------------------------------------------------


def test_jax_save_failing_midway_leaves_the_old_file_and_no_temporary(
    tmp_path, monkeypatch, jax_ckpt
):
    make, load = jax_ckpt
    path = tmp_path / "checkpoint.npz"
    make(path)
    before = path.read_bytes()

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        make(path, d_state=8)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]
    monkeypatch.undo()
    assert load(path)[0].blocks[0].ssm.d_state == 3


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "member"])
def test_an_unreadable_jax_checkpoint_names_itself(tmp_path, damage, jax_ckpt):
    make, load = jax_ckpt
    path = tmp_path / "checkpoint.npz"
    make(path)
    data = path.read_bytes()
    if damage == "member":  # a valid zip whose array entry is cut short
        with zipfile.ZipFile(tmp_path / "checkpoint.npz") as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        with zipfile.ZipFile(path, "w") as archive:
            for name, content in members.items():
                archive.writestr(name, content[:100] if name != "compressm.npy" else content)
    else:
        path.write_bytes(
            {
                "empty": b"",
                "truncated": data[: len(data) // 2],
                "random": random.Random(0).randbytes(4096),
            }[damage]
        )
    with pytest.raises(CheckpointError, match=f"{path}: not a readable .npz checkpoint"):
        load(path)


def test_a_crafted_jax_state_size_is_refused_without_allocating(tmp_path, jax_ckpt):
    make, load = jax_ckpt
    path = tmp_path / "checkpoint.npz"
    make(path)
    for size in (50_000_000, 0, 7, 2.5, None):
        sizes = {"blocks.0.ssm": size, "blocks.1.ssm": 6}
        rewrite_metadata(path, lambda meta, s=sizes: meta.update(state_sizes=s))
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"{path}: `state_sizes\['blocks.0.ssm'\]`"):
            load(path)
        assert time.perf_counter() - start < 1.0


def test_a_huge_configured_d_state_allocates_only_the_stored_sizes(tmp_path, jax_ckpt):
    """The model is built at the recorded sizes, never at the configured full size."""
    make, load = jax_ckpt
    path = tmp_path / "checkpoint.npz"
    source = make(path)
    rewrite_metadata(path, lambda meta: meta["extra"]["config"].update({"d_state": 10**9}))
    model, _ = load(path)
    assert model.blocks[0].ssm.d_state == 3
    assert model.blocks[1].ssm.d_state == 6
    for name in ("B_re", "nu_log"):
        stored = getattr(source.blocks[0].ssm, name)[...]
        np.testing.assert_array_equal(getattr(model.blocks[0].ssm, name)[...], stored)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 100_000}, "the arrays do not fit the model"),
        ({"n_layers": 10**9}, "more than the"),
        ({"layer": "s5"}, "the arrays do not fit the model"),
        ({"d_state": [6]}, "does not give 2 layers"),
        ({"no_such_option": 1}, "unexpected keyword argument 'no_such_option'"),
    ],
)
def test_a_crafted_jax_config_is_refused_quickly(tmp_path, jax_ckpt, change, message):
    make, load = jax_ckpt
    path = tmp_path / "checkpoint.npz"
    make(path)
    rewrite_metadata(path, lambda meta: meta["extra"]["config"].update(change))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"{path}[: ].*{message}"):
        load(path)
    assert time.perf_counter() - start < 2.0


def test_a_jax_checkpoint_missing_an_array_is_refused(tmp_path, jax_ckpt):
    make, load = jax_ckpt
    path = tmp_path / "checkpoint.npz"
    make(path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if key != "decoder.bias"}
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=f"{path}: .*'decoder.bias' missing"):
        load(path)


# --- compressm analyze -------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"\x80\x02 not a pickle"])
def test_analyze_names_an_unreadable_checkpoint(tmp_path, capsys, content):
    pytest.importorskip("torch")
    from compressm_cli.app import main

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(path)])
    assert exc.value.code == 2
    assert f"{path}: not a readable checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def torch_checkpoints(tmp_path_factory):
    """``{layer: path}``: `compressm train` checkpoints of two-block models of each torch layer
    (a few steps, digits, N0 = 8: the reductions leave the blocks at different sizes)."""
    pytest.importorskip("torch")
    from compressm_cli.app import main

    folder = tmp_path_factory.mktemp("torch_checkpoints")
    paths = {}
    for layer in ("lru", "s5", "s4d", "mamba"):
        argv = ["train", "--task", "digits", "--model", layer, "--d-model", "4", "--d-state", "8"]
        argv += ["--layers", "2", "--steps", "30", "--eval-every", "30", "--no-progress"]
        assert main([*argv, "--out", str(folder / layer)]) == 0
        paths[layer] = folder / layer / "checkpoint.pt"
    return paths


@pytest.mark.parametrize("layer", ["lru", "s5", "s4d", "mamba"])
def test_analyze_reads_every_torch_layer_at_its_stored_sizes(tmp_path, torch_checkpoints, layer):
    """The spectra have the recorded state sizes (for S4D one shared profile of its channels:
    the per-index maximum of their HSVs)."""
    import torch

    from compressm_cli.analyze import analyze_checkpoint

    path = torch_checkpoints[layer]
    stored = torch.load(path, weights_only=True)["state_sizes"]
    layers = analyze_checkpoint(path, [0.1])["layers"]
    assert {name: entry["state_size"] for name, entry in layers.items()} == stored
    for entry in layers.values():
        hsv = np.asarray(entry["hsv"])
        assert hsv.ndim == 1
        assert np.all(np.diff(hsv) <= 1e-12 * hsv[0])
        assert entry["kind"] == ("selective" if layer == "mamba" else "lti")


def _rewrite_torch_config(path, out, change):
    import torch

    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"]["config"].update(change)
    torch.save(ckpt, out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 10**6}, r"`encoder.weight` should have the shape \(1000000, 1\)"),
        ({"n_layers": 10**9}, "n_layers is 1000000000, but the tensors hold 2 blocks"),
        ({"layer": "s5"}, "the `model` state does not load|does not fit"),
    ],
)
def test_analyze_refuses_a_crafted_torch_config_quickly(
    tmp_path, capsys, torch_checkpoints, change, message
):
    """A config that does not fit the stored tensors exits 2 naming the file, before a model is
    built at its sizes (a crafted d_model or n_layers would allocate gigabytes)."""
    from compressm_cli.app import main

    path = tmp_path / "checkpoint.pt"
    _rewrite_torch_config(torch_checkpoints["lru"], path, change)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(path), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert re.search(message, err), err
    assert time.perf_counter() - start < 2.0


def test_analyze_ignores_a_crafted_initial_state_size(tmp_path, torch_checkpoints):
    """The model is built at the recorded sizes, so a huge configured N0 allocates nothing."""
    from compressm_cli.analyze import analyze_checkpoint

    path = tmp_path / "checkpoint.pt"
    _rewrite_torch_config(torch_checkpoints["lru"], path, {"d_state": 10**9})
    start = time.perf_counter()
    expected = analyze_checkpoint(torch_checkpoints["lru"], [0.1])["layers"]
    assert analyze_checkpoint(path, [0.1])["layers"] == expected
    assert time.perf_counter() - start < 2.0


# --- .npz data files ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", [2**16, 2_000_000_000, np.iinfo(np.int64).max])
def test_an_npz_class_label_beyond_the_bound_is_refused(tmp_path, label):
    from compressm_cli.data import load_task

    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 1, 0, label], dtype=np.int64)
    path = tmp_path / "labels.npz"
    x = rng.normal(size=(6, 5)).astype(np.float32)
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y % 3)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{path}: `y_train` must hold class labels below 65536"):
        load_task(str(path))
    assert time.perf_counter() - start < 1.0
    y[-1] = 2**16 - 1  # the largest allowed label
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y % 3)
    assert load_task(str(path)).d_output == 2**16


@pytest.mark.parametrize("shape", [(10**12,), (10**6, 10**6, 1), (2**62, 2)])
def test_an_npz_array_header_beyond_its_data_is_refused_before_allocating(tmp_path, shape):
    """A member whose ``.npy`` header declares a shape larger than the bytes it holds: a clear
    error naming the file and the array, quickly, with no attempt to allocate the shape."""
    import io

    from compressm_cli.data import load_task

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0, 2])
    path = tmp_path / "crafted.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    crafted = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(crafted, header)
    crafted.write(x.tobytes())
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["x_train.npy"] = crafted.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{path}: .*`x_train` declares shape"):
        load_task(str(path))
    assert time.perf_counter() - start < 1.0
