"""One exception type for mistakes a user can fix.

The CLI turns a UserError into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a path, a file, an option value."""


class NotFound(UserError):
    """A model, version, index or key that the caller named does not exist (gRPC NOT_FOUND).

    A separate type, not KeyError: a KeyError raised by a bug must not reach a
    client disguised as "not found"."""


def shown(value: object, limit: int = 64) -> str:
    """repr(value) for an error message, cut to `limit` characters: a message must never echo a client's
    megabytes back (a gRPC status message travels in the trailers, which have a size limit of their own)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…({len(text)} chars)"
