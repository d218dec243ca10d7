"""Property-based fuzzing of every RPC of zspace.v1 and KServe v2 against a real server on a loopback port
(testbed/fuzz.py draws the requests). Bounded: a fixed number of examples and a time budget; the longer
run is `python -m benchmarks.redteam --fuzz N`."""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from serving import digits_served

from testbed.fuzz import Tally, requests, send
from zspace.service.client import ZSpaceClient

EXAMPLES = 300
BUDGET_S = 90.0


@pytest.fixture(scope="module")
def fuzzed(vae_bundle, tmp_path_factory):
    with digits_served(vae_bundle, tmp_path_factory.mktemp("fuzz")) as s:
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(s.target, options=opts) as channel:
            yield s, channel


def test_no_request_of_either_protocol_gets_a_bug_status_or_hangs(fuzzed):
    s, channel = fuzzed
    tally, started = Tally(), time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(drawn):
        path, request = drawn
        assume(request.ByteSize() < 16 << 20 and time.monotonic() - started < BUDGET_S)
        send(channel, path, request, tally)

    one()
    assert not tally.bad, f"{len(tally.bad)} bad answers of {tally.tried}: {tally.bad[:5]}"
    assert tally.tried >= 50, tally.tried
    methods = {m for m, _ in tally.statuses}
    assert len(methods) >= 15, f"only {sorted(methods)} were reached"
    with ZSpaceClient(s.target, timeout=20) as c:
        assert c.health() == "SERVING"
