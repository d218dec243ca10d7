"""What a FAISS factory string means, asked of FAISS itself.

An index folder names its FAISS structure by a factory string ("Flat", "HNSW32",
"IVF256,PQ8", "IVF4_HNSW8,Flat" ...). Whether it needs training, on how many
codes, whether it can forget a vector and which search parameters apply are
read here from the object FAISS builds for the string, never guessed from its
letters elsewhere: "IVF4_HNSW8,Flat" is an IVF index (removable) whose coarse
quantizer happens to be an HNSW graph, and "SQ8" needs training although no
number in it says so.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from zspace.index.errors import FactoryError


@dataclass(frozen=True)
class FactoryTraits:
    factory: str
    family: str          # "IVF" or "HNSW": which search parameters (nprobe, efSearch) apply; "" for none
    min_points: int      # codes needed before it can be trained; 0: no training, it takes codes at once
    removable: bool      # remove_ids works; HNSW graphs cannot forget a vector (zspace hides it instead)
    id_mapped: bool      # zspace wraps it in an IndexIDMap (IVF keeps ids itself)

    @property
    def needs_training(self) -> bool:
        return self.min_points > 0


def _faiss():
    import faiss

    return faiss


def _build(factory: str, dim: int, metric: str = "l2"):
    """(the object FAISS builds, its downcast view). Keep the first: the view does not own the object."""
    faiss = _faiss()
    metric_type = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    base = faiss.index_factory(dim, factory, metric_type)
    return base, faiss.downcast_index(base)


def _min_points(index) -> int:
    """Codes needed to train `index` and everything inside it: the most any part asks for."""
    faiss = _faiss()
    if index.is_trained:
        return 0
    need = 1  # e.g. a scalar quantizer learns each dimension's range from any codes at all
    if isinstance(index, faiss.IndexIVF):
        need = max(need, index.nlist, _min_points(faiss.downcast_index(index.quantizer)))
    pq = getattr(index, "pq", None)
    if pq is not None:
        need = max(need, int(pq.ksub))  # k-means with ksub centroids per sub-quantizer
    for inner in ("index", "base_index"):  # IndexPreTransform, IndexRefine
        if hasattr(index, inner) and getattr(index, inner) is not None:
            need = max(need, _min_points(faiss.downcast_index(getattr(index, inner))))
    return need


@functools.cache
def traits(factory: str, dim: int, binary: bool = False) -> FactoryTraits:
    """The traits of `factory` for `dim`-d codes (binary: `dim` bits, Hamming distance, FAISS's IndexBinary);
    FactoryError naming the string if FAISS cannot build it, or builds the other kind."""
    faiss = _faiss()
    if not isinstance(factory, str) or not factory.strip():
        raise FactoryError("factory: expected a FAISS factory string such as Flat, HNSW32 or IVF256,PQ8"
                           + (" (binary codes: BFlat or BHNSW32)" if binary else ""))
    if binary:
        return _binary_traits(factory, dim)
    if factory.split(",")[0].startswith("IDMap"):
        raise FactoryError(f"factory: {factory!r} maps ids itself; zspace assigns the ids, give the index without IDMap")
    try:
        base, index = _build(factory, dim)
    except RuntimeError as exc:
        binary = _is_binary_factory(factory, dim)
        # FAISS says "Error in <C++ function> at <file>:<line>: <what>"; the user needs <what>.
        what = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(exc).strip().splitlines()[-1])[:200]
        why = ("a binary index (FAISS's IndexBinary) for bits: give the index --metric hamming, and a hash "
               "model's codes" if binary else what)
        raise FactoryError(f"factory: FAISS cannot build {factory!r} for {dim}-d codes ({why})") from None
    family = "IVF" if isinstance(index, faiss.IndexIVF) else ("HNSW" if isinstance(index, faiss.IndexHNSW) else "")
    id_mapped = not isinstance(index, faiss.IndexIVF)
    probe = faiss.IndexIDMap(base) if id_mapped else base
    try:
        probe.remove_ids(np.zeros(0, dtype=np.int64))
        removable = True
    except RuntimeError:  # "remove_ids not implemented for this type of index"
        removable = False
    return FactoryTraits(factory=factory, family=family, min_points=_min_points(index), removable=removable,
                         id_mapped=id_mapped)


def _binary_traits(factory: str, dim: int) -> FactoryTraits:
    """Traits of a binary factory ("BFlat", "BHNSW32"): codes of `dim` bits compared by Hamming distance."""
    faiss = _faiss()
    if dim % 8:
        raise FactoryError(f"dim: binary codes are whole bytes, a multiple of 8 bits; got {dim}")
    if factory.split(",")[0].startswith("BIDMap") or factory.startswith("IDMap"):
        raise FactoryError(f"factory: {factory!r} maps ids itself; zspace assigns the ids, give the index without IDMap")
    try:
        index = faiss.index_binary_factory(dim, factory)
    except RuntimeError:
        float_too = _builds_float(factory, dim)
        why = ("a float index; a hamming index holds bits: use BFlat or BHNSW32" if float_too else
               "not a binary factory FAISS knows; use BFlat or BHNSW32")
        raise FactoryError(f"factory: FAISS cannot build {factory!r} for {dim}-bit codes ({why})") from None
    if not index.is_trained:
        raise FactoryError(f"factory: {factory!r} needs training, which zspace's binary indexes do not do; "
                           "use BFlat (exact) or BHNSW32 (graph)")
    family = "HNSW" if isinstance(faiss.downcast_IndexBinary(index), faiss.IndexBinaryHNSW) else ""
    probe = faiss.IndexBinaryIDMap(index)
    try:
        probe.remove_ids(np.zeros(0, dtype=np.int64))
        removable = True
    except RuntimeError:
        removable = False
    return FactoryTraits(factory=factory, family=family, min_points=0, removable=removable, id_mapped=True)


def _builds_float(factory: str, dim: int) -> bool:
    try:
        _build(factory, dim)
    except RuntimeError:
        return False
    return True


def _is_binary_factory(factory: str, dim: int) -> bool:
    if dim % 8:
        return False
    try:
        _faiss().index_binary_factory(dim, factory)
    except RuntimeError:
        return False
    return True


def empty_index(t: FactoryTraits, dim: int, metric: str, trainable_now: bool):
    """(a new empty index for the factory, whether it is the real one).

    Until a factory that needs training has enough codes, a flat index stands in
    for it (exact search); `trainable_now` says the codes are there. Metric
    hamming: a binary index over `dim` bits."""
    faiss = _faiss()
    # IndexIDMap, not IDMap2: zspace reads codes from the store, never back from FAISS, and IDMap2's reverse
    # map (a hash table of every id) cost 41 MB per million items, in every worker (benchmarks/README.md).
    if metric == "hamming":
        return faiss.IndexBinaryIDMap(faiss.index_binary_factory(dim, t.factory)), True
    metric_type = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if t.needs_training and not trainable_now:
        return faiss.IndexIDMap(faiss.IndexFlat(dim, metric_type)), False
    base, _ = _build(t.factory, dim, metric)
    # IVF keeps ids itself and removes by id; an IDMap over it breaks on remove (IVF does not renumber).
    return (faiss.IndexIDMap(base) if t.id_mapped else base), True


def search_parameters(family: str, nprobe: int, ef_search: int, selector=None):
    """FAISS search parameters: nprobe or efSearch for a trained IVF or HNSW index, and an id selector.

    None when there is nothing to set. The caller keeps `selector` alive: FAISS holds it by raw pointer."""
    faiss = _faiss()
    if family == "IVF":
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
    elif family == "HNSW":
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef_search
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        return None
    if selector is not None:
        params.sel = selector
    return params


def set_threads(threads: int) -> None:
    """FAISS's OpenMP threads, process-wide (0: leave FAISS's default). The server's --faiss-threads."""
    if threads:
        _faiss().omp_set_num_threads(threads)
