"""`__all__` lists exactly the public functions and classes of every module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import compressm_core


def _modules() -> list[str]:
    names = ["compressm_core"]
    for info in pkgutil.walk_packages(compressm_core.__path__, "compressm_core."):
        names.append(info.name)
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
        and (name == "compressm_core" or getattr(obj, "__module__", "") == name)
        and name != "compressm_core._typing"
    }
    declared = set(module.__all__)
    missing, extra = public - declared, declared - set(vars(module))
    assert not missing, f"Missing from `{name}.__all__`: {sorted(missing)}"
    assert not extra, f"Extra in `{name}.__all__`: {sorted(extra)}"


def test_top_level_exports_are_sorted_and_documented() -> None:
    assert list(compressm_core.__all__) == sorted(compressm_core.__all__)
    for n in compressm_core.__all__:
        obj = getattr(compressm_core, n)
        assert obj.__doc__, f"{n} has no docstring"
