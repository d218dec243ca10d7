"""Feature transforms: raw images and documents to the vectors a model reads.

There is exactly one implementation of each transform. Training fits and
applies it here, the bundle stores its parameters (`to_dict`), and the service
rebuilds it with `transform_from_dict` and applies the very same code to raw
requests, so a model never sees features computed two different ways.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from zspace.errors import UserError
from zspace.images import PNG_SIGNATURE, image_size, png_pixel_chunks

# The largest decoded image we accept, in pixels. Pillow's own bomb check is a
# warning until 2x its limit; we refuse earlier and with a clear message.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImageTransform:
    """Image -> float32 vector in [0, 1], laid out C, H, W (row-major)."""

    shape: tuple[int, int, int]  # (C, H, W); C is 1 (grey) or 3 (RGB)

    kind = "image"

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def to_dict(self) -> dict:
        return {"type": "image", "shape": list(self.shape), "range": [0.0, 1.0]}

    def from_pil(self, image) -> np.ndarray:
        """A Pillow image of any size and mode -> one feature vector."""
        from PIL import Image

        c, h, w = self.shape
        image = image.convert("L" if c == 1 else "RGB")
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = arr[None, :, :] if c == 1 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr.reshape(-1))

    def from_bytes(self, data: bytes, what: str = "image") -> np.ndarray:
        """PNG/JPEG bytes -> one feature vector; UserError if undecodable or too big.

        A JPEG is decoded straight at a reduced scale near the model's size (libjpeg's
        draft mode): a photo of 8000x8000 pixels then costs a fraction of its full decode."""
        c, h, w = self.shape
        return self.from_pil(decode_image(data, what, draft=("L" if c == 1 else "RGB", (w, h))))

    def to_uint8(self, x: np.ndarray) -> np.ndarray:
        """Feature vectors [N, D] -> uint8 images [N, H, W] or [N, H, W, 3]."""
        c, h, w = self.shape
        arr = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0).reshape(-1, c, h, w)
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
        return arr[:, 0] if c == 1 else arr.transpose(0, 2, 3, 1)

    def to_png(self, x: np.ndarray) -> bytes:
        """One feature vector -> PNG bytes."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.to_uint8(x[None])[0]).save(buf, format="PNG")
        return buf.getvalue()


IMAGE_FORMATS = ("PNG", "JPEG")  # what the README promises; Pillow would also open GIF, TIFF, EPS ...


def is_png_or_jpeg(data: bytes) -> bool:
    """The file signatures of PNG and JPEG: a cheap check before anything is sent or decoded."""
    return data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")


def image_pixels(data: bytes, what: str = "image") -> int:
    """Width x height from the image's header alone (nothing decoded, no Pillow): to bound a request before
    decoding it. The decoder checks the same header again, so a file that lies here is refused there."""
    width, height = image_size(data, what)
    check_image_pixels(width, height, what)
    return width * height


def check_image_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise UserError(f"{what}: image is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS}")


def decode_image(data: bytes, what: str = "image", draft: tuple[str, tuple[int, int]] | None = None, load: bool = True):
    """Decode PNG/JPEG bytes with Pillow, refusing other formats, corrupt data and decompression bombs."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError(f"{what}: empty image bytes")
    if data.startswith(PNG_SIGNATURE):  # text and other chunks that carry no pixels cost time to open: dropped
        data = png_pixel_chunks(data, what)
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning; our limit below is stricter
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        check_image_pixels(*image.size, what)
        if draft is not None and image.format == "JPEG":
            image.draft(*draft)
        if load:
            image.load()
    except UserError:
        raise
    except UnidentifiedImageError:
        if is_png_or_jpeg(data):  # the signature is right, the rest is not: a damaged file
            raise UserError(f"{what}: cannot decode image (damaged PNG or JPEG data)") from None
        raise UserError(f"{what}: not a PNG or JPEG image") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{what}: image is over the pixel limit ({exc})") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise UserError(f"{what}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return image


# A plain English stop-word list: function words that carry no topic.
STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are aren as at be
    because been before being below between both but by can cannot could couldn
    did didn do does doesn doing don down during each either else ever every few
    for from further get gets got had hadn has hasn have haven having he her here
    hers herself him himself his how however i if in into is isn it its itself
    just let ll me might more most much must mustn my myself neither no nor not
    now of off on once one only or other others otherwise ought our ours
    ourselves out over own re really same say says said shall shan she should
    shouldn since so some such than that the their theirs them themselves then
    there these they this those though through thus to too under until up upon
    us ve very was wasn we were weren what when where whether which while who
    whom whose why will with within without won would wouldn yet you your yours
    yourself yourselves
    """.split()
)

