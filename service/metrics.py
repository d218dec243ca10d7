"""Prometheus metrics of one server, in its own registry (several servers can share a process).

Per-RPC and per-batch figures are kept in plain dicts and lists and turned into
Prometheus families only when /metrics is scraped. prometheus_client's own
Counter and Histogram take a lock per update and walk the buckets in Python,
several times the cost of these plain updates, and a small Search is only tens
of microseconds (benchmarks/README.md).
Updates come from the event loop thread; a scrape reads from the HTTP
thread, copying each dict in one step (atomic under the GIL).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histograms:
    """One histogram family: per label values, a count per bucket (the last is +Inf) and the sum."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]):
        self.name, self.doc, self.labels, self.buckets = name, doc, labels, buckets
        self.series: dict[tuple, list] = {}  # label values -> [counts per bucket..., sum]

    def observe(self, values: tuple, amount: float) -> None:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = [0] * (len(self.buckets) + 1) + [0.0]
        series[bisect_left(self.buckets, amount)] += 1
        series[-1] += amount

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for values, series in list(self.series.items()):
            series = list(series)
            cumulative, buckets = 0, []
            for bound, n in zip([*map(floatToGoString, self.buckets), "+Inf"], series[:-1]):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, series[-1])
        return family


class _Collector:
    """Hands the registry the families kept by Metrics, made at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        requests = CounterMetricFamily("zspace_requests", "RPCs by method, model and status code",
                                       labels=("method", "model", "code"))
        for values, n in list(m.requests.items()):
            requests.add_metric(list(values), n)
        yield requests
        for histograms in (m.latency, m.batch_rows, m.queue_seconds):
            yield histograms.family()
        sizes = GaugeMetricFamily("zspace_index_bytes", "Memory an index takes in this process (FAISS and payload "
                                  "indexes; keys and payloads stay in its item store)", labels=("index",))
        for name, nbytes in m.index_bytes().items():
            sizes.add_metric([name], nbytes)
        yield sizes


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency = Histograms("zspace_request_seconds", "RPC latency in the servicer", ("method",), LATENCY_BUCKETS)
        self.batch_rows = Histograms("zspace_batch_rows", "Rows per ONNX Runtime call", ("model", "graph"), ROW_BUCKETS)
        self.queue_seconds = Histograms("zspace_queue_seconds", "Longest wait in the batch queue", ("model", "graph"),
                                        LATENCY_BUCKETS)
        self.registry.register(_Collector(self))
        self.models_loaded = Gauge("zspace_models_loaded", "Bundle versions being served", registry=self.registry)
        self.models_broken = Gauge("zspace_models_broken", "Bundle versions that failed to load", registry=self.registry)
        self._http = None
        self.index_bytes: Callable[[], dict[str, int]] = dict  # the server's indexes, asked at scrape time

    def observe(self, method: str, model: str, code: str, seconds: float) -> None:
        key = (method, model, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.observe((method,), seconds)

    def on_batch(self, model: str, graph: str, rows: int, queued_s: float) -> None:
        self.batch_rows.observe((model, graph), rows)
        self.queue_seconds.observe((model, graph), queued_s)

    def set_models(self, loaded: int, broken: int) -> None:
        self.models_loaded.set(loaded)
        self.models_broken.set(broken)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns the bound port (useful with port 0)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
