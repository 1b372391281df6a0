"""A controller's account of what it did: sizes, parameters and each cut's relative bound."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .schedule import ReductionEvent

__all__ = ["initial_sizes", "relative_bound", "summary_text"]


def initial_sizes(sizes: Mapping[str, int], history: Sequence[ReductionEvent]) -> dict[str, int]:
    """Each layer's size before its first reduction (``old_rank`` of its first reduced event),
    else its current size."""
    first: dict[str, int] = {}
    for event in history:
        if event.status == "reduced" and event.old_rank is not None:
            first.setdefault(event.layer, int(event.old_rank))
    return {name: first.get(name, size) for name, size in sizes.items()}


def relative_bound(event: ReductionEvent) -> float | None:
    """The event's error bound :math:`2 \\sum_{i > r} \\sigma_i` over :math:`\\sigma_1`.

    :math:`\\sigma_1 \\le \\lVert G - D \\rVert_\\infty`, so this over-estimates the bound
    relative to the layer's gain: below 1e-2 the cut changed the layer's output map by at most
    one per cent of its largest Hankel singular value. ``None`` without a bound (selective
    layers) or without HSVs.
    """
    if event.error_bound is None or not event.hsv or not event.hsv[0] > 0:
        return None
    return float(event.error_bound) / float(event.hsv[0])


def summary_text(
    owner: str,
    sizes: Mapping[str, int],
    history: Sequence[ReductionEvent],
    *,
    step: int,
    total_steps: int,
    parameters: tuple[int, int] | None,
) -> str:
    """The text of ``summary()``: one line of totals, then one row per managed layer."""
    before = initial_sizes(sizes, history)
    reduced = [e for e in history if e.status == "reduced"]
    others = len(history) - len(reduced)
    head = f"{owner} at step {step} of {total_steps}: {len(reduced)} cut(s)"
    if others:
        head += f", {others} other event(s) (skipped, refused or rolled back)"
    head += f"; states {sum(before.values())} -> {sum(sizes.values())}"
    if parameters is not None:
        start, now = parameters
        share = f" ({100 * now / start:.1f} %)" if start else ""
        head += f"; parameters {start:,} -> {now:,}{share}"
    rows = [head, "", "| layer | states | cuts (step: old -> new, bound / sigma_1) |"]
    rows.append("|---|---|---|")
    for name, size in sizes.items():
        cuts = []
        for event in reduced:
            if event.layer != name:
                continue
            rel = relative_bound(event)
            bound = "-" if rel is None else f"{rel:.2g}"
            cuts.append(f"{event.step}: {event.old_rank} -> {event.new_rank} ({bound})")
        rows.append(f"| {name} | {before[name]} -> {size} | {', '.join(cuts) or 'none'} |")
    return "\n".join(rows)
