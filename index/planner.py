"""The query planner of filtered searches: how many items match, then exact or ANN.

A filter first becomes a boolean mask over item ids (payload indexes: one vectorised
comparison per condition; undeclared fields: a scan of every payload, said in the plan).
Its count decides the strategy:

- few matches (at most `exact_limit`): an exact search over just those codes, gathered from
  memory; a graph or an inverted file would wander through non-matching items to find them.
- many: the ANN search with the mask as a FAISS `IDSelectorBitmap` (one bit per id, built
  from the mask in well under a millisecond), widening the search as the filter narrows:
  efSearch grows like 1/selectivity, so about as many matching candidates are visited as
  an unfiltered search would visit, and recall holds; nprobe like 1/√selectivity
  (`ivf_nprobe`).
- HNSW and IVF, per query: the global selectivity misleads when a filter is correlated with where
  the query lies (label == 3 asked with a 7: 10% of all items, almost none near the query).
  Each query's PROBE nearest neighbours (an unfiltered walk, a fraction of a millisecond) are
  checked against the mask; efSearch or nprobe follows the lower of the two rates, and a
  neighbourhood with no match at all is answered by the exact scan of the matches (HNSW) or
  the widest IVF search (MAX_NPROBE lists).

Functions over arrays, no state: the index supplies the mask, the codes and FAISS.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

EXACT_LIMIT = 30_000        # matches up to which an exact scan of them beats the filtered graph walk (benchmarks.scale)
EXACT_LIMIT_FROM_STORE = 2_000  # the same when the codes must be read from SQLite (IVF/PQ keep no raw codes)
EXACT_FALLBACK_LIMIT = 250_000  # a query whose neighbourhood holds no match scans this many matches exactly, at most
MAX_EF_SEARCH = 1024
MAX_NPROBE = 512            # IVF lists a filtered search visits at most (10M items: p99 ≈ 25 ms)
ANN_BREADTH = 2.0           # efSearch ≈ ANN_BREADTH · k / selectivity, at least the caller's
PROBE = 64                  # unfiltered neighbours of each query probed for the filter's local selectivity (HNSW)


@dataclass(frozen=True)
class Plan:
    """What a search will do, and why (`zspace index search --explain` prints it)."""

    filter: str                  # the filter as understood, or "(none)"
    total: int                   # items in the index
    matches: int                 # items the filter matches (counted from the mask, so exact)
    indexed: tuple[str, ...]     # fields answered from payload indexes
    scanned: tuple[str, ...]     # fields answered by parsing every payload (not indexed: declare them)
    strategy: str                # "ann", "ann+bitmap", "exact", "flat+bitmap" or "empty"
    ef_search: int | None = None
    nprobe: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["selectivity"] = round(self.matches / self.total, 6) if self.total else 0.0
        d["indexed"], d["scanned"] = list(self.indexed), list(self.scanned)
        if self.scanned:
            d["note"] = (f"not indexed: {', '.join(self.scanned)}; every payload is parsed to evaluate the filter "
                         f"(once, until the next write). Declare them: zspace index field add DIR NAME:TYPE")
        return d


def exact_limit(family: str, codes_in_memory: bool, total: int) -> int:
    """Matches up to which the exact scan of just them is chosen.

    A flat index scans every code anyway (≈16 ms at a million 30-d codes, with or without a
    selector); gathering and scanning the matches costs ≈85 ns each: up to a fifth is faster.
    A graph or an inverted file is faster than the exact scan of a few tens of thousands of codes.
    Codes read from SQLite (IVF/PQ keep none raw) cost about 2 µs each: only a few thousand pay."""
    if not codes_in_memory:
        return EXACT_LIMIT_FROM_STORE
    return max(EXACT_LIMIT, total // 5) if family == "" else EXACT_LIMIT


def choose(matches: int, total: int, k: int, family: str, nprobe: int, ef_search: int, nlist: int,
           exact_limit: int) -> tuple[str, int | None, int | None]:
    """(strategy, efSearch, nprobe) for a filter matching `matches` of `total` items."""
    if matches == 0:
        return "empty", None, None
    if matches <= exact_limit:
        return "exact", None, None
    selectivity = matches / max(total, 1)
    if family == "HNSW":
        ef = max(ef_search, k, math.ceil(ANN_BREADTH * k / selectivity))
        return "ann+bitmap", min(ef, MAX_EF_SEARCH), None
    if family == "IVF":
        return "ann+bitmap", None, ivf_nprobe(selectivity, nprobe, nlist)
    return "flat+bitmap", None, None


class Matches:
    """The items a filter matches as of one state of the index: the mask over ids, its count, and, made when
    first asked for, the ids and the bitmap FAISS reads. Immutable once made (two threads making the
    same lazy part make equal arrays), so searches share it."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask
        self.count = int(np.count_nonzero(mask))
        self._ids: np.ndarray | None = None
        self._bits: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.flatnonzero(self.mask)
        return self._ids

    @property
    def bits(self) -> np.ndarray:
        if self._bits is None:
            self._bits = bitmap(self.mask)
        return self._bits

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + 8 * self.count + self.mask.nbytes // 8


