"""Checks of scalar arguments shared by the core and the framework packages.

Messages follow the library's template: which argument, what was expected, what was received.
"""

from __future__ import annotations

import operator

__all__ = ["check_fraction", "check_int", "check_rank", "check_size"]


def _index(value: object) -> int | None:
    """``value`` as a Python ``int`` if it is an integer (has ``__index__``), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return int(operator.index(value))  # type: ignore[arg-type]
    except TypeError:
        return None


def check_int(value: object, name: str, *, low: int, high: int | None = None) -> int:
    """Check that ``value`` is an integer in ``[low, high]`` and return it as a Python ``int``.

    Bools are rejected; other integers (anything with ``__index__``, such as NumPy integers) are
    accepted. With ``high`` (the arguments of the numerical functions) a non-integer raises
    ``TypeError`` and an integer out of range ``ValueError``. Without it (counts and options of
    the training controllers, bounded below only) every bad value raises ``ValueError`` with the
    message "`name` must be an int >= low".

    Parameters
    ----------
    value : object
        The argument.
    name : str
        Its name, for the message.
    low : int
        Smallest accepted value.
    high : int, optional
        Largest accepted value.

    Returns
    -------
    int
        ``value`` as a Python ``int``.

    Raises
    ------
    TypeError, ValueError
        As above.

    Examples
    --------
    >>> from compressm_core.checks import check_int
    >>> check_int(3, "steps", low=1)
    3
    >>> check_int(0, "steps", low=1)
    Traceback (most recent call last):
    ...
    ValueError: `steps` must be an int >= 1; received 0.
    """
    integer = _index(value)
    if high is None:
        if integer is None or integer < low:
            msg = f"`{name}` must be an int >= {low}; received {value!r}."
            raise ValueError(msg)
        return integer
    if integer is None:
        kind = "" if isinstance(value, bool) else f"{type(value).__name__} "
        msg = f"`{name}` must be an integer; received {kind}{value!r}."
        raise TypeError(msg)
    if not low <= integer <= high:
        msg = f"`{name}` must be in [{low}, {high}]; received {integer}."
        raise ValueError(msg)
    return integer


def check_fraction(value: object, name: str, *, closed: bool = False) -> float:
    """Check that ``value`` is a real number in ``[0, 1)`` (``[0, 1]`` if ``closed``).

    Parameters
    ----------
    value : object
        The argument (bools are refused).
    name : str
        Its name, for the message.
    closed : bool, optional
        Accept 1.

    Returns
    -------
    float
        ``value`` as a Python ``float``.

    Raises
    ------
    ValueError
        If ``value`` is not such a number.

    Examples
    --------
    >>> from compressm_core.checks import check_fraction
    >>> check_fraction(1, "gate", closed=True)
    1.0
    """
    interval = "[0, 1]" if closed else "[0, 1)"
    msg = f"`{name}` must be a float in {interval}; received {value!r}."
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(msg)
    number = float(value)
    if not (0 <= number <= 1 if closed else 0 <= number < 1):
        raise ValueError(msg)
    return number


def check_rank(rank: object, total: int) -> int:
    """Check that ``rank`` is an ``int`` in ``[1, total]`` (the rank of a layer's reduction).

    Parameters
    ----------
    rank : object
        The rank asked for (bools and NumPy integers are refused).
    total : int
        The layer's state size.

    Returns
    -------
    int
        ``rank``.

    Raises
    ------
    ValueError
        If ``rank`` is not such an int.

    Examples
    --------
    >>> from compressm_core.checks import check_rank
    >>> check_rank(4, 8)
    4
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= total:
        msg = f"`rank` must be an int in [1, {total}]; received {rank!r}."
        raise ValueError(msg)
    return rank


def check_size(value: object, name: str) -> int:
    """Check that ``value`` is a positive ``int`` (a layer's width, state size or block count).

    Parameters
    ----------
    value : object
        The argument (bools and NumPy integers are refused).
    name : str
        Its name, for the message.

    Returns
    -------
    int
        ``value``.

    Raises
    ------
    ValueError
        If ``value`` is not a positive int.

    Examples
    --------
    >>> from compressm_core.checks import check_size
    >>> check_size(16, "d_state")
    16
    >>> check_size(0, "d_state")
    Traceback (most recent call last):
    ...
    ValueError: `d_state` must be a positive int; received 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"`{name}` must be a positive int; received {value!r}."
        raise ValueError(msg)
    return value
