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


# Parameters one framework's version of a shared name takes and the other's does not, each with
# the reason. Keys are ``(name, parameter)``; the value says which framework has it.
_MODULE_CONVENTIONS = {
    "device": ("torch", "torch modules are built on a device; JAX places arrays itself"),
    "dtype": ("torch", "torch's factory keyword; flax calls it `param_dtype`"),
    "param_dtype": ("jax", "flax's name for the parameters' dtype (torch: `dtype`)"),
    "rngs": ("jax", "flax nnx modules draw their initial values from explicit `nnx.Rngs`"),
}
PARAMETER_DIFFERENCES: dict[tuple[str, str], tuple[str, str]] = {
    **{
        (module, parameter): value
        for module in ("LRU", "S4D", "S5", "SSMBlock", "SequenceModel")
        for parameter, value in _MODULE_CONVENTIONS.items()
        # torch blocks take no device/dtype (moved with `.to()`; `layer_kwargs` reach the layers)
        if not (module in ("SSMBlock", "SequenceModel") and parameter in ("device", "dtype"))
    },
    ("reduce_layer", "generator"): ("torch", "torch's random state is a `torch.Generator`"),
    ("reduce_layer", "key"): ("jax", "JAX's random state is an explicit PRNG key"),
    ("CompreSSM", "optimizer_state"): (
        "torch",
        "torch optimizers hold their state in place; JAX's is rebuilt by the pure "
        "`resize_optimizer_state` with its own plan",
    ),
    ("CompreSSM", "lr_scheduler"): ("torch", "torch schedulers are objects stepped beside it"),
    ("CompreSSM", "importance"): ("torch", "selective (Mamba) layers are torch-only"),
    ("CompreSSM", "aggregate"): ("torch", "selective (Mamba) layers are torch-only"),
    ("CompreSSM", "calibration_steps"): ("torch", "selective (Mamba) layers are torch-only"),
    ("CompreSSM", "calibration_batches"): ("torch", "selective (Mamba) layers are torch-only"),
    ("CompreSSM", "calibration_sequences"): ("torch", "selective (Mamba) layers are torch-only"),
    ("LayerAdapter", "differentiable_state_space"): (
        "torch",
        "used by the torch-only Hankel nuclear-norm regulariser",
    ),
    ("save_checkpoint", "f"): ("torch", "torch saves one file (`torch.save`)"),
    ("save_checkpoint", "directory"): ("jax", "Orbax saves a directory"),
    ("save_checkpoint", "lr_scheduler"): ("torch", "torch schedulers are stateful objects"),
    ("save_checkpoint", "extra"): ("torch", "extra picklable entries of the torch file"),
    ("save_checkpoint", "overwrite"): ("jax", "Orbax refuses an existing directory unless told"),
    ("load_checkpoint", "f"): ("torch", "torch loads one file (`torch.load`)"),
    ("load_checkpoint", "directory"): ("jax", "Orbax loads a directory"),
    ("load_checkpoint", "lr_scheduler"): ("torch", "torch schedulers are stateful objects"),
    ("load_checkpoint", "map_location"): ("torch", "`torch.load`'s device mapping"),
}
# Shared names whose signatures differ as a whole, with the reason.
DIFFERENT_CONTRACTS = {
    "resize_optimizer_state": "torch changes one optimizer's state of one parameter in place; "
    "JAX maps a whole optax state through a plan of parameter changes (a pure function)",
}


def _keyword_parameters(obj: object) -> dict[str, inspect.Parameter]:
    """Parameters that can be passed by name (of ``__init__`` for a class, without ``self``)."""
    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    parameters = list(inspect.signature(target).parameters.values())  # type: ignore[arg-type]
    if inspect.isclass(obj):
        parameters = parameters[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in parameters if p.kind in kinds}


@pytest.mark.skipif(
    not {"compressm_torch", "compressm_jax"} <= set(PACKAGES), reason="needs torch and JAX"
)
def test_torch_and_jax_keyword_parameters_agree() -> None:
    """For every name in both frameworks, the functions (or the classes' ``__init__``) take the
    same parameters by name, with the same kind and default, except the listed per-framework
    differences; every listed difference still exists (the list cannot go stale)."""
    torch_api = importlib.import_module("compressm_torch")
    jax_api = importlib.import_module("compressm_jax")
    shared = sorted(set(torch_api.__all__) & set(jax_api.__all__))
    assert set(DIFFERENT_CONTRACTS) <= set(shared)
    seen: set[tuple[str, str]] = set()
    for name in shared:
        a, b = getattr(torch_api, name), getattr(jax_api, name)
        if a is b or name in DIFFERENT_CONTRACTS:
            continue
        if not (inspect.isclass(a) or inspect.isfunction(a)):
            continue  # type aliases and constants have no parameters
        if inspect.isclass(a) and a.__init__ is object.__init__:
            continue
        pa, pb = _keyword_parameters(a), _keyword_parameters(b)
        for framework, only in (("torch", set(pa) - set(pb)), ("jax", set(pb) - set(pa))):
            for parameter in sorted(only):
                key = (name, parameter)
                assert key in PARAMETER_DIFFERENCES, f"{name}({parameter}=) is {framework}-only"
                assert PARAMETER_DIFFERENCES[key][0] == framework, key
                seen.add(key)
        for parameter in sorted(set(pa) & set(pb)):
            x, y = pa[parameter], pb[parameter]
            assert x.kind == y.kind, (name, parameter, x.kind, y.kind)
            assert x.default == y.default, (name, parameter, x.default, y.default)
    assert seen == set(PARAMETER_DIFFERENCES), sorted(set(PARAMETER_DIFFERENCES) - seen)