TOKEN_RE = re.compile(r"[a-z][a-z0-9']*[a-z0-9]|[a-z]")
WEIGHTINGS = ("counts", "binary", "log1p", "tfidf")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of two or more characters, stop words removed."""
    return [t for t in TOKEN_RE.findall(text.lower()) if len(t) > 1 and t not in STOP_WORDS]


@dataclass
class TextTransform:
    """Document -> weighted counts of a fixed vocabulary.

    The vocabulary is the `size` most frequent words of the training split
    (ties broken alphabetically, so the fit is deterministic). Weightings:
    `counts`, `binary`, `log1p` (log(1 + count)) and `tfidf` (log1p counts
    times smoothed idf, then L2-normalised).
    """

    vocab: list[str]
    weighting: str = "log1p"
    idf: list[float] | None = None
    index: dict[str, int] = field(init=False, repr=False)

    kind = "text"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"weighting: expected one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @property
    def dim(self) -> int:
        return len(self.vocab)

    @classmethod
    def fit(cls, texts: Sequence[str], size: int = 2000, weighting: str = "log1p") -> TextTransform:
        if size < 2:
            raise UserError(f"vocab size: expected at least 2 words, got {size}")
        freq: Counter[str] = Counter()
        doc_freq: Counter[str] = Counter()
        for text in texts:
            tokens = tokenize(text)
            freq.update(tokens)
            doc_freq.update(set(tokens))
        if not freq:
            raise UserError("texts: no words found in the training documents")
        vocab = [w for w, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
        n = len(texts)
        idf = [float(np.log((1 + n) / (1 + doc_freq[w])) + 1.0) for w in vocab]
        return cls(vocab=vocab, weighting=weighting, idf=idf)

    def counts(self, texts: Iterable[str]) -> np.ndarray:
        rows = []
        for text in texts:
            row = np.zeros(len(self.vocab), dtype=np.float32)
            for token in tokenize(text):
                j = self.index.get(token)
                if j is not None:
                    row[j] += 1.0
            rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, len(self.vocab)), np.float32)

    def apply(self, texts: Iterable[str]) -> np.ndarray:
        """Documents -> float32 [N, vocab]; the function training and serving share."""
        c = self.counts(texts)
        if self.weighting == "counts":
            return c
        if self.weighting == "binary":
            return (c > 0).astype(np.float32)
        x = np.log1p(c)
        if self.weighting == "tfidf":
            x = x * np.asarray(self.idf, dtype=np.float32)
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.maximum(norm, 1e-12)
        return x.astype(np.float32)

    def to_dict(self) -> dict:
        return {"type": "text", "weighting": self.weighting, "vocab": list(self.vocab), "idf": self.idf}


@dataclass(frozen=True)
class VectorTransform:
    """Identity: the input already is the feature vector."""

    dim: int

    kind = "vector"

    def to_dict(self) -> dict:
        return {"type": "vector", "dim": self.dim}


Transform = ImageTransform | TextTransform | VectorTransform


def transform_from_dict(d: dict) -> Transform:
    """Rebuild a transform from its stored parameters (manifest or run dir)."""
    t = d.get("type")
    if t == "image":
        return ImageTransform(shape=tuple(int(v) for v in d["shape"]))
    if t == "text":
        return TextTransform(vocab=list(d["vocab"]), weighting=d["weighting"], idf=d.get("idf"))
    if t == "vector":
        return VectorTransform(dim=int(d["dim"]))
    raise UserError(f"transform: unknown type {t!r} (expected image, text or vector)")
