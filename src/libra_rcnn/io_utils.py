"""Atomic file writes: a reader (or a later run) sees either the old file or the complete new one.

The one write routine of the package for files whose loss or truncation would hurt
(checkpoints, COCO results, converted annotations):

1. the content goes to a temporary file ``.{name}.<random>.tmp`` in the destination folder (the
   same filesystem, so the final rename is atomic);
2. it is flushed and ``fsync``'ed, so the data is on disk before the rename;
3. ``os.replace`` puts it in place in one step, and the folder is ``fsync``'ed (best effort) so
   the rename itself survives a power loss.

On any failure before the rename (a full disk, a write error, ``KeyboardInterrupt``) the
temporary file is removed, the destination is left untouched, and the exception propagates
unchanged. A process killed outright (SIGKILL, power loss) cannot clean up: it may leave a
hidden ``.{name}.*.tmp`` file behind, but never a partly written destination.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Optional, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "temporary_files_of"]

PathLike = Union[str, os.PathLike]


def _fsync_directory(directory: Path) -> None:
    # not every platform/filesystem lets a directory be opened or fsync'ed; the data itself is
    # already durable, only the rename might be lost on a power cut
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: PathLike,
    write_fn: Callable[[IO], None],
    *,
    binary: bool = True,
    encoding: Optional[str] = None,
) -> Path:
    """Create or replace ``path`` atomically with what ``write_fn(fileobj)`` writes.

    Args:
        path: destination; missing parent folders are created.
        write_fn: called once with the open temporary file (``"wb"``, or ``"w"`` when
            ``binary=False``); it must not close it.
        binary: open the temporary file in binary (default) or text mode.
        encoding: text encoding for ``binary=False`` (default ``"utf-8"``).

    Returns:
        ``Path(path)``.

    Raises:
        whatever creating the folder, ``write_fn``, flushing, syncing or renaming raises, after
        the temporary file has been removed; ``ValueError`` if ``encoding`` is given with
        ``binary=True``.
    """
    if binary and encoding is not None:
        raise ValueError(f"encoding={encoding!r} is only valid with binary=False")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if binary:
            fileobj = os.fdopen(fd, "wb")
        else:
            fileobj = os.fdopen(fd, "w", encoding=encoding or "utf-8")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    try:
        with fileobj:
            write_fn(fileobj)
            fileobj.flush()
            os.fsync(fileobj.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data`` (bytes-like)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of ``text`` in ``encoding``."""
    return atomic_write(path, lambda f: f.write(text), binary=False, encoding=encoding)


def temporary_files_of(path: PathLike) -> list[Path]:
    """Leftover temporaries of :func:`atomic_write` for ``path`` (from killed processes), sorted.

    They are never read by the package; this is for cleaning up or inspecting them.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
