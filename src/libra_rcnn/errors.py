"""The error type for problems with what a user gave us, as opposed to bugs.

Every exception raised because of the user's input (a config file or override, a dataset, an
image, a checkpoint, a command-line argument) is a :class:`UserInputError`; its message names
the file or argument and says what is wrong. The command line prints such an error as one line,
``libra-rcnn: error: <message>``, and exits with status 2; any other exception is a bug and keeps
its traceback. It subclasses :class:`ValueError`, so API callers catching ``ValueError`` keep
working.
"""

from __future__ import annotations

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """A problem with the user's input; the message names the file or argument."""
