"""Screenshots of every explorer view for docs/explorer/ (the README shows them), taken in headless Chromium
from a real server: an MNIST model exported from a training run, its index of the test split, a UMAP map.

    .venv/bin/zspace train --data mnist:../shared/datasets/mnist --model vae --latent-dim 10 --arch mlp \\
        --hidden 512,256 --epochs 12 --out runs/mnist-vae
    .venv/bin/python scripts/explorer_screenshots.py --run runs/mnist-vae --out docs/explorer
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # testbed/, run from a checkout

from testbed.servers import ServerChild, free_port, serve_command  # noqa: E402

POINT = """() => { const v = window.zspaceMap, r = v.canvas.getBoundingClientRect();
    let i = 0; while (v.xy[2 * i] !== v.xy[2 * i]) i++;
    const [px, py] = v.toScreen(v.xy[2 * i], v.xy[2 * i + 1]), d = devicePixelRatio || 1;
    return [r.left + px / d, r.top + py / d]; }"""  # where the map's first item is on the page
VIEWS = {  # file -> (hash, what to do before the picture)
    "models": ("models?model=mnist", None),
    "map": ("map?index=mnist&colour=label", "hover"),
    "query": ("query?index=mnist", "drop"),
    "interpolate": ("interpolate?index=mnist&a=mnist/test/3&b=mnist/test/2&steps=10", None),
    "generate": ("generate?model=mnist", "traverse"),
}


def zspace(*args: str, cwd: Path) -> None:
    subprocess.run([str(Path(sys.executable).parent / "zspace"), *args], cwd=cwd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="an MNIST training run folder")
    parser.add_argument("--out", default=ROOT / "docs" / "explorer", type=Path)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "mnist"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zspace-shots-"))
    try:
        zspace("export", str(args.run.resolve()), "--repo", "models", "--name", "mnist", cwd=work)
        zspace("index", "build", "--model", "models/mnist", "--data", f"mnist:{args.data}", "--split", "test",
               "--out", "indexes/mnist", cwd=work)
        zspace("index", "map", "indexes/mnist", "--method", "umap", "--sample", "10000", cwd=work)
        port, http_port = free_port(), free_port()
        child = ServerChild(serve_command(work / "models", port, "--indexes", str(work / "indexes"), "--metrics-port", "0",
                                          "--http-port", str(http_port)), port).wait_serving(120)
        try:
            shoot(f"http://127.0.0.1:{http_port}", args.out, args.data)
        finally:
            child.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def shoot(base: str, out: Path, data: str) -> None:
    import base64
    import io

    import numpy as np
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from zspace.data import load_dataset

    digit = load_dataset(f"mnist:{data}").x_test[7].reshape(28, 28)
    buf = io.BytesIO()
    Image.fromarray(np.round(digit * 255).astype(np.uint8)).save(buf, "PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        for name, (hash_, action) in VIEWS.items():
            page.goto(f"{base}/ui/#/{hash_}")
            page.wait_for_function("document.querySelector('#view').dataset.ready === '1'", timeout=60_000)
            if action == "hover":
                x, y = page.evaluate(POINT)
                page.mouse.click(x, y)
                page.wait_for_function("document.querySelectorAll('#neighbours figure').length > 0", timeout=30_000)
                page.mouse.move(x + 60, y + 40)  # away and back, a frame apart: the tooltip shows the clicked item
                time.sleep(0.3)
                x, y = page.evaluate(POINT)  # the side panel grew: the canvas may have been resized and redrawn
                page.mouse.move(x, y)
                page.wait_for_selector("#tip img", state="visible", timeout=10_000)
            elif action == "drop":
                page.evaluate("""(b64) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    const dt = new DataTransfer(); dt.items.add(new File([bytes], 'seven.png', { type: 'image/png' }));
                    document.querySelector('#drop').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true,
                    cancelable: true })); }""", png)
                page.wait_for_function("document.querySelectorAll('#query-neighbours figure').length > 0", timeout=30_000)
            elif action == "traverse":
                page.click("#traverse-go")
                page.wait_for_function("document.querySelectorAll('#traversal img').length > 0", timeout=30_000)
            time.sleep(0.3)
            page.screenshot(path=str(out / f"{name}.png"), full_page=action == "traverse")
            print(f"wrote {out / name}.png", flush=True)
        browser.close()


if __name__ == "__main__":
    main()
