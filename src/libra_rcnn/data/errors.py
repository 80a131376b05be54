"""Exceptions for unusable data files.

Both name the offending file in their message so that a failure deep inside a data loader
worker still says which file to fix. Both are :class:`~libra_rcnn.errors.UserInputError` s
(hence ``ValueError`` s: the file's content is a bad value), so callers can catch either one
specifically or every user error at once.
"""

from __future__ import annotations

import os
from typing import Union

from ..errors import UserInputError

PathLike = Union[str, "os.PathLike[str]"]


class _BadFileError(UserInputError):
    """Base: ``path`` is the file, ``reason`` a short human-readable explanation."""

    kind = "file"

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = str(reason)
        super().__init__(f"bad {self.kind} {self.path!r}: {self.reason}")

    def __reduce__(self):
        # Default exception pickling would call ``cls(message)``; keep both fields instead so
        # the error survives crossing process boundaries (DataLoader workers, multiprocessing).
        return (type(self), (self.path, self.reason))


class BadImageError(_BadFileError):
    """An image file that is missing, unreadable, truncated, corrupt or too large."""

    kind = "image"


class BadAnnotationError(_BadFileError):
    """An annotation file (COCO json, VOC xml, proposals) that is malformed or inconsistent."""

    kind = "annotation file"
