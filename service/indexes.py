"""The indexes a server answers for: every folder under --indexes with an index.json.

An index is served only beside the model version whose codes it holds; one
that cannot be opened or whose model is not loaded is reported (ListIndexes,
log) and skipped, like a broken bundle.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from zspace.bundle import usable_name
from zspace.errors import NotFound, shown
from zspace.index.backends import open_index
from zspace.index.contract import LatentCodeIndex
from zspace.index.errors import IndexMoved
from zspace.index.latent_index import IndexBusy
from zspace.service.batcher import DynamicBatcher, WouldBlock
from zspace.service.config import SearchConfig
from zspace.service.repository import ModelRepository

log = logging.getLogger("zspace.serve")


class IndexRegistry:
    def __init__(self, root: Path | None, repo: ModelRepository, search: SearchConfig = SearchConfig(),
                 snapshots: bool = True, follow: bool = False):
        """snapshots, follow: as LatentCodeIndex's (a server's workers share the index folders)."""
        self.root, self.repo, self.search_config = (Path(root) if root else None), repo, search
        self.snapshots, self.follow = snapshots, follow
        self.indexes: dict[str, LatentCodeIndex] = {}
        self._opening = threading.Lock()
        self.broken: dict[str, str] = {}
        # (index name, k) -> the index object its batcher searches, and the batcher.
        self.batchers: dict[tuple[str, int], tuple[LatentCodeIndex, DynamicBatcher]] = {}

    async def search(self, name: str, queries: np.ndarray, k: int) -> list:
        """Concurrent unfiltered searches of one index and k become one FAISS call; payloads come as JSON text.

        One call at a time per (index, k): a few queries to HNSW/IVF right on the event
        loop with one thread, anything else in a worker thread (FAISS's OpenMP pool is per
        calling thread, so many small concurrent calls would oversubscribe the cores).
        A few queries that find nothing waiting go straight to the batcher's run function:
        its queue bookkeeping would be a tenth of the search.
        """
        index = self.get(name)
        entry = self.batchers.get((name, k))
        if entry is not None and entry[0] is index:
            batcher = entry[1]
        else:  # the first search of this k, or the folder was reopened (replaced on disk) since
            if entry is not None:
                entry[1].close()
            batcher = self._batcher(name, index, k)
        if len(queries) <= self.search_config.inline_queries and batcher.idle:
            try:
                return batcher.run(queries, inline=True)[0]
            except WouldBlock:
                pass  # a flat scan, or a write holds the index: the batcher hands the search to a thread
        return (await batcher.submit(queries))[0]

    def _batcher(self, name: str, index: LatentCodeIndex, k: int) -> DynamicBatcher:
        def run(q: np.ndarray, inline: bool = False) -> list[list]:
            if not inline:
                return [index.search(q, k, as_json=True)]
            if not index.cheap_queries:
                raise WouldBlock  # a flat scan: milliseconds, not for the event loop
            try:
                return [index.search(q, k, blocking=False, one_thread=True, as_json=True)]
            except IndexBusy:
                raise WouldBlock from None

        # HNSW/IVF answer a few queries in tens of microseconds: cheaper on the loop than a thread
        # hand-off, unless a write holds the index (then the run declines and goes to a thread).
        # The hits are a list per query: the batcher slices it per request like an array.
        batcher = DynamicBatcher(run, self.search_config.batch_config(), run_declines=True, name=f"search-{name}")
        self.batchers[(name, k)] = (index, batcher)
        return batcher

    def open_all(self, retry_broken: bool = True) -> None:
        """Open every index folder not served yet; the ones that cannot be served are reported.

        Called at start and on every repository rescan, so a new index folder is picked
        up without a restart, and one that could not be served is tried again when the
        models changed (retry_broken). The maps are replaced, never changed in place:
        the event loop reads them meanwhile.
        """
        if self.root is None or not self.root.is_dir():
            return
        with self._opening:  # a write that met a replaced folder reopens it while a rescan may be opening too
            self._open_all(retry_broken)

    def _open_all(self, retry_broken: bool) -> None:
        broken: dict[str, str] = {}
        # Hidden folders are skipped: index builds stage there before renaming into place. So are names that are
        # not UTF-8: an index name travels in every request and answer, and such a name cannot.
        folders = [p for p in self.root.iterdir() if not p.name.startswith(".") and (p / "index.json").is_file()]
        for folder in sorted(p for p in folders if usable_name(p, "index folder")):
            served = self.indexes.get(folder.name)
            if served is not None and not served.moved():
                continue
            if not retry_broken and served is None and str(folder) in self.broken:
                broken[str(folder)] = self.broken[str(folder)]
                continue
            try:
                index = self._open(folder)
            except Exception as exc:
                reason = str(exc)
                broken[str(folder)] = f"not served: {reason}"
                if self.broken.get(str(folder)) != broken[str(folder)]:  # say it once, not at every rescan
                    log.error("index %s skipped: %s", folder.name, reason)
                if served is not None:  # replaced by a folder that cannot be served: the old one must not answer
                    self.indexes = {n: ix for n, ix in self.indexes.items() if n != folder.name}
                continue
            self.indexes = {**self.indexes, folder.name: index}
            log.info("index %s %s (%s/%s, %s, %s, %d items)", folder.name, "reopened: its folder was replaced"
                     if served is not None else "opened", *index.model, index.factory, index.metric, index.stats()["count"])
        self.broken = broken

    def _open(self, folder: Path):
        """Open one index folder for serving: its model must be loaded, with codes of the index's width."""
        index = open_index(folder, snapshots=self.snapshots, follow=self.follow)
        try:
            rt = self.repo.get(*index.model)  # NotFound if not loaded
            if rt.latent_dim != index.dim:
                raise ValueError(f"model {rt.name}/{rt.version} has {rt.latent_dim}-d codes, the index {index.dim}")
        except BaseException:
            index.release()  # not served: let go of its SQLite file or Milvus connection
            raise
        return index

    def reopen(self, name: str):
        """The index now in folder `name`, opened in place of the one served, whose folder was replaced on disk
        (a write met IndexMoved). Requests in between keep getting the one served, never NOT_FOUND.

        A folder caught mid-swap (`rm -rf X` under way, `mv .X.new X` not yet done) cannot be opened: the
        write is answered UNAVAILABLE and the next one tries again. Only a rescan stops serving a name
        (open_all, retire_removed), where a folder that stays unservable is reported as broken."""
        with self._opening:
            served = self.indexes.get(name)
            if served is not None and not served.moved():
                return served  # another request reopened it already
            try:  # opening never creates a file, so a folder being deleted stays deletable
                index = self._open(self.root / name)
            except Exception as exc:
                raise IndexMoved(f"index {shown(name)}: its folder was replaced or removed, and what is there now "
                                 f"cannot be opened ({exc})") from None
            self.indexes = {**self.indexes, name: index}
            log.warning("index %s: its folder was replaced while served; reopened", name)
            return index

    def retire_removed(self) -> None:
        """Stop serving indexes whose folder (or its index.json) is gone.

        Called on every repository rescan, on the event loop (it closes batchers).
        Searches already running hold the index object and finish; new ones get
        NOT_FOUND. The SQLite file is let go when the last holder drops it, not
        closed here, so a write in flight still completes (into the unlinked file).
        A folder replaced in place is not gone: open_all reopens it (see LatentCodeIndex.moved)."""
        gone = [name for name, index in self.indexes.items() if not (index.path / "index.json").is_file()]
        if not gone:
            return
        self.indexes = {name: index for name, index in self.indexes.items() if name not in gone}
        for key in [key for key in self.batchers if key[0] in gone]:
            self.batchers.pop(key)[1].close()
        for name in gone:
            log.warning("index %s: its folder is gone; no longer served", name)

    def get(self, name: str) -> LatentCodeIndex:
        if name not in self.indexes:
            raise NotFound(f"index {shown(name)} is not served (served: {', '.join(sorted(self.indexes)) or 'none'})")
        return self.indexes[name]

    def memory_bytes(self) -> dict[str, int]:
        """Index name -> the bytes it holds in this process (backends that hold nothing here are left out)."""
        return {name: index.memory_bytes() for name, index in list(self.indexes.items())
                if hasattr(index, "memory_bytes")}

    def close(self) -> None:
        for _, batcher in self.batchers.values():
            batcher.close()
        for index in self.indexes.values():
            index.close()  # a fresh snapshot, so the next start replays nothing
