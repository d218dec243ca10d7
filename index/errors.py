"""The index's errors: mistakes a user can fix (the CLI prints one line, the service answers INVALID_ARGUMENT)."""

from __future__ import annotations

from zspace.errors import UserError


class IndexError_(UserError):
    """A problem with an index folder or a request against it."""


class FactoryError(IndexError_):
    """A FAISS factory string FAISS cannot build, or one zspace cannot serve."""


class IndexMoved(Exception):
    """The index's folder was replaced or removed while it was open: nothing more is written through this
    object; reopen the folder (the service does, and answers UNAVAILABLE if that fails too)."""
