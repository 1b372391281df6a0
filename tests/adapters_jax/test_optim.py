"""optax state surgery: sliced or reset moments for reduced parameters, everything else kept."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy
DictKey = jax.tree_util.DictKey

from compressm_jax.optim import ParamChange, resize_optimizer_state  # noqa: E402

jax.config.update("jax_enable_x64", True)


def params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "encoder": {"w": jax.random.normal(k[0], (3, 4))},
        "ssm": {
            "B": jax.random.normal(k[1], (6, 4)),
            "C": jax.random.normal(k[2], (4, 6)),
            "nu": jax.random.normal(k[3], (6,)),
        },
        # same leaf name as a state parameter, other owner: must not be touched
        "head": {"nu": jnp.ones(6)},
    }


def trained_state(opt, p, steps=3):
    state = opt.init(p)
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda x, i=i: jnp.sin(x + i), p)
        updates, state = opt.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    return p, state


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
    "multi_transform": lambda: optax.multi_transform(
        {"ssm": optax.adam(1e-3), "rest": optax.adamw(1e-2)},
        {
            "encoder": {"w": "rest"},
            "ssm": {"B": "ssm", "C": "ssm", "nu": "ssm"},
            "head": {"nu": "rest"},
        },
    ),
}


def _moments(state):
    """{path: leaf} of every array leaf of an optax state."""
    return {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if hasattr(leaf, "shape")
    }


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_index_selection_slices_and_basis_change_resets(name):
    opt = OPTIMIZERS[name]()
    p, state = trained_state(opt, params())
    keep = jnp.array([0, 2, 5])
    ssm = p["ssm"]
    plan = {
        (DictKey("ssm"), DictKey("B")): ParamChange(ssm["B"][keep], 0, keep),
        (DictKey("ssm"), DictKey("C")): ParamChange(ssm["C"][:, keep], 1, keep),
        (DictKey("ssm"), DictKey("nu")): ParamChange(jnp.zeros(3)),  # change of basis: reset
    }
    new_p, new_state = resize_optimizer_state(p, state, plan)
    assert new_p["ssm"]["B"].shape == (3, 4)
    assert new_p["encoder"]["w"] is p["encoder"]["w"]
    before, after = _moments(state), _moments(new_state)
    assert set(before) == set(after)
    touched = 0
    for path, old in before.items():
        new = after[path]
        if path.endswith("['ssm']['B']"):
            assert jnp.array_equal(new, old[keep])
            touched += 1
        elif path.endswith("['ssm']['C']"):
            assert jnp.array_equal(new, old[:, keep])
        elif path.endswith("['ssm']['nu']"):
            assert new.shape == (3,)
            assert not jnp.any(new)
        else:  # counts, other parameters (incl. head.nu of the same shape), norms: untouched
            assert new is old
    assert touched >= 2  # mu and nu (Adam)
    # the optimizer runs on the new shapes
    grads = jax.tree_util.tree_map(jnp.ones_like, new_p)
    updates, _ = opt.update(grads, new_state, new_p)
    assert updates["ssm"]["C"].shape == (4, 3)


def test_bad_plans_name_the_problem():
    p = params()
    state = optax.adam(1e-3).init(p)
    with pytest.raises(KeyError, match="not a leaf"):
        resize_optimizer_state(p, state, {(DictKey("ssm"), DictKey("A")): ParamChange(1.0)})
    with pytest.raises(ValueError, match="indices"):
        resize_optimizer_state(
            p,
            state,
            {(DictKey("ssm"), DictKey("B")): ParamChange(p["ssm"]["B"][:2], 0, jnp.arange(3))},
        )
    with pytest.raises(TypeError, match="ParamChange"):
        resize_optimizer_state(p, state, {(DictKey("ssm"), DictKey("B")): p["ssm"]["B"]})
