"""The feature transforms: deterministic fits and the same output after a reload."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from zspace.errors import UserError
from zspace.transforms import ImageTransform, TextTransform, decode_image, tokenize, transform_from_dict

DOCS = ["The rocket reached orbit.", "A rocket, a moon and an orbit!", "Brakes and tires for the engine"]


@pytest.mark.parametrize("weighting", ["counts", "binary", "log1p", "tfidf"])
def test_text_transform_reload_parity(weighting):
    fitted = TextTransform.fit(DOCS, size=6, weighting=weighting)
    stored = json.loads(json.dumps(fitted.to_dict()))  # through JSON, as in a manifest
    reloaded = transform_from_dict(stored)
    new = ["orbit orbit rocket engine", "nothing known here", ""]
    assert np.array_equal(fitted.apply(new), reloaded.apply(new))
    assert fitted.apply(new).dtype == np.float32


def test_text_vocab_is_most_frequent_without_stop_words():
    t = TextTransform.fit(DOCS, size=3)
    assert t.vocab == ["orbit", "rocket", "brakes"]  # ties broken alphabetically
    assert "the" not in tokenize("The rocket") and tokenize("The rocket") == ["rocket"]
    assert t.counts(["rocket rocket orbit"]).tolist() == [[1.0, 2.0, 0.0]]


def test_text_weighting_rejected():
    with pytest.raises(UserError, match="weighting: expected one of"):
        TextTransform(vocab=["a"], weighting="bm25")


def test_image_transform_resizes_and_converts():
    rgb = Image.fromarray((np.random.default_rng(0).random((30, 20, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    grey = ImageTransform((1, 8, 8)).from_bytes(buf.getvalue())
    assert grey.shape == (64,) and grey.dtype == np.float32 and 0 <= grey.min() <= grey.max() <= 1
    colour = ImageTransform((3, 5, 4)).from_bytes(buf.getvalue())
    assert colour.shape == (60,)
    png = ImageTransform((1, 8, 8)).to_png(grey)
    assert np.allclose(ImageTransform((1, 8, 8)).from_bytes(png), grey, atol=1 / 255)


def test_decode_image_refuses_garbage_and_bombs(monkeypatch):
    with pytest.raises(UserError, match="request.images\\[0\\]: not a PNG or JPEG image"):
        decode_image(b"GIF89a-not-really", "request.images[0]")  # other formats are refused, not decoded
    with pytest.raises(UserError, match="cannot decode image"):
        decode_image(b"\x89PNG\r\n\x1a\n and then garbage", "x")
    with pytest.raises(UserError, match="empty image bytes"):
        decode_image(b"", "x")
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, format="PNG")
    import zspace.transforms as tr

    monkeypatch.setattr(tr, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(UserError, match="300x300 pixels, more than the limit"):
        decode_image(buf.getvalue())