class MatchCache:
    """Recent filters' Matches by (filter, index state), least recently used out past `max_bytes`.

    A served filter is usually asked again and again (a catalogue page, a facet): its mask,
    ids and bitmap are made once per state of the index instead of on every query, and a
    filter on undeclared fields scans the payloads once instead of once a query. Any write
    changes the state, and with it the key."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, Matches] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], Matches]) -> Matches:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        made = make()  # outside the lock: a scan of the payloads may take a second
        with self._lock:
            if key not in self._entries:
                self._entries[key] = made
                self._bytes += made.nbytes
                while self._bytes > self.max_bytes and len(self._entries) > 1:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= old.nbytes
        return made

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def bitmap(mask: np.ndarray) -> np.ndarray:
    """The mask as FAISS's IDSelectorBitmap reads it: bit i of byte i // 8 (little-endian bit order)."""
    return np.packbits(mask, bitorder="little")


def local_ef(local: float, selectivity: float, k: int, ef: int) -> int | None:
    """efSearch for one query from the share of its own neighbourhood that matches (`local`, probed), or None
    when the neighbourhood holds no match, or too few for a walk of MAX_EF_SEARCH: the exact scan then.

    The walk keeps efSearch candidates, matching or not, so it must be wide enough to hold about
    ANN_BREADTH·k matches at the rate it meets them: the lower of the global and local rates."""
    if local == 0:
        return None
    rate = min(selectivity, local)
    wanted = max(ef, k, math.ceil(ANN_BREADTH * k / rate))
    return wanted if wanted <= MAX_EF_SEARCH else None  # wider than that walk: the exact scan is as fast


def ivf_nprobe(rate: float | None, nprobe: int, nlist: int) -> int:
    """nprobe for a filter matching at `rate` near the query (None: no match near it).

    Not nprobe / rate: the k nearest matches lie within the k / rate nearest items, whose lists
    grow far slower than their count (on 10M MNIST-AE codes, IVF4096: recall@10 saturates at
    nprobe 128 for 0.1% and 1% filters, where nprobe / rate asked for all 4,096 lists at 66 ms)."""
    if rate is None or rate <= 0:
        return min(nlist, MAX_NPROBE)
    return min(nlist, MAX_NPROBE, max(nprobe, math.ceil(nprobe * math.sqrt(1 / rate))))


def exact_knn(queries: np.ndarray, codes: np.ndarray, ids: np.ndarray, k: int,
              metric: str) -> tuple[np.ndarray, np.ndarray]:
    """FAISS-shaped (distances, ids) [n, k'] of the k nearest of `codes` (rows for `ids`), k' = min(k, len(ids)).

    Distances as FAISS gives them: squared L2; inner product for cosine (codes and queries
    normalised, larger is nearer); for hamming, codes and queries are 0/1 bits, whose squared
    L2 distance is the count of differing bits. FAISS's own brute force (`faiss.knn`)."""
    import faiss

    k = min(k, len(ids))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    codes = np.ascontiguousarray(codes, dtype=np.float32)
    if metric == "cosine":
        dist, rows = faiss.knn(q, codes, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        dist, rows = faiss.knn(q, codes, k)
    if metric == "hamming":
        dist = np.rint(dist)
    return dist.astype(np.float32), np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
