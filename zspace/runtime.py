"""ONNX Runtime sessions with an honest execution provider.

onnxruntime-gpu asked for CUDA on a machine without a GPU logs a loud error and
silently runs on the CPU. So we ask for CUDA only when a GPU is visible, and we
always report the provider a session actually uses (`session.get_providers()`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zspace.bundle import Bundle, BundleError
from zspace.cuda_io import MODES as CUDA_IO_MODES
from zspace.cuda_io import PinnedRunner, pinned_host, pinned_min_rows
from zspace.errors import UserError
from zspace.transforms import Transform, transform_from_dict

log = logging.getLogger("zspace.runtime")


def gpu_visible() -> bool:
    """A cheap check for an NVIDIA GPU: the driver's device nodes or nvidia-smi."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or (shutil.which("nvidia-smi") is not None and Path("/proc/driver/nvidia").exists())


def cuda_provider(tf32: bool = False) -> tuple[str, dict]:
    """The CUDA provider with its options. TF32 off unless asked for: ONNX Runtime's CUDA provider
    otherwise computes float32 MatMul/Gemm in TF32 on Ampere and later GPUs, and codes then differ
    from the CPU's by ~1e-3, beyond the bundle's parity promise (1e-4)."""
    return "CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}


def providers_for(device: str, cuda_tf32: bool = False) -> list:
    """ONNX Runtime providers for `device` (auto | cpu | cuda): CUDA only where a GPU and the GPU build are there."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda_ok = "CUDAExecutionProvider" in available and gpu_visible()
    if device == "cuda":
        if not cuda_ok:
            raise UserError("--device cuda: ONNX Runtime cannot use a CUDA GPU here "
                            f"(providers {available}, GPU visible: {gpu_visible()})")
        return [cuda_provider(cuda_tf32), "CPUExecutionProvider"]
    if device == "auto" and cuda_ok:
        return [cuda_provider(cuda_tf32), "CPUExecutionProvider"]
    if device not in ("auto", "cpu"):
        raise UserError(f"--device: expected auto, cpu or cuda, got {device!r}")
    return ["CPUExecutionProvider"]


def provider_label(session, cuda_tf32: bool = False) -> str:
    """The provider a session actually uses, as reported (start log, ListModels): "(TF32)" when opted in."""
    name = session.get_providers()[0]
    return f"{name} (TF32)" if cuda_tf32 and name == "CUDAExecutionProvider" else name


@dataclass(frozen=True)
class RuntimeOptions:
    """How a bundle's graphs run, in one value passed whole: from the server's config (ServeConfig.runtime) or a
    command's options to every session. The environment (ZSPACE_CUDA_IO) is read once, at the edge (`from_env`).

    spin=False stops ONNX Runtime's idle threads from busy-waiting between runs: a server needs those
    cycles for its own request handling on small machines."""

    device: str = "cpu"       # auto | cpu | cuda (auto: CUDA only where onnxruntime-gpu can use a GPU)
    threads: int = 0          # intra-op threads per run; 0: ONNX Runtime's default
    spin: bool = True
    cuda_tf32: bool = False   # TF32 matmuls on CUDA: faster, inexact (~1e-3); off keeps the bundle's parity
    cuda_io: str = "auto"     # CUDA runs: auto (pinned buffers for big runs), pinned or plain (zspace.cuda_io)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device: expected auto, cpu or cuda, got {self.device!r}")
        if self.cuda_io not in CUDA_IO_MODES:
            raise UserError(f"ZSPACE_CUDA_IO: expected one of {', '.join(CUDA_IO_MODES)}, got {self.cuda_io!r}")

    @classmethod
    def from_env(cls, **given) -> RuntimeOptions:
        """Options with ZSPACE_CUDA_IO taken from the environment (the one place it is read)."""
        return cls(**{"cuda_io": os.environ.get("ZSPACE_CUDA_IO", "auto"), **given})


def onnx_session(path: str | os.PathLike, options: RuntimeOptions = RuntimeOptions()):
    """An InferenceSession on the best provider `options.device` allows."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not options.spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if options.threads:
        opts.intra_op_num_threads = options.threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(options.device, options.cuda_tf32))


