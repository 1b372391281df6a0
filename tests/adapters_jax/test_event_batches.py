"""The Flax NNX controller measures its layers of one shape in one batched call and gives what
measuring and planning each layer alone gives."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
jax.config.update("jax_enable_x64", True)

import compressm_core.layer_batches as layer_batches  # noqa: E402
from compressm_jax import LRU, S5  # noqa: E402
from compressm_jax.controller import CompreSSM  # noqa: E402


class Net(nnx.Module):
    def __init__(self, layer, sizes):
        rngs = nnx.Rngs(0)
        self.ssm0 = layer(4, sizes[0], rngs=rngs)
        self.ssm1 = layer(4, sizes[1], rngs=rngs)
        self.ssm2 = layer(4, sizes[2], rngs=rngs)


@pytest.mark.parametrize("layer", [LRU, S5], ids=["lru", "s5"])
@pytest.mark.parametrize("mode", ["fixed", "tolerance"])
def test_batched_event_equals_each_layer_alone(monkeypatch, layer, mode):
    sizes = (16, 12, 16)  # two shapes: two batched measurements
    batched, alone = Net(layer, sizes), Net(layer, sizes)
    calls = []
    measure = layer_batches.measure_layers

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return measure(*args, **kwargs)

    monkeypatch.setattr(layer_batches, "measure_layers", spy)
    options = {"mode": mode, "fraction": 0.5, "tau": 0.05}
    events = CompreSSM(batched, None, total_steps=10, **options).reduce()
    assert sorted(calls) == [1, 2]
    ctl = CompreSSM(alone, None, total_steps=10, **options)
    ctl._read_system = lambda name, layer: None  # every layer measured and planned alone
    reference = ctl.reduce()
    assert sorted(calls) == [1, 2]
    assert any(e.status == "reduced" for e in events)
    for got, want in zip(events, reference, strict=True):
        assert (got.status, got.old_rank, got.new_rank) == (
            want.status,
            want.old_rank,
            want.new_rank,
        )
        np.testing.assert_allclose(got.hsv, want.hsv, rtol=1e-10, atol=1e-12 * want.hsv[0])
        if got.status == "reduced":
            assert got.error_bound == pytest.approx(want.error_bound, rel=1e-9)
    for a, b in zip(
        jax.tree.leaves(nnx.state(batched)), jax.tree.leaves(nnx.state(alone)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
