"""Files that a crash never leaves half-written, and the error for a file that cannot be read."""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import zipfile
from collections.abc import Iterator
from typing import IO

from .errors import CheckpointError

__all__ = ["READ_ERRORS", "atomic_write", "unreadable"]

_ATTEMPTS = 100

READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)
"""What readers of torch, NumPy and zip files raise on a truncated or corrupt file (a
corrupted pickle stream can also make the unpickler pop an empty stack, ``IndexError``, or call
with wrong arguments, ``TypeError``)."""


def unreadable(name: str, err: BaseException, what: str) -> CheckpointError:
    """The error for a file ``name`` that its reader rejected with ``err`` (``what`` says what
    the file should have been, e.g. ``"a checkpoint of torch.save"``)."""
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return CheckpointError(
        f"{name}: not a readable {what}; the file is truncated, corrupt or of another kind "
        f"({detail})."
    )


def _temporary(path: str) -> tuple[int, str]:
    """Open a new, hidden file next to ``path`` (``.<name>.<random>.tmp``) for writing.

    Created with mode ``0o666`` less the umask, like ``open(path, "wb")``, not the ``0o600`` of
    :func:`tempfile.mkstemp`.
    """
    folder, name = os.path.split(path)
    for _ in range(_ATTEMPTS):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    msg = f"{path}: found no free name for a temporary file in {folder or '.'!r}."
    raise FileExistsError(msg)


def _sync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` only once it is completely written.

    The data go to a temporary file in the folder of ``path``; when the ``with`` block ends
    without an exception, the file is flushed, synced to disk and renamed over ``path``
    (:func:`os.replace`, atomic on POSIX and Windows). Readers, and a later run after a crash
    or a kill at any point, see either the old file or the new one, never a fragment. On an
    exception the temporary file is removed and ``path`` is left as it was; a process killed
    outright (``SIGKILL``) may leave a hidden ``.<name>.<random>.tmp`` file next to ``path``,
    which later writes ignore.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write; its folder must exist.

    Yields
    ------
    file
        The temporary file, open for writing in binary mode.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from compressm_core.files import atomic_write
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "data.bin"
    >>> with atomic_write(target) as f:
    ...     _ = f.write(b"complete")
    >>> target.read_bytes()
    b'complete'
    """
    target = os.path.abspath(os.fspath(path))
    fd, tmp = _temporary(target)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(os.path.dirname(target))
