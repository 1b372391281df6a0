"""`__all__` lists exactly the public functions and classes of every module."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil

import pytest

PACKAGES = ["compressm_core"]
if importlib.util.find_spec("torch") is not None:
    PACKAGES.append("compressm_torch")
if importlib.util.find_spec("jax") is not None and importlib.util.find_spec("flax") is not None:
    PACKAGES.append("compressm_jax")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [info.name for info in pkgutil.walk_packages(path, f"{package}.")]
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_matches_public_members(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    public = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and (name in PACKAGES or getattr(obj, "__module__", "") == name)
        and name != "compressm_core._typing"
    }
    declared = set(module.__all__)
    missing, extra = public - declared, declared - set(vars(module))
    assert not missing, f"Missing from `{name}.__all__`: {sorted(missing)}"
    assert not extra, f"Extra in `{name}.__all__`: {sorted(extra)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_top_level_exports_are_sorted_and_documented(package: str) -> None:
    module = importlib.import_module(package)
    assert len(set(module.__all__)) == len(module.__all__)  # (ruff RUF022 keeps it sorted)
    for n in module.__all__:
        obj = getattr(module, n)
        assert obj.__doc__, f"{n} has no docstring"


def test_controllers_share_the_event_record_and_the_warning() -> None:
    """One ReductionEvent and one ReductionWarning for every framework, so histories compare
    and one ``warnings.filterwarnings`` covers both controllers."""
    core = importlib.import_module("compressm_core")
    for package in ("compressm_torch", "compressm_jax"):
        if importlib.util.find_spec(package.replace("compressm_", "")) is None:
            continue
        module = importlib.import_module(package)
        assert module.ReductionWarning is core.ReductionWarning
        assert issubclass(core.ReductionWarning, UserWarning)
        assert module.ReductionEvent is core.ReductionEvent
        assert module.reduction_schedule is core.reduction_schedule


# Names one framework has and the other cannot: torch's selective (Mamba) layers and the
# statistics they are reduced from, the deprecated name
# of `resize_optimizer_state`, the library parts of the baselines of `compressm compare` (torch
# only); JAX's pure functions over parameter trees of other libraries and the optax form of the
# re-warm-up (torch applies it through optimizer step hooks).
TORCH_ONLY = {
    "Mamba",
    "SelectiveAdapter",
    "SelectiveRecorder",
    "distillation_loss",
    "hankel_nuclear_norm",
    "hankel_nuclear_norms",
    "reduce_model",
    "reduce_selective_layer",
    "selective_importance",
    "update_optimizer_state",
}
JAX_ONLY = {
    "ParamChange",
    "RewarmupState",
    "lru_to_state_space",
    "mark_cut",
    "reduce_lru_params",
    "scale_by_rewarmup",
}


@pytest.mark.skipif(
    not {"compressm_torch", "compressm_jax"} <= set(PACKAGES), reason="needs torch and JAX"
)
def test_torch_and_jax_public_apis_mirror_each_other() -> None:
    """Every public name exists in both frameworks as the same kind of object, except the
    listed framework-specific ones; both controllers take every shared option by name."""
    from dataclasses import fields

    from compressm_core.training import ReductionOptions

    torch_api = importlib.import_module("compressm_torch")
    jax_api = importlib.import_module("compressm_jax")
    torch_names, jax_names = set(torch_api.__all__), set(jax_api.__all__)
    assert torch_names - jax_names == TORCH_ONLY
    assert jax_names - torch_names == JAX_ONLY
    for name in sorted(torch_names & jax_names):
        a, b = getattr(torch_api, name), getattr(jax_api, name)
        assert inspect.isclass(a) == inspect.isclass(b), name
        assert inspect.isfunction(a) == inspect.isfunction(b), name
    options = {f.name for f in fields(ReductionOptions)}
    for controller in (torch_api.CompreSSM, jax_api.CompreSSM):
        parameters = inspect.signature(controller).parameters
        keyword = {n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert options <= keyword, sorted(options - keyword)
