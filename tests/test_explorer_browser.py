"""The web explorer in a real headless Chromium (Debian's, driven by playwright) against a real server:
the token is asked for, the map draws, hover and click answer, a dropped image returns neighbours,
interpolation decodes, the sliders decode, the URL holds the state, refusals are shown."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image
from serving import start_thread

TOKEN = "explorer-t0ken"


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium here: bash scripts/install-browser.sh installs Debian's (CI does)")
    return path


@pytest.fixture(scope="module")
def site(deployment, cli):
    assert cli("index", "map", deployment / "indexes" / "digits")[0] == 0
    with start_thread(deployment / "models", indexes=deployment / "indexes", http_port=0, token=TOKEN) as s:
        yield f"http://127.0.0.1:{s.server.http_port}"


@pytest.fixture(scope="module")
def page(site):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors
        yield page
        browser.close()


def open_view(page, site: str, hash_: str) -> None:
    page.goto(f"{site}/ui/#/{hash_}")
    page.wait_for_function("document.querySelector('#view').dataset.ready === '1'", timeout=30_000)


def test_the_token_is_asked_for_then_models_show(page, site):
    open_view(page, site, "models")
    assert "needs a bearer token" in page.inner_text("#banner")
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    page.wait_for_function("document.querySelector('#view').dataset.ready === '1' && "
                           "document.querySelectorAll('#samples img').length === 24", timeout=30_000)
    assert page.is_hidden("#banner")
    assert "digits/1" in page.inner_text("#view") and "vae" in page.inner_text("#view")
    assert page.locator("#reconstructions img").count() >= 6
    assert not page.errors


def test_map_draws_and_hover_and_click_answer(page, site):
    open_view(page, site, "map?colour=label")
    stats = page.evaluate("window.zspaceStats")
    assert stats["draws"] >= 1 and stats["points"] == 1438
    coloured = page.evaluate("""() => { const c = document.querySelector('#map-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] !== 255 || d[i + 1] !== 255 || d[i + 2] !== 255) n++; return n; }""")
    assert coloured > 1000
    assert page.locator("#legend span").count() == 10
    # Hover row 0's point: its view (a decoded digit) shows in the tooltip.
    x, y = page.evaluate("""() => { const v = window.zspaceMap, r = v.canvas.getBoundingClientRect();
        const [px, py] = v.toScreen(v.xy[0], v.xy[1]); const d = devicePixelRatio || 1;
        return [r.left + px / d, r.top + py / d]; }""")
    page.mouse.move(x, y)
    page.wait_for_selector("#tip img", state="visible", timeout=10_000)
    page.mouse.click(x, y)
    page.wait_for_function("document.querySelectorAll('#neighbours figure').length === 12", timeout=15_000)
    assert "sel=" in page.url and "colour=label" in page.url
    # Filter: matching points only; the count says so and the URL keeps it.
    page.fill("#map-filter", "label == 3")
    page.press("#map-filter", "Enter")
    page.wait_for_function("document.querySelector('#map-status').textContent.includes('match')", timeout=10_000)
    assert page.inner_text("#map-status").startswith("1") and "where=label" in page.url
    # The keyboard pans and zooms.
    draws = page.evaluate("window.zspaceStats.draws")
    page.focus("#map-canvas")
    page.keyboard.press("+")
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("window.zspaceStats.draws") >= draws + 2
    # The URL is the state: opened afresh, it selects the same item with the same filter.
    shared = page.url
    page.goto("about:blank")
    page.goto(shared)
    page.wait_for_function("document.querySelectorAll('#neighbours figure').length === 12", timeout=30_000)
    assert page.input_value("#map-filter") == "label == 3"
    assert not page.errors


def test_a_dropped_image_returns_its_neighbours(page, site, deployment):
    from zspace.data import load_dataset

    row = load_dataset("digits").x_test[0].reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(np.round(row * 255).astype(np.uint8)).save(buf, "PNG")
    open_view(page, site, "query")
    page.evaluate("""(b64) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], 'digit.png', { type: 'image/png' }));
        const drop = document.querySelector('#drop');
        drop.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
        drop.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true })); }""",
                  base64.b64encode(buf.getvalue()).decode())
    page.wait_for_function("document.querySelectorAll('#query-neighbours figure').length === 12", timeout=15_000)
    assert page.locator("#query-recon img").count() == 1
    assert page.inner_text("#query-code").count(",") == 3  # a 4-number code
    assert not page.errors


def test_interpolation_and_sliders_decode(page, site):
    open_view(page, site, "interpolate?a=digits/train/1&b=digits/train/7&steps=6")
    assert page.locator("#interp-strip img").count() == 6 + 2
    open_view(page, site, "generate")
    page.wait_for_function("document.querySelector('#gen-out').dataset.decodes === '1'")
    before = page.get_attribute("#gen-out img", "src")
    page.focus("#z0")
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("Number(document.querySelector('#gen-out').dataset.decodes) >= 2 && "
                           "location.hash.includes('z=0.50')", timeout=10_000)
    assert page.get_attribute("#gen-out img", "src") != before
    page.click("#traverse-go")
    page.wait_for_function("document.querySelectorAll('#traversal img').length === 36", timeout=10_000)
    assert page.locator("#gen-samples img").count() == 16
    assert not page.errors


def test_refusals_are_shown(page, site):
    open_view(page, site, "interpolate?a=nope&b=digits/train/1")
    banner = page.inner_text("#banner")
    assert "The server refused (NOT_FOUND" in banner and "nope" in banner
    open_view(page, site, "generate?model=digits")
    page.fill("#token", "wrong")
    page.click("#token-form button")
    page.wait_for_function("document.querySelector('#view').dataset.ready === '1'")
    assert "needs a bearer token" in page.inner_text("#banner")
    page.fill("#token", TOKEN)
    page.click("#token-form button")
