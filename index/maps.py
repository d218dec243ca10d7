"""A 2-D map of an index's codes (`zspace index map`), stored with the index and kept up to date.

The projection is fitted once, offline, on a sample of the codes: PCA (numpy), t-SNE
(scikit-learn) or UMAP (umap-learn). Every other item, and every item written later,
is *placed* without refitting, by what the map file itself holds:

- pca: the mean and the two axes, a linear projection;
- tsne, umap: the fitted sample's codes ("anchors") and their positions; a new code lands
  at the inverse-distance-weighted mean of its nearest anchors' positions. t-SNE has no
  transform of its own, and UMAP's needs umap-learn, which a serving image does not carry:
  placing by neighbours works for both with numpy and FAISS, the server's own parts.

So the server keeps the map current with nothing but the item store's change log
(`update`): items deleted since the map's change-log position leave it, items written
since are placed. The map file is `map.npz` in the index folder, written atomically.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from zspace.errors import UserError
from zspace.files import write_atomic
from zspace.progress import stage

MAP_FILE = "map.npz"
METHODS = ("pca", "umap", "tsne")
# How many codes each method fits on by default: PCA is cheap at any size; t-SNE and UMAP grow
# faster than linearly (minutes past these sizes on two cores), and the rest is placed.
DEFAULT_SAMPLE = {"pca": 200_000, "umap": 20_000, "tsne": 5_000}
NEIGHBOURS = 8          # anchors whose positions a placed code averages
MAX_ANCHORS = 50_000    # tsne/umap maps keep at most this many fitted codes for placing new ones


@dataclass(frozen=True)
class LatentMap:
    """Item ids and their 2-D positions as of change-log position `seq`, and what places new codes."""

    method: str
    ids: np.ndarray        # int64 [n]: the item store's ids
    xy: np.ndarray         # float32 [n, 2]
    seq: int               # the item store's change-log position the map is complete to
    fitted: int            # how many codes the projection was fitted on
    mean: np.ndarray       # pca: float32 [K]; otherwise empty
    axes: np.ndarray       # pca: float32 [K, 2]; otherwise empty
    anchors: np.ndarray    # tsne/umap: float32 [m, K] fitted codes; otherwise empty
    anchor_xy: np.ndarray  # float32 [m, 2]
    seconds: float = 0.0   # how long the fit took

    @property
    def count(self) -> int:
        """Items on the map (rows of deleted items stay, empty, until a refit: see update)."""
        return int((self.ids >= 0).sum())

    def bounds(self) -> list[float]:
        """[x0, y0, x1, y1] of the points (of the anchors when there are none yet)."""
        pts = self.xy[self.ids >= 0] if self.count else self.anchor_xy
        if not len(pts):
            return [-1.0, -1.0, 1.0, 1.0]
        lo, hi = pts.min(0), pts.max(0)
        return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]

    def place(self, codes: np.ndarray) -> np.ndarray:
        """Positions for codes the projection was not fitted on (see the module doc)."""
        codes = np.ascontiguousarray(codes, np.float32)
        if not len(codes):
            return np.zeros((0, 2), np.float32)
        if self.method == "pca":
            return ((codes - self.mean) @ self.axes).astype(np.float32)
        import faiss

        flat = faiss.IndexFlatL2(self.anchors.shape[1])
        flat.add(self.anchors)
        k = min(NEIGHBOURS, len(self.anchors))
        dist, nearest = flat.search(codes, k)
        weights = 1.0 / (np.sqrt(np.maximum(dist, 0)) + 1e-6)
        weights /= weights.sum(1, keepdims=True)
        return np.einsum("nk,nkd->nd", weights, self.anchor_xy[nearest]).astype(np.float32)

    def info(self) -> dict:
        return {"method": self.method, "count": self.count, "rows": len(self.ids), "fitted": self.fitted, "seq": self.seq,
                "bounds": self.bounds(), "fit_seconds": round(self.seconds, 2)}


def fit_map(ids: np.ndarray, codes: np.ndarray, seq: int, method: str = "pca", sample: int | None = None,
            seed: int = 0, quiet: bool = False) -> LatentMap:
    """Fit `method` on a sample of `codes` (all of them when there are no more than `sample`), place the rest."""
    if method not in METHODS:
        raise UserError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    sample = DEFAULT_SAMPLE[method] if sample is None else sample
    if sample < 3:
        raise UserError(f"--sample: expected at least 3 codes to fit on, got {sample}")
    n = len(codes)
    if n < 3:
        raise UserError(f"the index holds {n} items; a map needs at least 3")
    codes = np.ascontiguousarray(codes, np.float32)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, sample, replace=False)) if n > sample else np.arange(n)
    fit_codes = codes[chosen]
    empty = np.zeros((0, codes.shape[1]), np.float32)
    t0 = time.monotonic()
    with stage(f"map: fitting {method} on {len(chosen):,} of {n:,} codes", enabled=not quiet):
        if method == "pca":
            mean = fit_codes.mean(0)
            # The two leading right singular vectors of the centred sample: the plane of most variance.
            _, _, vt = np.linalg.svd(fit_codes - mean, full_matrices=False)
            axes = vt[:2].T.astype(np.float32)
            m = LatentMap("pca", ids, np.zeros((0, 2), np.float32), seq, len(chosen), mean.astype(np.float32), axes,
                          empty, np.zeros((0, 2), np.float32))
        else:
            fitted_xy = _fit_nonlinear(method, fit_codes, seed)
            keep = np.arange(len(chosen)) if len(chosen) <= MAX_ANCHORS else np.sort(
                rng.choice(len(chosen), MAX_ANCHORS, replace=False))
            m = LatentMap(method, ids, np.zeros((0, 2), np.float32), seq, len(chosen), np.zeros(0, np.float32),
                          np.zeros((0, 2), np.float32), fit_codes[keep], fitted_xy[keep])
    seconds = time.monotonic() - t0
    with stage(f"map: placing {n:,} codes", enabled=not quiet):
        xy = np.empty((n, 2), np.float32)
        if method == "pca":
            for start in range(0, n, 262_144):
                xy[start:start + 262_144] = m.place(codes[start:start + 262_144])
        else:
            rest = np.ones(n, bool)
            rest[chosen] = False
            xy[chosen] = fitted_xy
            xy[rest] = m.place(codes[rest])
    return replace(m, xy=xy, seconds=seconds)


def _fit_nonlinear(method: str, codes: np.ndarray, seed: int) -> np.ndarray:
    """t-SNE (scikit-learn) or UMAP (umap-learn) positions of `codes`; a missing package is named."""
    try:
        if method == "tsne":
            from sklearn.manifold import TSNE

            model = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(codes) - 1) / 3), random_state=seed)
        else:
            import umap  # umap-learn

            # A seed makes UMAP single-threaded (n_jobs=1, said outright): a map is fitted once, and the same map twice.
            model = umap.UMAP(n_components=2, n_neighbors=min(15, len(codes) - 1), random_state=seed, n_jobs=1)
    except ImportError as exc:
        package = "scikit-learn" if method == "tsne" else "umap-learn"
        raise UserError(f"--method {method}: needs {package} (pip install {package}): {exc}") from None
    return np.asarray(model.fit_transform(codes), np.float32)


# ------------------------------------------------------------------ the file

def save_map(folder: Path, m: LatentMap) -> Path:
    buf = io.BytesIO()
    np.savez(buf, method=np.array(m.method), ids=m.ids.astype(np.int64), xy=m.xy.astype(np.float32),
             seq=np.array(m.seq, np.int64), fitted=np.array(m.fitted, np.int64), mean=m.mean, axes=m.axes,
             anchors=m.anchors, anchor_xy=m.anchor_xy, seconds=np.array(m.seconds))
    return write_atomic(Path(folder) / MAP_FILE, buf.getbuffer())


def load_map(folder: Path) -> LatentMap | None:
    """The map stored in an index folder; None when there is none (`zspace index map` makes one)."""
    path = Path(folder) / MAP_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            method = str(f["method"])
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}")
            return LatentMap(method, f["ids"].astype(np.int64), f["xy"].astype(np.float32), int(f["seq"]),
                             int(f["fitted"]), f["mean"].astype(np.float32), f["axes"].astype(np.float32),
                             f["anchors"].astype(np.float32), f["anchor_xy"].astype(np.float32), float(f["seconds"]))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: not a readable map ({exc}); make it again with zspace index map") from None


# ------------------------------------------------------------------ keeping it current

def update(m: LatentMap, changes: list[tuple[int, int | None, int | None]], entries) -> LatentMap:
    """The map after the store's `changes` (seq, old id, new id) since m.seq. Rows never move, so a row number
    a viewer holds keeps naming its item: a replaced or deleted item's row is emptied (id -1, position NaN),
    and new items are placed on rows appended at the end. entries(ids) -> (ids that exist, their codes),
    the store's `entries_of`. A refit (`zspace index map`) compacts the rows again."""
    if not changes:
        return m
    gone = {old for _, old, _ in changes if old is not None}
    added = list(dict.fromkeys(new for _, _, new in changes if new is not None))
    ids, xy = m.ids.copy(), m.xy.copy()
    if gone:
        dead = np.isin(ids, np.fromiter(gone, np.int64, len(gone)))
        ids[dead], xy[dead] = -1, np.nan
    have = set(ids.tolist()) if added else set()
    fresh = [i for i in added if i not in have]  # entries() drops those deleted again since
    if fresh:
        found, codes = entries(fresh)
        ids = np.concatenate([ids, found.astype(np.int64)])
        xy = np.concatenate([xy, m.place(codes)])
    return replace(m, ids=ids, xy=xy, seq=int(changes[-1][0]))


def map_index(index, method: str = "pca", sample: int | None = None, seed: int = 0, quiet: bool = False) -> LatentMap:
    """Fit a map of every code in a FAISS-backed index and store it in the index's folder."""
    store = getattr(index, "store", None)
    if store is None:
        raise UserError(f"{index.path}: maps are made for FAISS indexes; this one's backend "
                        f"({index.manifest.get('backend', 'faiss')}) keeps its codes elsewhere")
    with stage("map: reading the codes", enabled=not quiet):
        seq, ids, codes, _ = store.everything(payloads=False)
    m = fit_map(ids, codes, seq, method, sample, seed, quiet)
    save_map(index.path, m)
    return m
