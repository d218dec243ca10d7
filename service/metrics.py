"""Prometheus metrics of one server, in its own registry (several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zspace_requests", "RPCs by method, model and status code",
                                ["method", "model", "code"], registry=r)
        self.latency = Histogram("zspace_request_seconds", "RPC latency in the servicer", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("zspace_batch_rows", "Rows per ONNX Runtime call", ["model", "graph"],
                                    buckets=ROW_BUCKETS, registry=r)
        self.queue_seconds = Histogram("zspace_queue_seconds", "Longest wait in the batch queue", ["model", "graph"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.models_loaded = Gauge("zspace_models_loaded", "Bundle versions being served", registry=r)
        self.models_broken = Gauge("zspace_models_broken", "Bundle versions that failed to load", registry=r)
        self._http = None
        self._children: dict[tuple, tuple] = {}  # labels() takes a lock and builds a key: once per label set

    def _child(self, key: tuple, make):
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = make()
        return child

    def observe(self, method: str, model: str, code: str, seconds: float) -> None:
        count, latency = self._child(("rpc", method, model, code),
                                     lambda: (self.requests.labels(method, model, code), self.latency.labels(method)))
        count.inc()
        latency.observe(seconds)

    def on_batch(self, model: str, graph: str, rows: int, queued_s: float) -> None:
        rows_h, queue_h = self._child(("batch", model, graph),
                                      lambda: (self.batch_rows.labels(model, graph), self.queue_seconds.labels(model, graph)))
        rows_h.observe(rows)
        queue_h.observe(queued_s)

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
