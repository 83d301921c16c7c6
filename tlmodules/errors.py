"""The kinds of mistakes a user can make, as exception classes.

Every error raised because of what the user gave (a data file, a folder, a backbone spec, an argument
value, a checkpoint) derives from :class:`UserError`, and its message names the problem, where it is,
and the fix. ``train.py`` prints such an error as one ``error: <message>`` line and exits with status 2;
anything else is a bug in tlmodules (or a library under it) and keeps its traceback.

The classes also derive from the built-in exception a Python caller would expect (``ValueError`` for a
bad value, ``FileNotFoundError`` for a missing file), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's data, files or configuration; the message says what to change."""


class ConfigError(UserError, ValueError):
    """An argument value that cannot work (a negative learning rate, an unknown strategy name, …)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named does not exist."""


def find_user_error(error: BaseException) -> UserError | None:
    """The first :class:`UserError` in ``error``'s chain (itself, then its ``__cause__`` / ``__context__``):
    libraries such as jsonargparse wrap the error raised in a constructor inside their own."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
