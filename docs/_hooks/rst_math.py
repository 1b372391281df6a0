"""Griffe extension: turn the reStructuredText markup of the docstrings into Markdown.

The docstrings of ``compressm_core`` are NumPy-style and use a little reStructuredText, so that
they read well in ``help()`` and in Sphinx. Before mkdocstrings renders them this extension
rewrites, in every docstring of a loaded package:

- ``.. math::`` directives (indented bodies) into display math ``\\[ ... \\]``;
- ``:math:`x``` roles into inline math ``\\( x \\)``;
- ``:func:``, ``:class:``, ``:mod:``, ... roles into cross-references when the target is a
  public name of the package (in its ``__all__``), and into inline code otherwise;
- citations ``.. [1] text`` into a list, and citation references ``[1]_`` into ``[1]``.

Both math forms are the generic syntax of ``pymdownx.arithmatex`` (rendered by MathJax).
Registered in ``mkdocs.yml`` under the mkdocstrings Python handler's ``extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["RstMath", "convert"]

_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\.[ \t]+math::[ \t]*(?P<rest>.*)$")
_OPTION = re.compile(r"^:[\w-]+:")
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
_INLINE_MATH = re.compile(r":math:`(?P<body>[^`]+)`")
_XREF = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|exc|data|obj|const):`(?P<target>[^`]+)`")
_CITATION = re.compile(r"^(?P<indent>[ \t]*)\.\.[ \t]+\[(?P<label>[^\]]+)\][ \t]+(?P<text>.*)$")
_CITATION_REF = re.compile(r"\[(?P<label>[0-9]+|#[\w-]*)\]_")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(lines: list[str]) -> list[str]:
    """Replace each ``.. math::`` directive and its indented body by ``\\[ ... \\]`` blocks."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        base = len(indent)
        first = match["rest"].strip()
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and _OPTION.match(body[0].strip()):  # directive options (:label: ...)
            body.pop(0)
        while body and not body[-1].strip():
            body.pop()
        depth = min((_indent_of(b) for b in body if b.strip()), default=0)
        content = [first] if first else []
        content += [b[depth:].rstrip() if b.strip() else "" for b in body]
        # RST separates equations by blank lines; each becomes its own display.
        equations: list[list[str]] = [[]]
        for line in content:
            if line:
                equations[-1].append(line)
            elif equations[-1]:
                equations.append([])
        if out and out[-1].strip() and not _UNDERLINE.match(out[-1]):
            out.append("")
        for eq in (e for e in equations if e):
            out.append(indent + "\\[")
            out.extend(indent + line for line in eq)
            out.append(indent + "\\]")
            out.append("")
    while out and not out[-1].strip():
        out.pop()
    return out


def _citations(lines: list[str]) -> list[str]:
    """``.. [1] text`` (with indented continuation lines) becomes a list item ``- [1] text``."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _CITATION.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent, base = match["indent"], len(match["indent"])
        text = [match["text"].strip()]
        i += 1
        while i < len(lines) and lines[i].strip() and _indent_of(lines[i]) > base:
            text.append(lines[i].strip())
            i += 1
        out.append(f"{indent}- [{match['label']}] " + " ".join(text))
    return out


def convert(text: str, public: frozenset[str] = frozenset(), package: str = "") -> str:
    """Return ``text`` with its reStructuredText math, roles and citations in Markdown.

    Parameters
    ----------
    text : str
        A (cleaned) docstring.
    public : frozenset of str
        Names exported by ``package``; roles naming one of them become cross-references.
    package : str
        Name of the package the public names belong to.
    """
    lines = _citations(_math_blocks(text.split("\n")))
    text = "\n".join(lines)
    text = _INLINE_MATH.sub(lambda m: "\\(" + " ".join(m["body"].split()) + "\\)", text)

    def xref(match: re.Match[str]) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~").lstrip(".")
        if target.endswith("()"):
            target = target[:-2]
        shown = target.rsplit(".", 1)[-1] if short else target
        head, _, name = target.rpartition(".")
        if name in public and head in ("", package):
            return f"[`{shown}`][{package}.{name}]"
        return f"`{shown}`"

    text = _XREF.sub(xref, text)
    return _CITATION_REF.sub(lambda m: f"[{m['label']}]", text)


def _exports(pkg: griffe.Module) -> frozenset[str]:
    exports = pkg.exports or ()
    return frozenset(str(getattr(e, "name", e)) for e in exports)


def _walk(obj: griffe.Object, public: frozenset[str], package: str) -> None:
    if obj.docstring is not None:
        obj.docstring.value = convert(obj.docstring.value, public, package)
        vars(obj.docstring).pop("parsed", None)  # drop a cached parse, if any
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, public, package)  # type: ignore[arg-type]


class RstMath(griffe.Extension):
    """Rewrite every docstring of each loaded package once, after it is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, _exports(pkg), pkg.path)
