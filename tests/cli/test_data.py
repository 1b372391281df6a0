"""The embedded data sets of the ``compressm`` command: shapes, splits, files, ground truth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressm_cli.data import TASKS, Task, load_task
from compressm_core import StateSpace, hankel_singular_values


def _needs(task: str) -> None:
    if task == "mnist1d":
        pytest.importorskip("mnist1d")
    elif task == "digits":
        pytest.importorskip("sklearn")


EXPECTED = {
    # name: (kind, n_train + n_val, n_test, length, d_input, d_output)
    "mnist1d": ("classification", 4000, 1000, 40, 1, 10),
    "digits": ("classification", 1437, 360, 64, 1, 10),
    "sysid": ("regression", 4000, 1000, 64, 2, 2),
    "spectra": ("classification", 4000, 1000, 128, 1, 20),
}


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_task_names() -> None:
    assert TASKS == ("mnist1d", "digits", "sysid", "spectra")
    assert set(EXPECTED) == set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_shapes_dtypes_and_splits(name: str) -> None:
    _needs(name)
    kind, n_fit, n_test, length, d_in, d_out = EXPECTED[name]
    task = load_task(name)
    assert isinstance(task, Task)
    assert (task.name, task.kind, task.d_input, task.d_output) == (name, kind, d_in, d_out)
    n_val = round(0.1 * n_fit)
    for x, n in ((task.x_train, n_fit - n_val), (task.x_val, n_val), (task.x_test, n_test)):
        assert x.shape == (n, length, d_in)
        assert x.dtype == np.float32
        assert np.all(np.isfinite(x))
    splits = ((task.x_train, task.y_train), (task.x_val, task.y_val), (task.x_test, task.y_test))
    for x, y in splits:
        if kind == "classification":
            assert y.shape == (len(x),)
            assert y.dtype == np.int64
            assert y.min() >= 0
            assert y.max() < d_out
        else:
            assert y.shape == (len(x), length, d_out)
            assert y.dtype == np.float32
    if kind == "classification":
        assert set(np.unique(task.y_train)) == set(range(d_out))
    # validation and training parts are disjoint
    assert not _rows(task.x_train) & _rows(task.x_val)
    info = task.info
    json.dumps(info)
    assert (info["n_train"], info["n_val"], info["n_test"]) == (
        len(task.x_train),
        len(task.x_val),
        len(task.x_test),
    )
    assert info["length"] == length
    assert "source" in info
    assert name in repr(task)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.name = "other"  # type: ignore[misc]


def test_digits_pixels_and_stratified_test_split() -> None:
    _needs("digits")
    task = load_task("digits")
    x = np.concatenate([task.x_train, task.x_val, task.x_test])
    assert x.min() == 0.0
    assert x.max() == 1.0
    # 20 % of every class (within one sequence) goes to the test split
    y_all = np.concatenate([task.y_train, task.y_val, task.y_test])
    counts, test_counts = np.bincount(y_all), np.bincount(task.y_test)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)


def test_mnist1d_is_the_published_data_set() -> None:
    _needs("mnist1d")
    task = load_task("mnist1d")
    args = task.info["generator_args"]
    assert (args["num_samples"], args["final_seq_length"], args["seed"]) == (5000, 40, 42)
    assert "url" not in args
    x = np.concatenate([task.x_train, task.x_val, task.x_test])
    # the generator standardises the whole set; the loader adds nothing
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1) < 0.01


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_and_seeded_validation(name: str) -> None:
    _needs(name)
    a, b, c = load_task(name, seed=0), load_task(name, seed=0), load_task(name, seed=1)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.info == b.info
    assert _rows(a.x_val) != _rows(c.x_val)
    if name != "digits":  # only the validation draw depends on the seed
        np.testing.assert_array_equal(a.x_test, c.x_test)
        assert _rows(a.x_train) | _rows(a.x_val) == _rows(c.x_train) | _rows(c.x_val)
    else:  # the seed also draws the test split
        assert _rows(a.x_test) != _rows(c.x_test)


def test_val_fraction_sets_the_validation_size() -> None:
    task = load_task("sysid", val_fraction=0.25)
    assert (len(task.x_train), len(task.x_val)) == (3000, 1000)
    assert task.info["val_fraction"] == 0.25


def test_returned_arrays_are_fresh_copies() -> None:
    task = load_task("sysid")
    task.x_test[...] = 0.0
    task.y_train[...] = 0.0
    again = load_task("sysid")
    assert np.any(again.x_test != 0)
    assert np.any(again.y_train != 0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan"), "half"])
def test_bad_val_fraction(fraction: object) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        load_task("sysid", val_fraction=fraction)  # type: ignore[arg-type]


def test_bad_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        load_task("sysid", seed=-1)


@pytest.mark.parametrize("name", ["mnist", "SYSID", "data.csv", ""])
def test_unknown_task(name: str) -> None:
    with pytest.raises(ValueError, match="Unknown task") as err:
        load_task(name)
    for valid in TASKS:
        assert repr(valid) in str(err.value)
    assert ".npz" in str(err.value)


# ----------------------------------------------------------------------------------- .npz


def _save(path: Path, **arrays: Any) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_classification(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _save(
        tmp_path / "cls.npz",
        x_train=rng.standard_normal((50, 12)),
        y_train=rng.integers(0, 3, 50),
        x_test=rng.standard_normal((20, 12)),
        y_test=np.full(20, 4),
    )
    task = load_task(path, val_fraction=0.2)
    assert (task.name, task.kind, task.d_input, task.d_output) == (path, "classification", 1, 5)
    assert task.x_train.shape == (40, 12, 1)
    assert task.x_val.shape == (10, 12, 1)
    assert task.x_test.shape == (20, 12, 1)
    assert task.x_train.dtype == np.float32
    assert task.y_train.dtype == np.int64
    assert task.y_val.shape == (10,)
    np.testing.assert_array_equal(task.y_test, 4)
    json.dumps(task.info)
    assert task.info["path"] == str(Path(path).resolve())


def test_npz_regression_and_given_validation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8, 3)).astype(np.float32)
    y = rng.standard_normal((30, 8)).astype(np.float64)
    path = _save(tmp_path / "reg.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    task = load_task(path)
    assert (task.kind, task.d_input, task.d_output) == ("regression", 3, 1)
    assert task.y_train.shape == (27, 8, 1)
    assert task.y_test.shape == (5, 8, 1)
    assert task.y_test.dtype == np.float32
    # a file with its own validation split keeps it; d outputs per step
    y3 = rng.standard_normal((30, 8, 2))
    path = _save(
        tmp_path / "reg_val.npz",
        x_train=x,
        y_train=y3,
        x_val=x[:4],
        y_val=y3[:4],
        x_test=x[4:9],
        y_test=y3[4:9],
    )
    task = load_task(path, val_fraction=0.5)
    assert task.d_output == 2
    assert (len(task.x_train), len(task.x_val), len(task.x_test)) == (30, 4, 5)
    np.testing.assert_allclose(task.y_val, y3[:4].astype(np.float32))


def _good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {
        "x_train": rng.standard_normal((10, 6)),
        "y_train": rng.integers(0, 2, 10),
        "x_test": rng.standard_normal((4, 6)),
        "y_test": rng.integers(0, 2, 4),
    }


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"y_test": None}, "y_test"),
        ({"x_val": np.zeros((2, 6))}, "y_val"),
        ({"x_train": np.zeros((10, 6, 1, 1))}, "x_train"),
        ({"x_train": np.zeros(10)}, "x_train"),
        ({"x_test": np.zeros((4, 7))}, "x_test"),
        ({"x_test": np.array([[np.nan] * 6] * 4)}, "x_test"),
        ({"y_train": np.zeros(9, dtype=np.int64)}, "y_train"),
        ({"y_train": np.zeros((10, 6), dtype=np.int64)}, "y_train"),
        ({"y_test": np.array([0, 1, -1, 0])}, "y_test"),
        ({"y_train": np.zeros(10)}, "y_train"),  # float labels of shape (n,)
        ({"y_train": np.zeros((10, 5))}, "y_train"),  # regression length mismatch
        ({"y_train": np.zeros((10, 6)), "y_test": np.zeros((4, 6, 2))}, "y_test"),
        ({"y_train": np.zeros((10, 6))}, "y_test"),  # integer test labels, float train
    ],
)
def test_npz_errors_name_file_and_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    arrays = _good()
    for k, v in change.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    path = _save(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=key) as err:
        load_task(path)
    assert path in str(err.value)


def test_npz_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_task(str(tmp_path / "missing.npz"))
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="text.npz"):
        load_task(str(text))
    single = tmp_path / "single.npz"
    with single.open("wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="single.npz"):
        load_task(str(single))
    obj = tmp_path / "obj.npz"
    arrays: dict[str, Any] = {**_good(), "x_train": np.array([None] * 10)}
    np.savez(obj, **arrays)
    with pytest.raises(ValueError, match="obj.npz"):
        load_task(str(obj))


def test_npz_needs_two_training_sequences(tmp_path: Path) -> None:
    arrays = {**_good(), "x_train": np.zeros((1, 6)), "y_train": np.zeros(1, dtype=np.int64)}
    path = _save(tmp_path / "one.npz", **arrays)
    with pytest.raises(ValueError, match="at least 2"):
        load_task(path)


# ----------------------------------------------------------------------------------- sysid


def _simulate(sys: StateSpace, u: np.ndarray) -> np.ndarray:
    """x_k = A x_{k-1} + B u_k, y_k = C x_k + D u_k from x_0 = 0, one sequence at a time."""
    a, b, c, d = sys
    ys = np.empty((*u.shape[:2], c.shape[0]))
    for i, seq in enumerate(u):
        x = np.zeros(a.shape[0])
        for k, u_k in enumerate(seq):
            x = a @ x + b @ u_k
            ys[i, k] = c @ x + d @ u_k
    return ys


def _truth(task: Task) -> StateSpace:
    return StateSpace(*(np.array(task.info[k], dtype=np.float64) for k in "abcd"))


def test_sysid_targets_are_the_true_system_outputs() -> None:
    task = load_task("sysid")
    sys = _truth(task)
    n = task.info["true_order"]
    assert sys.a.shape == (n, n)
    assert sys.b.shape == (n, task.d_input)
    assert sys.c.shape == (task.d_output, n)
    assert sys.d is not None
    assert sys.d.shape == (task.d_output, task.d_input)
    for x, y in ((task.x_train[:40], task.y_train[:40]), (task.x_test[-40:], task.y_test[-40:])):
        expected = _simulate(sys, x.astype(np.float64))
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert task.info["noise_std"] == 0.0
    assert task.info["nonlinearity"] is None
    # the outputs have about unit variance
    assert 0.8 < float(task.y_train.var()) < 1.1


def test_sysid_ground_truth_spectrum() -> None:
    task = load_task("sysid")
    info = task.info
    sys = _truth(task)
    hsv = np.asarray(hankel_singular_values(sys))
    np.testing.assert_allclose(info["true_hsv"], hsv, rtol=1e-10)
    assert info["true_hsv"] == sorted(info["true_hsv"], reverse=True)
    # exactly `true_order` nonzero HSVs: a minimal system, none of them negligible
    assert len(hsv) == info["true_order"] == 6
    assert hsv[-1] > 0.25 * hsv[0]
    # poles: stable, moduli in [0.5, 0.95], conjugate pairs
    poles = np.array([complex(re, im) for re, im in info["poles"]])
    np.testing.assert_allclose(np.sort_complex(poles), np.sort_complex(np.linalg.eigvals(sys.a)))
    np.testing.assert_allclose(np.abs(poles), info["pole_moduli"])
    assert np.all((np.abs(poles) >= 0.5) & (np.abs(poles) <= 0.95))
    np.testing.assert_allclose(np.sort_complex(poles), np.sort_complex(poles.conj()))
    # a smaller model fails measurably; the true order is exact
    mse = np.array(info["truncation_test_mse"]) / info["target_variance"]
    assert len(mse) == 6
    assert np.all(mse[:5] > 0.1)
    assert mse[5] < 1e-12


def test_sysid_truth_does_not_depend_on_seed() -> None:
    a, b = load_task("sysid", seed=0), load_task("sysid", seed=5)
    for key in ("a", "b", "c", "d", "true_hsv", "poles"):
        assert a.info[key] == b.info[key]


def test_spectra_task_is_deterministic_and_its_classes_hold_their_resonances():
    task = load_task("spectra", seed=3)
    again = load_task("spectra", seed=3)
    np.testing.assert_array_equal(task.x_train, again.x_train)
    assert task.kind == "classification"
    assert task.x_train.shape[1:] == (128, 1)
    assert task.d_output == 20
    assert len(task.x_train) + len(task.x_val) == 4000
    assert len(task.x_test) == 1000
    np.testing.assert_allclose(task.x_test.std(axis=1), 1.0, rtol=1e-5)
    freqs = np.asarray(task.info["frequencies"])
    # the averaged periodogram of each class peaks at its own frequencies (not at the others)
    grid = np.fft.rfftfreq(128) * 2 * np.pi
    power = np.abs(np.fft.rfft(task.x_train[..., 0], axis=1)) ** 2
    for label, members in enumerate(task.info["class_frequencies"]):
        mean = power[task.y_train == label].mean(axis=0)
        at = np.array([mean[np.argmin(np.abs(grid - w))] for w in freqs])
        assert set(np.argsort(at)[-4:]) == set(members)
