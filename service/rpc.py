"""One wrapper for every RPC: status codes, metrics and the client's deadline, in one place.

An RPC method is written as a plain coroutine that returns its response or
raises; `@rpc` maps what it raises to a gRPC status:

    InvalidArgument, UserError  -> INVALID_ARGUMENT (the message names the field)
    NotFound                    -> NOT_FOUND
    StatusError                 -> its class's code (ALREADY_EXISTS, FAILED_PRECONDITION, ...)
    QueueFull, TooLarge         -> RESOURCE_EXHAUSTED (retry later, or ask for less)
    IndexMoved                  -> UNAVAILABLE (an index folder replaced under a write; retry)
    the client's deadline       -> DEADLINE_EXCEEDED (the work is cancelled, its queue place freed)
    anything else               -> INTERNAL, logged with its traceback: a bug, never the client's fault

A KeyError is "anything else": NotFound is its own type so that a bug cannot
pass for a missing model. Every call is counted by method, model and status.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from zspace.errors import NotFound, UserError
from zspace.index.errors import IndexMoved
from zspace.service.batcher import QueueFull

log = logging.getLogger("zspace.serve")


class StatusError(UserError):
    """A refusal with its own status code (ALREADY_EXISTS, FAILED_PRECONDITION, ...): the class names the code."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidRequest(UserError):
    """The request as a whole is unusable (its bytes are not the message)."""


class TooLarge(Exception):
    """An answer, or the work in progress, over a size bound: RESOURCE_EXHAUSTED with what to ask for instead."""


def check_answer_size(size: int, limits, what: str) -> None:
    """TooLarge before an answer of `size` bytes is built, when it would not fit the message limit
    (limits.max_answer_bytes): an answer is bounded before any work is done for it."""
    if size > limits.max_answer_bytes:
        raise TooLarge(f"{what}: the answer would be {size / 2**20:.1f} MiB, over the message limit of "
                       f"{limits.max_answer_bytes >> 20} MiB; ask for fewer rows per request")


class Admission:
    """The bytes of requests being worked on, bounded fairly by size.

    A request under `small_bytes` is always admitted: it costs little, and refusing it
    because of someone else's flood is the unfairness to avoid. A bigger one is refused
    at once (RESOURCE_EXHAUSTED) when it would take the total past `budget_bytes`, before
    any work is done for it; with nothing else in progress any request is admitted (the
    message limit bounds it). Only the event loop's thread touches the counter."""

    def __init__(self, budget_bytes: int, small_bytes: int = 1 << 20):
        self.budget, self.small, self.inflight = budget_bytes, small_bytes, 0

    def enter(self, size: int) -> None:
        if size > self.small and self.inflight and self.inflight + size > self.budget:
            raise TooLarge(f"server busy: {self.inflight >> 20} MiB of requests in progress, this one {size >> 20} MiB "
                           f"(limit {self.budget >> 20} MiB); retry later or send smaller requests")
        self.inflight += size

    def leave(self, size: int) -> None:
        self.inflight -= size


class RpcHandlers:
    """A group of RPC methods. `RPCS` names them; `label` says which model a request concerns, for metrics."""

    RPCS: tuple[str, ...] = ()

    def __init__(self, metrics=None, admission: Admission | None = None):
        self.metrics, self.admission = metrics, admission

    def label(self, request) -> str:
        return ""


class Undecodable:
    """What a request deserializer returns for bytes that are not the message: @rpc answers INVALID_ARGUMENT."""

    def __init__(self, error: str):
        self.error = error


def tolerant(from_string):
    """A request deserializer that returns Undecodable instead of raising (gRPC would answer UNKNOWN).

    It hands `@rpc` the request together with its size on the wire, which the byte budget
    needs: asking the parsed message (ByteSize) would serialise it again."""
    def parse(data: bytes):
        try:
            return from_string(data), len(data)
        except Exception as exc:  # protobuf's DecodeError, and whatever a truncated message raises
            return Undecodable(f"request: not a valid protobuf message ({type(exc).__name__})"), len(data)
    return parse


MAX_STATUS_CHARS = 2000  # a status message travels in the trailers, whose size gRPC limits (8 KiB by default)


