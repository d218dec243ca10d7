"""The server's Prometheus families, read back through prometheus_client's own text format."""

from prometheus_client import generate_latest

from zspace.service.metrics import Metrics


def _value(text: str, series: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(series + " ")))


def test_counts_and_cumulative_buckets():
    m = Metrics()
    for seconds in (0.0004, 0.0007, 0.003, 30.0):
        m.observe("Encode", "digits", "OK", seconds)
    m.observe("Search", "", "NOT_FOUND", 0.001)
    m.on_batch("digits", "encoder", 3, 0.0001)
    text = generate_latest(m.registry).decode()
    assert _value(text, 'zspace_requests_total{code="OK",method="Encode",model="digits"}') == 4
    assert _value(text, 'zspace_requests_total{code="NOT_FOUND",method="Search",model=""}') == 1
    assert _value(text, 'zspace_request_seconds_bucket{le="0.0005",method="Encode"}') == 1
    assert _value(text, 'zspace_request_seconds_bucket{le="0.001",method="Encode"}') == 2
    assert _value(text, 'zspace_request_seconds_bucket{le="10.0",method="Encode"}') == 3
    assert _value(text, 'zspace_request_seconds_bucket{le="+Inf",method="Encode"}') == 4
    assert _value(text, 'zspace_request_seconds_count{method="Encode"}') == 4
    assert abs(_value(text, 'zspace_request_seconds_sum{method="Encode"}') - 30.0041) < 1e-9
    # a value on a bucket's bound counts in that bucket (le = "less or equal")
    assert _value(text, 'zspace_request_seconds_bucket{le="0.001",method="Search"}') == 1
    assert _value(text, 'zspace_batch_rows_bucket{graph="encoder",le="2.0",model="digits"}') == 0
    assert _value(text, 'zspace_batch_rows_bucket{graph="encoder",le="4.0",model="digits"}') == 1


def test_gauges_and_empty_families():
    m = Metrics()
    m.set_models(2, 1)
    text = generate_latest(m.registry).decode()
    assert _value(text, "zspace_models_loaded") == 2 and _value(text, "zspace_models_broken") == 1
    assert "# TYPE zspace_request_seconds histogram" in text  # declared before any RPC
