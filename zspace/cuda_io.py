"""Graph runs on CUDA through page-locked host buffers (ONNX Runtime io_binding).

`session.run(None, {name: array})` hands ONNX Runtime a pageable numpy array:
the CUDA driver then stages every host-to-device copy through its own small
pinned buffer, and ORT allocates a fresh host array for every output. A
`PinnedRunner` keeps, per thread, one input and one output buffer per graph
that the CUDA runtime has page-locked (cudaHostRegister), so both copies go
straight over DMA, and binds them with io_binding so ORT allocates nothing per
run. What that saves, and where it does not pay, is measured by
`python -m benchmarks.cuda_io` (benchmarks/README.md has the figures).

The CUDA runtime library is the one ONNX Runtime's CUDA provider already
loaded (dlopen by soname finds it); where it cannot be found or pinning fails,
`pinned_host()` says why and the caller keeps `session.run`.

Pinned buffers pay only for big batches run concurrently (session.run's
pageable copies serialise); for small batches, and for one thread at a time,
the extra host copy and the binding calls cost more than they save
(benchmarks/README.md, "On an H200", has the figures). So the default, `auto`,
takes the pinned path for runs of at least PINNED_MIN_ROWS rows and
session.run below.
ZSPACE_CUDA_IO=pinned|plain forces one path for every run (read once, at the edge:
zspace.runtime.RuntimeOptions.from_env).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Callable

import numpy as np

HostAlloc = Callable[[tuple[int, int]], np.ndarray]
CUDA_RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
MIN_ROWS = 256  # the smallest buffer: growing costs a cudaHostRegister (≈ms), so start at a typical batch
PINNED_MIN_ROWS = 2048  # auto: runs from this many rows go through pinned buffers (see the figures above)
MODES = ("auto", "pinned", "plain")


def pinned_min_rows(mode: str) -> int:
    """The smallest run that takes the pinned path under `mode`."""
    return {"auto": PINNED_MIN_ROWS, "pinned": 0}[mode]


def pinned_host() -> HostAlloc:
    """An allocator of float32 host arrays page-locked by the CUDA runtime; OSError says why not."""
    for name in CUDA_RUNTIMES:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise OSError(f"no CUDA runtime library could be loaded (tried {', '.join(CUDA_RUNTIMES)})")
    lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cudaHostRegister.restype = ctypes.c_int
    lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    lib.cudaHostUnregister.restype = ctypes.c_int

    def alloc(shape: tuple[int, int]) -> np.ndarray:
        array = np.empty(shape, np.float32)
        rc = lib.cudaHostRegister(array.ctypes.data, array.nbytes, 0)
        if rc != 0:
            raise OSError(f"cudaHostRegister of {array.nbytes} bytes failed with CUDA error {rc}")
        # Unpin before numpy frees the memory: a freed page that stays registered would be pinned forever.
        weakref.finalize(array, lib.cudaHostUnregister, array.ctypes.data)
        return array

    alloc((1, 1))  # fails here, once, rather than in the first request
    return alloc


def plain_host(shape: tuple[int, int]) -> np.ndarray:
    """Ordinary host arrays: the same io_binding path on the CPU provider (what the tests here exercise)."""
    return np.empty(shape, np.float32)


class _Buffers:
    def __init__(self, session, rows: int, width: int, out_widths: list[int], alloc: HostAlloc):
        self.rows, self.binding = rows, session.io_binding()
        self.x = alloc((rows, width))
        self.outs = [alloc((rows, k)) for k in out_widths]


class PinnedRunner:
    """Runs one graph [batch, D] -> outputs [batch, K_i] through io_binding and reused host buffers.

    One set of buffers per thread: a batcher runs up to `instances` batches at
    once. Outputs are copied out of the buffers before returning, since the
    next run on the thread overwrites them.
    """

    def __init__(self, session, alloc: HostAlloc):
        self.session, self.alloc = session, alloc
        (inp,) = session.get_inputs()
        self.input, self.width = inp.name, inp.shape[1]
        self.outputs = [(o.name, o.shape[1]) for o in session.get_outputs()]
        widths = [self.width] + [k for _, k in self.outputs]
        if not all(isinstance(k, int) and k > 0 for k in widths):
            raise ValueError(f"io_binding needs fixed feature widths, the graph has {widths}")
        types = {inp.type, *(o.type for o in session.get_outputs())}
        if types != {"tensor(float)"}:  # e.g. a hash model's packed bits (uint8)
            raise ValueError(f"the pinned path moves float32 tensors only, the graph has {sorted(types)}")
        self.local = threading.local()

    def _buffers(self, rows: int) -> _Buffers:
        b = getattr(self.local, "buffers", None)
        if b is None or b.rows < rows:
            size = max(rows, MIN_ROWS, 2 * b.rows if b is not None else 0)
            b = self.local.buffers = _Buffers(self.session, size, self.width, [k for _, k in self.outputs], self.alloc)
        return b

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        n = len(x)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"expected rows of {self.width} features, got shape {x.shape}")
        b = self._buffers(n)
        np.copyto(b.x[:n], x, casting="same_kind")
        io = b.binding
        io.bind_input(self.input, "cpu", 0, np.float32, [n, self.width], b.x.ctypes.data)
        for (name, k), out in zip(self.outputs, b.outs):
            io.bind_output(name, "cpu", 0, np.float32, [n, k], out.ctypes.data)
        self.session.run_with_iobinding(io)
        return [out[:n].copy() for out in b.outs]
