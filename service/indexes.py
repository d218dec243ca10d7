"""The indexes a server answers for: every folder under --indexes with an index.json.

An index is served only beside the model version whose codes it holds; one
that cannot be opened or whose model is not loaded is reported (ListIndexes,
log) and skipped, like a broken bundle.
"""

from __future__ import annotations

import logging
from pathlib import Path

from index.latent_index import LatentIndex
from service.repository import ModelRepository

log = logging.getLogger("zspace.serve")


class IndexRegistry:
    def __init__(self, root: Path | None, repo: ModelRepository, threads: int = 0):
        self.root, self.repo, self.threads = (Path(root) if root else None), repo, threads
        self.indexes: dict[str, LatentIndex] = {}
        self.broken: dict[str, str] = {}

    def open_all(self) -> None:
        if self.root is None or not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if (p / "index.json").is_file()):
            try:
                index = LatentIndex.open(folder, threads=self.threads)
                model = index.manifest["model"]
                rt = self.repo.get(model["name"], int(model["version"]))  # KeyError if not loaded
                if rt.latent_dim != index.dim:
                    raise ValueError(f"model {rt.name}/{rt.version} has {rt.latent_dim}-d codes, the index {index.dim}")
            except Exception as exc:
                reason = exc.args[0] if isinstance(exc, KeyError) else str(exc)
                self.broken[str(folder)] = f"not served: {reason}"
                log.error("index %s skipped: %s", folder.name, reason)
                continue
            self.indexes[folder.name] = index
            log.info("index %s opened (%s/%s, %s, %s, %d items)", folder.name, model["name"], model["version"],
                     index.factory, index.metric, index.stats()["count"])

    def get(self, name: str) -> LatentIndex:
        if name not in self.indexes:
            raise KeyError(f"index {name!r} is not served (served: {', '.join(sorted(self.indexes)) or 'none'})")
        return self.indexes[name]

    def close(self) -> None:
        for index in self.indexes.values():
            index.close()  # a fresh snapshot, so the next start replays nothing
