"""Ports: whether one can be listened on (asked before minutes of loading, so a mistake is named at once),
and the reservation a group of workers shares."""

from __future__ import annotations

import socket

from zspace.errors import UserError


def check_port_free(host: str, port: int, option: str) -> None:
    """UserError naming the option when HOST:PORT cannot be listened on (before gRPC logs its own C-level error)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host: cannot resolve {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a closing socket is no obstacle
            try:
                s.bind(address)
            except OSError as exc:
                raise UserError(f"{option}: cannot listen on {host}:{port} ({exc.strerror}); choose another {option}"
                                f"{', or 0 to turn metrics off' if option == '--metrics-port' else ', or 0 for any free port'}") from None


def reserve_port(host: str, port: int, option: str = "--port") -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket on HOST:PORT that the workers' listeners join."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UserError("--workers: this OS has no SO_REUSEPORT, so processes cannot share a port; use --workers 1")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host: cannot resolve {host!r} ({exc.strerror})") from None
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(address)
    except OSError as exc:
        s.close()
        raise UserError(f"{option}: cannot listen on {host}:{port} ({exc.strerror}); choose another {option}") from None
    return s
