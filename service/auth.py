"""Bearer-token auth for every RPC but the probes, and where the token comes from."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from zspace.errors import UserError
from zspace.kserve import grpc_service_pb2 as kpb

KSERVE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Probes need no token: gRPC health, and KServe's liveness and readiness (they say nothing about the models).
OPEN_METHODS = ("/grpc.health.v1.Health/", f"/{KSERVE.full_name}/ServerLive", f"/{KSERVE.full_name}/ServerReady")


def read_token(token_file: str | None, token_env: str) -> str | None:
    """The bearer token from a file (first line) or an environment variable; None = auth off."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise UserError(f"--token-file: cannot read {token_file} ({exc.strerror})") from None
        if not token:
            raise UserError(f"--token-file: {token_file} is empty")
        return token
    return os.environ.get(token_env) or None


class BearerAuth(grpc.aio.ServerInterceptor):
    """Every RPC but the probes (OPEN_METHODS) needs `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got, self.expected):
            return await continuation(details)
        return self.deny
