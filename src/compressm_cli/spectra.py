"""The ``spectra`` task: which resonances does a noisy signal contain?

A task where the state size matters. Each class is a set of ``PER_CLASS`` resonant frequencies
out of ``N_FREQUENCIES`` evenly spaced in ``(0.15, pi - 0.15)`` rad per step. A sequence of class
``k`` is the sum of one narrow-band process per frequency of class ``k``, each white noise
filtered by the resonator

.. math::

    s_t = 2 r \\cos(\\omega) s_{t-1} - r^2 s_{t-2} + e_t, \\qquad r = 0.985,

with a random amplitude in ``[0.5, 1.5]``, plus white noise of standard deviation ``NOISE``
(relative to the signal), normalised to unit variance. The classes overlap (frequencies are
shared), so a model must resolve individual frequencies ``0.1`` rad apart: a diagonal linear
layer needs about one complex mode per frequency it tells apart, and a pole of modulus
``r = 0.985`` integrates over about ``1 / (1 - r) = 67`` steps, so both the state size and the
memory of each mode matter. With the ``compare`` recipe (one LRU block, ``d_model`` 16), the
model with 128 states is clearly more accurate than models with 16 (see the docs page "When and
how much to cut" for the measured figures).

Generated offline, deterministically (class sets from seed ``CLASS_SEED``, training and test
sequences from ``TRAIN_SEED`` and ``TEST_SEED``), in about a second.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.signal import lfilter

__all__ = ["spectra_arrays"]

N_FREQUENCIES = 32
N_CLASSES = 20
PER_CLASS = 4
RADIUS = 0.985
NOISE = 1.0
LENGTH = 128
N_TRAIN, N_TEST = 4000, 1000
CLASS_SEED, TRAIN_SEED, TEST_SEED = 11, 1, 2
_BURN_IN = 200  # steps discarded so that every resonator starts in its stationary regime


def _sequences(
    n: int, sets: list[NDArray[np.intp]], frequencies: NDArray[np.float64], seed: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(sets), n)
    x = np.empty((n, LENGTH))
    total = LENGTH + _BURN_IN
    for i, label in enumerate(labels):
        signal = np.zeros(total)
        for j in sets[label]:
            w = frequencies[j]
            band = lfilter(
                [1.0], [1.0, -2 * RADIUS * np.cos(w), RADIUS**2], rng.standard_normal(total)
            )
            signal += rng.uniform(0.5, 1.5) * band / band.std()
        signal = signal[_BURN_IN:]
        signal = signal / signal.std() + NOISE * rng.standard_normal(LENGTH)
        x[i] = signal / signal.std()
    return x.astype(np.float32)[..., None], labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def spectra_arrays() -> tuple[
    NDArray[np.float32], NDArray[np.int64], NDArray[np.float32], NDArray[np.int64], dict[str, Any]
]:
    """``(x_train, y_train, x_test, y_test, info)`` of the task (read-only arrays, cached)."""
    frequencies = np.linspace(0.15, np.pi - 0.15, N_FREQUENCIES)
    rng = np.random.default_rng(CLASS_SEED)
    sets = [np.sort(rng.choice(N_FREQUENCIES, PER_CLASS, replace=False)) for _ in range(N_CLASSES)]
    x, y = _sequences(N_TRAIN, sets, frequencies, TRAIN_SEED)
    x_test, y_test = _sequences(N_TEST, sets, frequencies, TEST_SEED)
    for array in (x, y, x_test, y_test):
        array.setflags(write=False)
    info = {
        "source": "synthetic: classify a noisy sum of resonances by its set of frequencies "
        "(see compressm_cli.spectra); generated locally",
        "frequencies": frequencies.tolist(),
        "class_frequencies": [s.tolist() for s in sets],
        "radius": RADIUS,
        "noise": NOISE,
        "seeds": {"classes": CLASS_SEED, "train": TRAIN_SEED, "test": TEST_SEED},
        "normalisation": "each sequence to unit variance",
    }
    return x, y, x_test, y_test, info
