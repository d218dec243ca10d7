"""The explorer and HTTP figures of issue 26, on this machine:

1. the map in headless Chromium (Debian's, driven by playwright): first draw of a 100k-point map
   (from navigation to the first frame, the points and a colouring fetched), and frame times of
   redraws (pan and zoom) at 100k and 1M points, with the hover lookup's time;
2. the decode round trip over HTTP (one keep-alive connection, as a browser holds one): a slider
   move (Decode of one code to a PNG) and an interpolation (10 steps to PNGs), p50 and p99; and the
   slider's as the page has it (fetch, JSON, the PNG decoded into an image, in Chromium);
3. HTTP vs gRPC inference, side by side: tritonclient.http (binary data) against tritonclient.grpc
   on the same server's KServe v2 endpoints, 1 client x 1 row and 8 clients x 256 rows, each client
   in a process of its own; the median round's ratio of rows per second is the figure.

    python -m benchmarks.explorer --bundle models/mnist-ae/1

The map's items are synthetic codes (clusters in the bundle's latent space, a `label` each): a map's
drawing cost depends on the point count, not on what the points are.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from benchmarks.harness import ServerChild, bundle_for, free_port, machine, median_round, serve_command, side_by_side, write_json

# ------------------------------------------------------------------ the map

def synthetic_index(bundle: Path, out: Path, n: int, seed: int = 0) -> Path:
    """An index of `n` clustered codes of the bundle's model, each with a label, and its PCA map."""
    from zspace.bundle import load_bundle, resolve_bundle
    from zspace.index.importing import import_codes
    from zspace.index.latent_index import LatentIndex
    from zspace.index.maps import map_index

    dim = load_bundle(resolve_bundle(bundle)).latent_dim
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim)).astype(np.float32) * 3
    label = rng.integers(0, 10, n)
    codes = (centres[label] + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)
    work = out.parent / f".{out.name}.files"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "codes.npy", codes)
    (work / "keys.txt").write_text("\n".join(f"item/{i}" for i in range(n)) + "\n")
    (work / "payloads.jsonl").write_text("\n".join(json.dumps({"label": int(v)}) for v in label) + "\n")
    import_codes(bundle, work / "codes.npy", work / "keys.txt", work / "payloads.jsonl", out, quiet=True).close()
    index = LatentIndex.open(out)
    map_index(index, "pca", quiet=True)
    index.release()
    shutil.rmtree(work)
    return out


def browser_map(base: str, index: str, loads: int, redraws: int) -> dict:
    """First draw over `loads` page loads (median), then frame times of `redraws` pans and zooms."""
    from playwright.sync_api import sync_playwright

    url = f"{base}/ui/#/map?index={index}&colour=label"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        first = []
        for _ in range(loads):
            page.goto("about:blank")
            page.goto(url)
            page.wait_for_function("window.zspaceStats && window.zspaceStats.firstDrawAt !== null", timeout=120_000)
            first.append(page.evaluate("window.zspaceStats.firstDrawAt"))  # ms since navigation began
            page.wait_for_function("document.querySelector('#view').dataset.ready === '1'", timeout=120_000)
        coloured_at = page.evaluate("performance.now()")
        frames = page.evaluate("""(n) => { const v = window.zspaceMap, out = [];
            for (let i = 0; i < n; i++) { if (i % 2) v.scale *= 1.15; else v.cx += 10 / v.scale;
              const t = performance.now(); v.draw(); out.push(performance.now() - t); } return out; }""", redraws)
        hover = page.evaluate("""(n) => { const v = window.zspaceMap, c = v.canvas, out = [];
            for (let i = 0; i < n; i++) { const t = performance.now();
              v.nearest(Math.random() * c.clientWidth, Math.random() * c.clientHeight); out.push(performance.now() - t); }
            return out; }""", 200)
        points = page.evaluate("window.zspaceStats.points")
        browser.close()
    fr = np.asarray(frames)
    return {"points": points, "first_draw_ms": statistics.median(first), "first_draw_all_ms": first,
            "page_ready_ms": coloured_at, "frame_p50_ms": float(np.percentile(fr, 50)),
            "frame_p95_ms": float(np.percentile(fr, 95)), "frame_max_ms": float(fr.max()),
            "fps_p50": 1000 / float(np.percentile(fr, 50)), "hover_p99_ms": float(np.percentile(hover, 99))}


# ------------------------------------------------------------------ the decode round trip

