"""MkDocs hook: warn (an error under ``--strict``) when a public name has no API entry.

Every name in ``compressm_core.__all__`` (``compressm_torch``, ``compressm_jax``) must appear in
``docs/api/core.md`` (``torch.md``, ``jax.md``) as a
``::: compressm_core.<name>`` block. ``__all__`` is read from the source with :mod:`ast`, so
nothing is imported.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.api_coverage")

_PAGES = {
    "compressm_core": "api/core.md",
    "compressm_torch": "api/torch.md",
    "compressm_jax": "api/jax.md",
}


def _exported(init: Path) -> list[str]:
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [str(ast.literal_eval(e)) for e in node.value.elts]  # type: ignore[attr-defined]
    return []


def on_pre_build(config: Any, **kwargs: Any) -> None:
    root = Path(config["config_file_path"]).parent
    docs = Path(config["docs_dir"])
    for package, page in _PAGES.items():
        init = root / "src" / package / "__init__.py"
        if not init.is_file():
            continue
        text = (docs / page).read_text(encoding="utf-8")
        documented = set(re.findall(rf"^:::\s*{package}\.(\w+)", text, flags=re.MULTILINE))
        for name in _exported(init):
            if name not in documented:
                log.warning("%s.%s is public but has no `:::` entry in %s", package, name, page)
