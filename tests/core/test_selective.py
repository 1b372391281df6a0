"""compressm_core.selective: one namespace for the selective statistics and state importance."""

from __future__ import annotations

import compressm_core
from compressm_core import importance, selective, selective_statistics


def test_names_are_those_of_the_two_modules() -> None:
    """Every name is the object of :mod:`~compressm_core.selective_statistics` or
    :mod:`~compressm_core.importance` (no copies), exported from the top level too, and
    together the two modules' public names are exactly this module's."""
    sources = dict.fromkeys(selective_statistics.__all__, selective_statistics)
    sources |= dict.fromkeys(importance.__all__, importance)
    assert set(selective.__all__) == set(sources)
    for name, module in sources.items():
        assert getattr(selective, name) is getattr(module, name), name
        assert getattr(compressm_core, name) is getattr(module, name), name