def round_trips(http_port: int, model: str, latent_dim: int, calls: int) -> dict:
    """Slider moves (Decode of one code to a PNG) and interpolations (10 steps) over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    rng = np.random.default_rng(0)

    def timed(path: str, body: dict) -> float:
        t = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
        return (time.perf_counter() - t) * 1000

    z = np.zeros(latent_dim)
    for _ in range(20):  # warm the connection and the graphs
        timed(f"/v1/models/{model}/decode", {"latents": [z.tolist()], "return_png": True, "tensors": False})
    slider, path = [], []
    for i in range(calls):
        z[i % latent_dim] = float(np.clip(z[i % latent_dim] + rng.normal() * 0.3, -3, 3))  # one slider moves
        slider.append(timed(f"/v1/models/{model}/decode", {"latents": [z.tolist()], "return_png": True, "tensors": False}))
    for _ in range(calls // 2):
        ends = rng.normal(size=(2, latent_dim)).tolist()
        path.append(timed(f"/v1/models/{model}/interpolate", {"latents": ends, "steps": 10, "return_png": True,
                                                              "tensors": False}))
    conn.close()
    pct = lambda xs, q: float(np.percentile(xs, q))
    return {"calls": calls, "slider_p50_ms": pct(slider, 50), "slider_p99_ms": pct(slider, 99),
            "interpolate_calls": len(path), "interpolate_p50_ms": pct(path, 50), "interpolate_p99_ms": pct(path, 99)}


def browser_round_trips(base: str, model: str, latent_dim: int, calls: int) -> dict:
    """The slider's round trip as the page has it: fetch of Decode, the JSON parsed, the PNG decoded into an image."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{base}/ui/#/generate?model={model}")
        page.wait_for_function("document.querySelector('#view').dataset.ready === '1'", timeout=60_000)
        times = page.evaluate("""async ([model, k, n]) => { const z = new Array(k).fill(0), out = [];
            for (let i = 0; i < n + 20; i++) {
              z[i % k] = Math.max(-3, Math.min(3, z[i % k] + (Math.random() - 0.5) * 0.6));
              const t = performance.now();
              const r = await fetch(`/v1/models/${model}/decode`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
                body: JSON.stringify({ latents: [z], return_png: true, tensors: false }) });
              const a = await r.json(); const img = new Image(); img.src = 'data:image/png;base64,' + a.png[0];
              await img.decode(); if (i >= 20) out.push(performance.now() - t); }
            return out; }""", [model, latent_dim, calls])
        browser.close()
    return {"browser_calls": len(times), "browser_slider_p50_ms": float(np.percentile(times, 50)),
            "browser_slider_p99_ms": float(np.percentile(times, 99))}


# ------------------------------------------------------------------ HTTP vs gRPC inference

def _client_loop(protocol: str, url: str, model: str, width: int, rows: int, seconds: float, out) -> None:
    """One client process: KServe infer again and again for `seconds`; (calls, latencies in ms) to `out`."""
    x = np.random.default_rng(0).random((rows, width), dtype=np.float32)
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    client = tc.InferenceServerClient(url)
    inp = tc.InferInput("x", [rows, width], "FP32")
    if protocol == "http":
        inp.set_data_from_numpy(x, binary_data=True)
        outputs = [tc.InferRequestedOutput("mean", binary_data=True)]
    else:
        inp.set_data_from_numpy(x)
        outputs = [tc.InferRequestedOutput("mean")]
    for _ in range(5):
        client.infer(model, [inp], outputs=outputs)
    latencies, stop_at = [], time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        t = time.perf_counter()
        client.infer(model, [inp], outputs=outputs)
        latencies.append((time.perf_counter() - t) * 1000)
    out.put(latencies)


def infer_load(protocol: str, url: str, model: str, width: int, clients: int, rows: int, seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_client_loop, args=(protocol, url, model, width, rows, seconds, queue)) for _ in range(clients)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    lat = np.concatenate([np.asarray(r) for r in results])
    calls = len(lat)
    return {"protocol": protocol, "clients": clients, "rows": rows, "requests": calls,
            "rows_s": calls * rows / seconds, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "value": calls * rows / seconds}


# ------------------------------------------------------------------ main

