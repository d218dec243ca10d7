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
    text = repr(value)  # repr escapes lone surrogates: the message stays encodable
    return text if len(text) <= limit else f"{text[: limit - 1]}…({len(text)} chars)"


def shown_list(values, limit: int = 12, each: int = 40) -> str:
    """Names for an error message, sorted, each cut by `shown` and at most `limit` of them: stored names
    (payload fields, say) may be many and long, and a message must stay small."""
    names = sorted(values, key=str)
    text = ", ".join(shown(v, each) for v in names[:limit]) or "none"
    return text if len(names) <= limit else f"{text}, … ({len(names)} in all)"
