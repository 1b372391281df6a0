"""The NNX SequenceModel is the torch SequenceModel: same weights, same outputs and layer names."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import compressm_jax as cj  # noqa: E402
import compressm_torch as ct  # noqa: E402

U = np.random.default_rng(0).normal(size=(3, 20, 2))


def copy_weights(source, target):
    """Copy a torch SequenceModel's parameters into an NNX one (kernel = weight.T)."""
    flat = dict(nnx.to_flat_state(nnx.state(target, nnx.Param)))
    names = {".".join(map(str, path)): path for path in flat}
    copied = set()
    for name, param in source.named_parameters():
        value = param.detach().numpy()
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and value.ndim == 2 and not module.endswith("ssm"):
            leaf, value = "kernel", value.T
        elif leaf == "weight":
            leaf = "scale"  # LayerNorm
        key = f"{module}.{leaf}"
        var = flat[names[key]]
        assert var.shape == value.shape, key
        var.set_value(jnp.asarray(value))
        copied.add(key)
    assert copied == set(names)  # every NNX parameter has a torch twin
    nnx.update(target, nnx.from_flat_state(flat))


@pytest.mark.parametrize(
    ("layer", "pool", "norm"),
    [("lru", "mean", "layer"), ("s5", None, "layer"), ("lru", None, "batch")],
)
def test_same_weights_same_outputs(layer, pool, norm):
    torch.manual_seed(0)
    kw = {"d_model": 6, "d_state": (8, 5), "n_layers": 2, "layer": layer, "pool": pool}
    reference = ct.SequenceModel(2, 3, norm=norm, **kw).double()
    model = cj.SequenceModel(2, 3, norm=norm, param_dtype=jnp.float64, rngs=nnx.Rngs(1), **kw)
    sizes = {"blocks.0.ssm": 8, "blocks.1.ssm": 5}
    assert cj.state_sizes(model) == ct.state_sizes(reference) == sizes
    copy_weights(reference, model)
    for train in (False, True):  # BatchNorm: running statistics, then batch statistics
        reference.train(train)
        model.train() if train else model.eval()
        expected = reference(torch.from_numpy(U)).detach().numpy()
        out = np.asarray(model(jnp.asarray(U)))
        assert out.dtype == np.float64
        assert out.shape == ((3, 3) if pool == "mean" else (3, 20, 3))
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_defaults_and_initialisation_match_torch():
    ours = inspect.signature(cj.SequenceModel.__init__).parameters
    theirs = inspect.signature(ct.SequenceModel.__init__).parameters
    for name in ("d_model", "d_state", "n_layers", "layer", "pool", "dropout", "norm"):
        assert ours[name].default == theirs[name].default, name
    model = cj.SequenceModel(2, 3, d_model=6, d_state=8, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert model.blocks[0].norm.epsilon == ct.SequenceModel(2, 3).blocks[0].norm.eps
    bound = 1 / np.sqrt(6)  # torch.nn.Linear's uniform bound, 1/sqrt(fan_in)
    for value in (model.blocks[0].out.kernel[...], model.blocks[0].out.bias[...]):
        assert np.abs(np.asarray(value)).max() <= bound
    assert model.blocks[0].out.kernel.shape == (6, 12)


def test_reduction_and_bad_arguments():
    kw = {"d_model": 6, "d_state": 8, "n_layers": 2, "param_dtype": jnp.float64}
    model = cj.SequenceModel(2, 3, rngs=nnx.Rngs(0), **kw)
    ctl = cj.CompreSSM(model, None, total_steps=9, mode="fixed", fraction=0.5, reduction_steps=[1])
    ctl.step()
    assert cj.state_sizes(model) == {"blocks.0.ssm": 4, "blocks.1.ssm": 4}
    for kwargs, name in [
        ({"layer": "mamba"}, "`layer`"),
        ({"pool": "max"}, "`pool`"),
        ({"d_state": (4, 4)}, "`d_state`"),
        ({"norm": "group"}, "`norm`"),
    ]:
        with pytest.raises(ValueError, match=name):
            cj.SequenceModel(2, 3, rngs=nnx.Rngs(0), **kwargs)