@click.command()
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="A model bundle (default: train one epoch of the MNIST AE).")
@click.option("--points", default=100_000, help="Points of the map whose first draw is timed.")
@click.option("--big", default=1_000_000, help="Points of the map whose frame times are reported (0: skip).")
@click.option("--loads", default=3, help="Page loads per map; the median first draw is the figure.")
@click.option("--calls", default=500, help="Slider decodes timed (interpolations: half as many).")
@click.option("--seconds", default=5.0, help="Load duration per side of an HTTP/gRPC round.")
@click.option("--rounds", default=3, help="Side-by-side rounds; the median round's ratio is the figure.")
@click.option("--json", "json_path", default="benchmarks/results/explorer.json", help="Where the figures go.")
def main(bundle_path, points, big, loads, calls, seconds, rounds, json_path) -> None:
    from zspace.bundle import load_bundle

    work = Path(tempfile.mkdtemp(prefix="zspace-explorer-"))
    try:
        bundle = Path(bundle_path) if bundle_path else bundle_for(None, work)
        b = load_bundle(bundle)
        models = work / "models"
        if bundle_path:
            shutil.copytree(bundle, models / b.name / str(b.version))
        indexes = work / "indexes"
        sizes = [points] + ([big] if big else [])
        for n in sizes:
            t = time.monotonic()
            synthetic_index(models / b.name, indexes / f"map{n}", n)
            print(f"index and PCA map of {n:,} codes made in {time.monotonic() - t:.1f}s", flush=True)
        port, http_port = free_port(), free_port()
        child = ServerChild(serve_command(models, port, "--indexes", str(indexes), "--metrics-port", "0", "--poll-s", "0",
                                          "--http-port", str(http_port), "--max-queue", "65536"), port).wait_serving(300)
        record = {"machine": machine(), "bundle": f"{b.name}/{b.version}", "latent_dim": b.latent_dim,
                  "input_dim": b.input_dim}
        try:
            base = f"http://127.0.0.1:{http_port}"
            record["maps"] = []
            for n in sizes:
                got = browser_map(base, f"map{n}", loads, 60)
                record["maps"].append(got)
                print(f"map {n:,} points: first draw {got['first_draw_ms']:.0f} ms (loads {', '.join(f'{v:.0f}' for v in got['first_draw_all_ms'])}), "
                      f"frames p50 {got['frame_p50_ms']:.1f} ms / p95 {got['frame_p95_ms']:.1f} ms, hover p99 "
                      f"{got['hover_p99_ms']:.2f} ms", flush=True)
            record["round_trips"] = {**round_trips(http_port, b.name, b.latent_dim, calls),
                                     **browser_round_trips(base, b.name, b.latent_dim, calls)}
            rt = record["round_trips"]
            print(f"slider decode p50 {rt['slider_p50_ms']:.1f} ms, p99 {rt['slider_p99_ms']:.1f} ms (in the browser, the "
                  f"PNG shown: p50 {rt['browser_slider_p50_ms']:.1f} ms, p99 {rt['browser_slider_p99_ms']:.1f} ms); "
                  f"interpolation (10 steps) p50 {rt['interpolate_p50_ms']:.1f} ms, p99 {rt['interpolate_p99_ms']:.1f} ms",
                  flush=True)
            record["http_vs_grpc"] = []
            for clients, rows in ((1, 1), (8, 256)):
                got = side_by_side(f"{clients} x {rows}, HTTP / gRPC",
                                   lambda c=clients, r=rows: infer_load("http", f"127.0.0.1:{http_port}", f"{b.name}.encoder",
                                                                        b.input_dim, c, r, seconds),
                                   lambda c=clients, r=rows: infer_load("grpc", f"127.0.0.1:{port}", f"{b.name}.encoder",
                                                                        b.input_dim, c, r, seconds), rounds)
                median = median_round(got["rounds"], "ratio")
                row = {"clients": clients, "rows": rows, "http_rows_s": median["first"]["rows_s"],
                       "grpc_rows_s": median["second"]["rows_s"], "http_p50_ms": median["first"]["p50_ms"],
                       "grpc_p50_ms": median["second"]["p50_ms"], "http_p99_ms": median["first"]["p99_ms"],
                       "grpc_p99_ms": median["second"]["p99_ms"], "ratio": got["ratio"],
                       "ratios": [r["ratio"] for r in got["rounds"]]}
                record["http_vs_grpc"].append(row)
                print(f"{clients} x {rows}: HTTP {row['http_rows_s']:.0f} rows/s (p99 {row['http_p99_ms']:.2f} ms), gRPC "
                      f"{row['grpc_rows_s']:.0f} rows/s (p99 {row['grpc_p99_ms']:.2f} ms): HTTP / gRPC {row['ratio']:.3f}",
                      flush=True)
        finally:
            child.stop()
        write_json(Path(json_path), record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