def safe_message(message: str) -> str:
    """A status message that can always be sent: valid UTF-8 and bounded.

    A message built from what a client sent may hold a lone surrogate (a JSON escape such
    as "\\ud800" decodes to one), which gRPC cannot encode: the abort itself would raise and
    the call would hang until its deadline. Every error path goes through here, so no
    message can fail to leave."""
    if len(message) > MAX_STATUS_CHARS:
        message = message[:MAX_STATUS_CHARS - 30] + f"…({len(message)} chars)"
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class BugLog:
    """Tracebacks of unexpected errors: one per RPC and error type a minute, the repeats counted.

    A client that finds a request which trips a bug can send it thousands of times a
    second; a traceback each time floods the disk and buries everything else."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.last: dict[tuple[str, str], tuple[float, int]] = {}  # (rpc, error type) -> (last traceback, repeats since)

    def report(self, name: str, exc: BaseException) -> None:
        key, now = (name, type(exc).__name__), time.monotonic()
        logged, repeats = self.last.get(key, (float("-inf"), 0))
        if now - logged < self.window_s:
            self.last[key] = (logged, repeats + 1)
            return
        if repeats:
            log.error("%s: %d more %s since its last traceback (not logged)", name, repeats, key[1])
        log.error("%s failed", name, exc_info=exc)
        self.last[key] = (now, 0)


BUGS = BugLog()


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, StatusError):
        return exc.code, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, UserError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc}; retry later"
    if isinstance(exc, TooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, IndexMoved):
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry"
    return grpc.StatusCode.INTERNAL, ""


def rpc(method):
    """Wrap `async def Name(self, request, context) -> response` of an RpcHandlers (see the module doc)."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: RpcHandlers, request, context):
        t0 = time.monotonic()
        code, message = grpc.StatusCode.OK, ""
        admitted = 0
        request, size = request if type(request) is tuple else (request, None)  # see tolerant()
        try:
            if isinstance(request, Undecodable):
                raise InvalidRequest(request.error)
            if self.admission is not None:
                size = request.ByteSize() if size is None else size
                self.admission.enter(size)
                admitted = size
            # A deadline that passed in a queue gets no work at all. One that passes during the work: gRPC
            # cancels the handler (CancelledError below), which frees its place in a batch queue; a timer of
            # our own would cost every call microseconds for what gRPC does already.
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code, message = grpc.StatusCode.DEADLINE_EXCEEDED, f"{name}: the deadline passed before the work began"
            else:
                return await method(self, request, context)
        except asyncio.CancelledError:  # gRPC cancels the handler when the client leaves or its deadline passes
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                BUGS.report(name, exc)
                message = f"{name}: internal error (logged on the server)"
            message = safe_message(message)
        finally:
            if admitted:
                self.admission.leave(admitted)
            if self.metrics:
                label = "" if isinstance(request, Undecodable) else self.label(request)
                self.metrics.observe(name, label, code.name, time.monotonic() - t0)
        await context.abort(code, message)

    return handler


def add_service(server, service, messages, *parts: RpcHandlers) -> None:
    """Serve the gRPC `service` (a service descriptor; `messages` the generated module holding its
    message classes) on `server`, its methods taken from the parts.

    Every RPC of the service must come from exactly one part: a missing one would
    answer UNIMPLEMENTED, two would be ambiguous. The handlers are registered here
    rather than by the generated add_*Servicer_to_server so that a request whose
    bytes are not a valid message reaches `@rpc` as `Undecodable` and is answered
    INVALID_ARGUMENT, where gRPC's own path would say UNKNOWN."""
    given = [name for part in parts for name in part.RPCS]
    if sorted(given) != sorted(service.methods_by_name):
        raise ValueError(f"RPCs not served: {sorted(set(service.methods_by_name) - set(given))}; served twice or unknown: "
                         f"{sorted(n for n in set(given) if given.count(n) > 1 or n not in service.methods_by_name)}")
    handlers = {}
    for part in parts:
        for name in part.RPCS:
            method = service.methods_by_name[name]
            request, response = getattr(messages, method.input_type.name), getattr(messages, method.output_type.name)
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                getattr(part, name), request_deserializer=tolerant(request.FromString),
                response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
