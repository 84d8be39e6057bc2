"""The one base class of every error the user can fix (a bad option, a missing or unusable file).

The CLI prints a ``UserError`` as one line and exits 2; anything else is a bug and keeps its
traceback. The subclasses also derive from the builtin they refine, so ``except ValueError`` (or
FileNotFoundError, FileExistsError) around library calls keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave; the message names the thing and the fix."""


class InputError(UserError, ValueError):
    """A bad option value or unusable input content."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or a run recorded) does not exist."""


class ExistingFileError(UserError, FileExistsError):
    """Output would overwrite something that must be kept."""
