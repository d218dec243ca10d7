"""The GPU data path: what each way of moving a batch to and from ONNX Runtime CUDA costs, in one process.

    python -m benchmarks.cuda_io --bundle models/mnist-ae/1          # on a GPU machine
    python -m benchmarks.cuda_io --device cpu                       # the same ways on the CPU provider

For 1, 256 and 4096 rows, on 1 and 8 threads, side by side in each round:
  plain     session.run with a numpy array: ORT copies from pageable memory and allocates every output
  pinned    zspace.cuda_io.PinnedRunner: io_binding with page-locked host buffers reused per thread
            (the copy into the buffer is counted)
  runtime   BundleRuntime.encode as zspace runs it (ZSPACE_CUDA_IO, default auto: pinned from 2048 rows)
  on-device io_binding with the output left on the GPU (CUDA-resident), then copied to the host:
            what a chain of graphs that never returns to the host would save at most
Every way's outputs are compared with plain's (they must be equal), and CUDA's with the CPU's (the
bundle's parity promise, TF32 off). The figure per layout is each way's rows/s over plain's, median round.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from benchmarks.harness import bundle_for, machine, run_in_threads, table, write_json

LAYOUTS = ((1, 1), (1, 256), (1, 4096), (8, 1), (8, 256), (8, 4096))  # (threads, rows)


def ways(runtime) -> dict:
    """name -> run(x) returning the encoder's outputs on the host."""
    from zspace.cuda_io import PinnedRunner, pinned_host, plain_host

    session = runtime.encoder
    name = session.get_inputs()[0].name
    cuda = runtime.provider.startswith("CUDA")
    pinned = PinnedRunner(session, pinned_host() if cuda else plain_host)

    def plain(x):
        return session.run(None, {name: x})

    def on_device(x):
        io = session.io_binding()
        io.bind_cpu_input(name, x)
        for out in session.get_outputs():
            io.bind_output(out.name, "cuda" if cuda else "cpu")
        session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()

    return {"plain": plain, "pinned": pinned, "on_device": on_device, "runtime": lambda x: runtime.encode(x)}


def measure(bundle: Path, device: str, seconds: float, rounds: int) -> dict:
    from zspace.bundle import load_bundle
    from zspace.runtime import RuntimeOptions, open_runtime

    runtime = open_runtime(load_bundle(bundle), RuntimeOptions.from_env(device=device))
    cpu = open_runtime(load_bundle(bundle))
    fns = ways(runtime)
    rng = np.random.default_rng(0)
    big = rng.random((4096, runtime.bundle.input_dim), dtype=np.float32)
    reference = fns["plain"](big)[0]
    agree = {k: float(np.abs(f(big)[0] - reference).max()) for k, f in fns.items()}
    vs_cpu = float(np.abs(reference - cpu.encode(big)[0]).max())
    print(f"provider {runtime.provider}; max |way - plain| {agree}; max |{device} - cpu| {vs_cpu:.2e}", flush=True)
    rows_out = []
    for threads, rows in LAYOUTS:
        x = np.ascontiguousarray(big[:rows])
        got: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                for _ in range(3):
                    f(x)  # warm: per-thread buffers, CUDA kernels for this shape
                n, elapsed = run_in_threads(lambda f=f, x=x: f(x), threads, seconds)
                got[k].append(n * rows / elapsed)
        ratios = {k: float(np.median(np.array(v) / np.array(got["plain"]))) for k, v in got.items()}
        row = {"threads": threads, "rows": rows, "plain_rows_s": float(np.median(got["plain"])),
               "pinned_rows_s": float(np.median(got["pinned"])), "on_device_rows_s": float(np.median(got["on_device"])),
               "runtime_rows_s": float(np.median(got["runtime"])),
               "pinned_vs_plain": ratios["pinned"], "on_device_vs_plain": ratios["on_device"],
               "runtime_vs_plain": ratios["runtime"]}
        print(f"  {threads} x {rows:<5} plain {row['plain_rows_s']:12.0f} rows/s  pinned x{row['pinned_vs_plain']:.3f}"
              f"  on-device x{row['on_device_vs_plain']:.3f}  runtime x{row['runtime_vs_plain']:.3f}", flush=True)
        rows_out.append(row)
    return {"benchmark": "cuda_io", "device": device, "provider": runtime.provider, "runtime_io": runtime.io,
            "machine": machine(), "seconds": seconds, "rounds": rounds, "max_abs_vs_plain": agree,
            "max_abs_vs_cpu": vs_cpu, "rows": rows_out}


@click.command()
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="An exported mnist-ae bundle folder (default: train 1 epoch and export).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda", help="Provider to measure.")
@click.option("--seconds", default=1.0, help="Load per way, layout and round.")
@click.option("--rounds", default=3, help="Rounds; each way's ratio to plain is the median round's.")
@click.option("--json", "json_path", default="benchmarks/results/cuda_io.json", help="Where the figures go.")
def main(bundle_path, device, seconds, rounds, json_path):
    bundle = Path(bundle_path) if bundle_path else bundle_for(None, Path(tempfile.mkdtemp(prefix="zspace-cuda-io-")))
    record = measure(bundle, device, seconds, rounds)
    cols = ["threads", "rows", "plain_rows_s", "pinned_rows_s", "on_device_rows_s", "pinned_vs_plain", "on_device_vs_plain",
            "runtime_vs_plain"]
    print(table(record["rows"], cols, f"Encode in one process on {record['provider']}: ways of moving data, side by side"))
    write_json(Path(json_path), record)


if __name__ == "__main__":
    main()
