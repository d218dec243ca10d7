"""The server's settings, each with its default in one place.

`zspace serve` builds one ServeConfig from its options (whose defaults are read
from these classes) and hands it whole to the server; the server hands each part
whole to what uses it: BatchConfig to every model graph's batcher, SearchConfig to
the index searches, the thread counts to ONNX Runtime and FAISS, Limits to the
servicer. A model folder may override its batching with `models/NAME/serving.json`
(as Triton's config.pbtxt does): see `model_serving`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from zspace.bundle import PRECISIONS
from zspace.errors import UserError
from zspace.runtime import RuntimeOptions

MODEL_CONFIG_FILE = "serving.json"
SERVE_RUNTIME = RuntimeOptions(device="auto", spin=False)  # a server's defaults: the serve command's too


@dataclass(frozen=True)
class BatchConfig:
    """How one model graph's dynamic batcher merges requests (see batcher.py)."""

    max_batch: int = 64          # rows merged into one ONNX Runtime call (1: batching off)
    max_delay_ms: float = 1.0    # longest wait for a batch to fill, taken only while waiting merges requests
    max_queue_rows: int = 4096   # rows waiting before RESOURCE_EXHAUSTED, in each lane (small and big requests)
    inline_rows: int = 64        # batches up to this size run on the event loop's thread when nothing else runs
    instances: int = 1           # runs in flight at once (Triton's instance count)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue_rows", "instances"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.inline_rows, int) or self.inline_rows < 0:
            raise UserError(f"inline_rows: expected a non-negative integer, got {self.inline_rows!r}")
        if not isinstance(self.max_delay_ms, (int, float)) or not 0 <= self.max_delay_ms <= 10_000:
            raise UserError(f"max_delay_ms: expected 0 to 10000, got {self.max_delay_ms!r}")


@dataclass(frozen=True)
class SearchConfig:
    """How concurrent unfiltered Searches of one index are merged into one FAISS call.

    Searches never wait for company (a FAISS call over many queries costs little more
    than over one, but a wait costs every caller); a few cheap queries (trained
    HNSW/IVF) run on the event loop itself, where a thread hand-off would cost more
    than the search."""

    max_batch: int = 256
    max_queue_rows: int = 16384
    inline_queries: int = 8

    def batch_config(self) -> BatchConfig:
        return BatchConfig(max_batch=self.max_batch, max_delay_ms=0.0, max_queue_rows=self.max_queue_rows,
                           inline_rows=self.inline_queries, instances=1)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it, INVALID_ARGUMENT naming the field."""

    max_rows: int = 4096        # rows per request (tensor, images, texts)
    max_generate: int = 4096    # Generate.count
    max_steps: int = 1024       # Interpolate.steps
    max_text_chars: int = 1_000_000
    max_k: int = 1000           # Search.k
    max_hits: int = 100_000     # Search queries x k: the answer is built in memory before it is sent
    max_answer_bytes: int = 64 << 20  # the server sets it to --max-message-mb
    max_request_pixels: int = 64_000_000  # decoded image pixels per request (the sum over its images)
    max_decode_pixels: int = 64_000_000   # image pixels being decoded at once, server-wide (service.pixels)


@dataclass
class ServeConfig:
    models: Path
    indexes: Path | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9100      # 0: no metrics endpoint
    metrics_host: str | None = None  # where /metrics listens; None: --host (so 127.0.0.1 keeps it on loopback)
    # How the models run (device, threads, TF32, CUDA data path), passed whole to every session. threads 0: the
    # cores shared out among workers and instances; ORT's idle threads never spin in a server.
    runtime: RuntimeOptions = SERVE_RUNTIME
    faiss_threads: int = 0        # FAISS's OpenMP threads (process-wide); 0: FAISS's default
    batch: BatchConfig = field(default_factory=BatchConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    limits: Limits = field(default_factory=Limits)
    max_message_mb: int = 64
    # Memory bounds: RPCs in progress at once (gRPC refuses beyond), and the bytes of requests being worked on
    # (big requests beyond it are refused at once, small ones never; see rpc.Admission).
    max_concurrent_rpcs: int | None = 1024
    max_inflight_mb: int = 1024
    poll_s: float = 5.0           # 0: reload on SIGHUP only
    grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None
    loop: str = "auto"            # auto | uvloop | asyncio
    # Which version of each model answers requests for the latest: the highest of this precision where the model
    # has one (serving.json's "precision" overrides it per model); None: the highest version.
    precision: str | None = None
    uds: Path | None = None       # also listen on this Unix domain socket (local clients: no TCP, shared memory)
    shared_memory: str = "local"  # who may register shared memory regions: local (loopback, Unix socket) | any | off
    # HTTP beside gRPC (KServe v2 REST, zspace's JSON endpoints, the web explorer): None = off, 0 = any free port.
    http_port: int | None = None
    http_host: str | None = None  # None: --host
    media_roots: tuple[Path, ...] = ()  # folders whose files an item's payload may name as its image (the explorer)


def parse_host_port(value: str | int, option: str) -> tuple[str | None, int]:
    """PORT, HOST:PORT or [IPv6]:PORT -> (host or None, port 0-65535); UserError naming the option."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if sep and host.startswith("[") != host.endswith("]"):
        host, port = "", text  # a bare IPv6 address without a port
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535 or (sep and not host.strip("[]")):
        raise UserError(f"{option}: expected PORT or HOST:PORT (port 0 to 65535), got {text!r}")
    return (host.strip("[]") if sep else None), number


def read_serving_json(model_dir: Path) -> dict:
    """`models/NAME/serving.json` as a dict ({} without one); unreadable or not an object: UserError naming it."""
    path = Path(model_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: expected a JSON object of serving settings")
    return settings


def model_serving(model_dir: Path, default: BatchConfig, precision: str | None) -> tuple[BatchConfig, str | None]:
    """The server's BatchConfig and precision choice with the overrides of `models/NAME/serving.json`.

    Only BatchConfig's own fields and `precision` (fp32 | fp16 | int8: which of the model's versions answers
    requests for the latest) may appear there; a wrong name or value makes the model's versions fail to load
    with a message naming the file and the field."""
    path = Path(model_dir) / MODEL_CONFIG_FILE
    overrides = read_serving_json(model_dir)
    if "precision" in overrides:
        precision = overrides.pop("precision")
        if precision not in PRECISIONS:
            raise UserError(f"{path}: precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    known = {f.name for f in dataclasses.fields(BatchConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"{path}: unknown setting {', '.join(unknown)} (known: {', '.join(sorted(known | {'precision'}))})")
    try:
        return (dataclasses.replace(default, **overrides) if overrides else default), precision
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