@dataclass
class BundleRuntime:
    """A bundle ready to run: its two ONNX Runtime sessions and its feature transform.

    Every user of a bundle (the service, the index builder, evaluation, the CLI,
    the benchmarks) opens it through `open_runtime`, so they all run the same
    graphs with the same inputs and report the same provider.
    """

    bundle: Bundle
    encoder: object  # onnxruntime.InferenceSession
    decoder: object
    transform: Transform
    provider: str    # the execution provider the sessions actually use
    io: str = "plain"  # how runs move data: plain (session.run), or auto / pinned (zspace.cuda_io, CUDA only)
    runners: dict = field(default_factory=dict)  # graph -> PinnedRunner, when io is not plain
    pinned_from: int = 0  # runs of at least this many rows take the runners

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        """Features [batch, input_dim] -> [mean] or [mean, logvar] (VAE kinds)."""
        if self.runners and len(x) >= self.pinned_from:
            return self.runners["encoder"](x)
        return self.encoder.run(None, {self.bundle.graphs["encoder"].input: x})

    def decode(self, z: np.ndarray) -> list[np.ndarray]:
        """Codes [batch, latent_dim] -> [x_hat] in data space."""
        if self.runners and len(z) >= self.pinned_from:
            return self.runners["decoder"](z)
        return self.decoder.run(None, {self.bundle.graphs["decoder"].input: z})

    def codes(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """The codes of many rows (posterior means for VAE kinds), in batches."""
        if not len(x):
            return np.zeros((0, self.bundle.latent_dim), np.float32)
        return np.concatenate([self.encode(np.ascontiguousarray(x[i : i + batch_size]))[0]
                               for i in range(0, len(x), batch_size)])


def open_runtime(bundle: Bundle, options: RuntimeOptions = RuntimeOptions()) -> BundleRuntime:
    """Open a loaded bundle's graphs as `options` say (device, threads, ...) with its transform."""
    encoder = onnx_session(bundle.graph("encoder"), options)
    decoder = onnx_session(bundle.graph("decoder"), options)
    runtime = BundleRuntime(bundle=bundle, encoder=encoder, decoder=decoder, transform=transform_from_dict(bundle.transform),
                            provider=provider_label(encoder, options.cuda_tf32))
    mode = options.cuda_io
    if encoder.get_providers()[0] == "CUDAExecutionProvider" and mode != "plain":
        try:
            alloc = pinned_host()
            runners = {"encoder": PinnedRunner(encoder, alloc), "decoder": PinnedRunner(decoder, alloc)}
            runtime.runners, runtime.io, runtime.pinned_from = runners, mode, pinned_min_rows(mode)
        except (OSError, ValueError) as e:  # the plain path still works: say why it is taken
            log.warning("CUDA runs stay on session.run (pinned host buffers unavailable: %s)", e)
    return runtime


PARITY_TOLERANCE = 1e-4  # max |ONNX Runtime - torch| a bundle promises (training/export.py checks it on export)


def provider_parity(runtime: BundleRuntime, rows: int = 64) -> float:
    """max |this provider - CPU| over both graphs on fixed inputs: 0 on the CPU itself.

    The bundle's parity was checked against torch on the CPU at export; a GPU provider
    must keep that promise where the bundle is served, so the server measures it at load.
    A hash model's packed bits must agree bit for bit, except where the CPU's probability
    lies within the tolerance of 1/2 (either side of the threshold is right there)."""
    if runtime.provider == "CPUExecutionProvider":
        return 0.0
    cpu = open_runtime(runtime.bundle)
    x = np.random.default_rng(0).random((rows, runtime.bundle.input_dim), dtype=np.float32)
    z = cpu.encode(x)[0]
    return max(outputs_apart(runtime.encode(x), cpu.encode(x)), outputs_apart(runtime.decode(z), cpu.decode(z)))


def variant_parity(runtime: BundleRuntime) -> dict[str, float]:
    """max |this graph - the fp32 graph| per graph on the bundle's parity rows: a variant (int8, fp16) against
    the promise of its manifest (`precision.tolerance`), on whatever provider runs it.

    The rows are test inputs and the fp32 encoder's codes of them, with the fp32 graphs' answers, stored at
    export (`parity.npz`). Packed bits (uint8) are left out: they follow from the probabilities compared here,
    and the manifest reports how many agree."""
    with np.load(runtime.bundle.path / runtime.bundle.parity_file) as rows:
        want = {k: rows[k] for k in rows.files}
    apart = {}
    for graph, run, given in (("encoder", runtime.encode, want["x"]), ("decoder", runtime.decode, want["z"])):
        got = run(np.ascontiguousarray(given))
        outputs = runtime.bundle.graphs[graph].outputs
        apart[graph] = max(float(np.abs(g - want[f"{graph}.{name}"]).max())
                           for g, name in zip(got, outputs) if g.dtype != np.uint8)
    return apart


def check_variant(runtime: BundleRuntime) -> float:
    """A variant's parity rows within its stated tolerance on this provider, or BundleError naming the graph;
    returns the largest distance found (what the load log reports)."""
    apart = variant_parity(runtime)
    bundle = runtime.bundle
    for graph, distance in apart.items():
        if not distance <= bundle.tolerance[graph]:  # NaN fails too
            raise BundleError(f"{bundle.label}: the {bundle.precision} {graph} on {runtime.provider} differs from the fp32 "
                              f"graph by {distance:.2e} on the parity rows; the manifest promises at most "
                              f"{bundle.tolerance[graph]:.2e}")
    return max(apart.values())


def outputs_apart(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """max |got - want| over float outputs; inf if packed bits (uint8) differ where want's first output,
    the bits' probabilities, is not within PARITY_TOLERANCE of 1/2."""
    worst = 0.0
    for g, w in zip(got, want):
        if w.dtype == np.uint8:
            flipped = np.unpackbits(g, axis=1) != np.unpackbits(w, axis=1)
            if (flipped & (np.abs(want[0] - 0.5) > PARITY_TOLERANCE)).any():
                return float("inf")
            continue
        worst = max(worst, float(np.abs(g - w).max()))
    return worst
