"""What the web explorer (/ui) reads beyond zspace.v1's operations: an index's map, what a point
looks like, and a model's manifest and training figures.

- The map (`zspace index map` writes map.npz beside the index) is kept current here: every
  request first applies the item store's changes since the map's position (index/maps.py,
  `update`), so items written through any process appear on it; the process that writes the
  index's snapshots also writes the updated map back. Rows never move (deleted items leave
  an empty row), so a row number the browser holds keeps naming its item.
- Points travel as raw float32 (x, y) pairs, colours and filter matches as bytes: a million
  points are 8 MB of positions, not 30 MB of JSON.
- A point's view is its stored image when its payload names a file under one of the
  server's `--media-root` folders, else the model's reconstruction of its code (a PNG), and
  for documents the heaviest words of the decoded distribution.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web

from zspace.errors import NotFound, shown
from zspace.index.filters import as_filter
from zspace.index.maps import MAP_FILE, LatentMap, load_map, save_map, update
from zspace.service.http import json_answer, read_json
from zspace.service.http_api import integer, top_words
from zspace.service.inputs import InvalidArgument
from zspace.transforms import is_png_or_jpeg

MEDIA_FIELDS = ("image", "path", "file", "source")  # payload fields that may name an item's stored image
MAX_MEDIA_BYTES = 16 << 20
MAX_VIEWS = 64           # items one view request may ask for
MAX_CATEGORIES = 20      # colour categories; the rest are "other"
OTHER, MISSING = 254, 255


@dataclass
class KeptMap:
    map: LatentMap
    file: tuple                      # the map file's identity when read or written (a rerun of `index map` changes it)
    colours: dict = field(default_factory=dict)  # (field, seq, rows) -> answer
    lock: threading.Lock = field(default_factory=threading.Lock)


def file_state(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def colour_codes(values: list, field_name: str) -> dict:
    """A field's values per map row as colour data: categories (at most MAX_CATEGORIES, the most common) or,
    for numbers of many distinct values, the numbers themselves."""
    present = [v for v in values if v is not None]
    if not present:
        raise InvalidArgument(f"field: no item on the map has a field {shown(field_name)}")
    numeric = all(isinstance(v, (int, float)) for v in present)
    counts = Counter(present)
    if numeric and len(counts) > MAX_CATEGORIES:
        arr = np.array([np.nan if v is None else v for v in values], np.float32)
        return {"field": field_name, "kind": "number", "min": float(np.nanmin(arr)), "max": float(np.nanmax(arr)),
                "values": base64.b64encode(arr.tobytes()).decode()}
    top = [v for v, _ in counts.most_common(MAX_CATEGORIES)]
    labels = sorted(top, key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
    code_of = {v: i for i, v in enumerate(labels)}
    codes = np.fromiter((MISSING if v is None else code_of.get(v, OTHER) for v in values), np.uint8, len(values))
    return {"field": field_name, "kind": "category", "labels": labels, "counts": [counts[v] for v in labels],
            "other": len(present) - sum(counts[v] for v in labels), "missing": len(values) - len(present),
            "codes": base64.b64encode(codes.tobytes()).decode()}


class ExplorerRoutes:
    """The explorer's endpoints. writes: this process writes the indexes' snapshots (and so the maps)."""

    def __init__(self, indexes, repo, media_roots: tuple[Path, ...] = (), writes: bool = True):
        self.indexes, self.repo, self.writes = indexes, repo, writes
        self.media_roots = tuple(Path(os.path.realpath(r)) for r in media_roots)
        self.kept: dict[str, KeptMap] = {}
        self._lock = threading.Lock()

    def routes(self) -> list[web.RouteDef]:
        i, m = "/v1/indexes/{index}", "/v1/models/{model}"
        return [web.get(i + "/map", self.map_info), web.get(i + "/map/points", self.map_points),
                web.get(i + "/map/colours", self.map_colours), web.get(i + "/map/mask", self.map_mask),
                web.get(i + "/map/rows/{row}", self.map_row), web.get(i + "/map/find", self.map_find),
                web.post(i + "/views", self.views),
                web.get(m + "/manifest", self.manifest), web.get(m + "/figures/{file}", self.figure)]

    # -------------------------------------------------------------- the map, kept current

    def _index(self, name: str):
        index = self.indexes.get(name)
        if getattr(index, "store", None) is None:
            raise InvalidArgument(f"index: {shown(name)} is a {index.manifest.get('backend', 'faiss')} index; maps are "
                                  "made for FAISS indexes")
        return index

    def current(self, name: str) -> LatentMap:
        """The index's map, brought up to the item store's latest change (runs in a thread)."""
        index = self._index(name)
        path = Path(index.path) / MAP_FILE
        try:
            state = file_state(path)
        except FileNotFoundError:
            raise NotFound(f"index {shown(name)} has no map yet; make one with: zspace index map {index.path}") from None
        with self._lock:
            kept = self.kept.get(name)
            if kept is None or kept.file != state:
                kept = self.kept[name] = KeptMap(load_map(index.path), state)
        with kept.lock:
            store = index.store
            if store.last_seq() > kept.map.seq:
                kept.map = update(kept.map, store.changes_since(kept.map.seq), lambda ids: store.entries_of(ids)[:2])
                kept.colours.clear()
                if self.writes:
                    save_map(index.path, kept.map)
                    kept.file = file_state(path)
            return kept.map

    async def map_info(self, request):
        m = await asyncio.to_thread(self.current, request.match_info["index"])
        return json_answer(m.info())

    async def map_points(self, request):
        m = await asyncio.to_thread(self.current, request.match_info["index"])
        data = await asyncio.to_thread(lambda: np.ascontiguousarray(m.xy, "<f4").tobytes())
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"X-Map-Rows": str(len(m.ids)), "X-Map-Seq": str(m.seq), "Cache-Control": "no-store"})

    async def map_colours(self, request):
        name, field_name = request.match_info["index"], request.query.get("field", "")
        if not field_name:
            raise InvalidArgument("field: required (a payload field, e.g. ?field=label)")

        def colours():
            m = self.current(name)
            kept = self.kept[name]
            key = (field_name, m.seq, len(m.ids))
            if key not in kept.colours:
                ids, values = self._index(name).store.field_values(field_name)  # sorted by id
                per_row = [None] * len(m.ids)
                if len(ids):
                    pos = np.clip(np.searchsorted(ids, m.ids), 0, len(ids) - 1)
                    for row in np.flatnonzero((m.ids >= 0) & (ids[pos] == m.ids)).tolist():
                        per_row[row] = values[pos[row]]
                kept.colours = {key: colour_codes(per_row, field_name)}
            return kept.colours[key]

        return json_answer(await asyncio.to_thread(colours))

    async def map_mask(self, request):
        name = request.match_info["index"]
        where = as_filter(request.query.getall("where", []), "where")

        def mask():
            m = self.current(name)
            matches = self._index(name).matching(where)
            rows = np.zeros(len(m.ids), bool)
            ok = (m.ids >= 0) & (m.ids < len(matches))
            rows[ok] = matches[m.ids[ok]]
            return rows

        rows = await asyncio.to_thread(mask)
        return web.Response(body=np.packbits(rows, bitorder="little").tobytes(), content_type="application/octet-stream",
                            headers={"X-Map-Rows": str(len(rows)), "X-Matches": str(int(rows.sum())),
                                     "Cache-Control": "no-store"})

    async def map_row(self, request):
        name = request.match_info["index"]
        row = integer(request.match_info["row"], "row")
        m = await asyncio.to_thread(self.current, name)
        if not 0 <= row < len(m.ids) or m.ids[row] < 0:
            raise NotFound(f"row: {row} is not an item on the map of {shown(name)} (it has {len(m.ids)} rows; a "
                           "deleted item's row is empty)")
        found = await asyncio.to_thread(self._index(name).store.rows_of, [int(m.ids[row])])
        if not found:
            raise NotFound(f"row: the item of row {row} was deleted meanwhile")
        key = next(iter(found.values()))[0]
        view = (await self._views(name, [key]))[0]
        return json_answer({"row": row, "x": float(m.xy[row, 0]), "y": float(m.xy[row, 1]), **view})

    async def map_find(self, request):
        """The map row of an item key (a shared URL names its selection by key)."""
        name, key = request.match_info["index"], request.query.get("key", "")
        m = await asyncio.to_thread(self.current, name)
        item = await asyncio.to_thread(self.indexes.get(name).get, key)  # checks the key; NotFound names it
        rows = np.flatnonzero(m.ids == item.id)
        if not len(rows):
            raise NotFound(f"key: {shown(key)} is not on the map yet")
        return json_answer({"row": int(rows[0]), "key": key})

    # -------------------------------------------------------------- what an item looks like

    async def views(self, request):
        body = await read_json(request)
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidArgument("keys: expected a list of item keys")
        if not 1 <= len(keys) <= MAX_VIEWS:
            raise InvalidArgument(f"keys: expected 1 to {MAX_VIEWS} keys, got {len(keys)}")
        return json_answer({"views": await self._views(request.match_info["index"], keys)})

    async def _views(self, name: str, keys: list[str]) -> list[dict]:
        """Per key: the payload, and an image (stored, or the decoded code) or the decoded document's words."""
        index = self.indexes.get(name)
        items = await asyncio.to_thread(lambda: [index.get(k) for k in keys])  # checks each key, NotFound names it
        views = [{"key": it.key, "payload": it.payload} for it in items]
        stored = await asyncio.to_thread(lambda: [self._stored_image(it.payload) for it in items])
        todo = [i for i, s in enumerate(stored) if s is None]
        for i, s in enumerate(stored):
            if s is not None:
                views[i].update(image=base64.b64encode(s[1]).decode(), image_source=s[0])
        if todo:
            rt = self.repo.get(*index.model)
            x_hat = await rt.decode(np.stack([items[i].vector for i in todo]).astype(np.float32))
            if rt.modality == "image":
                pngs = await asyncio.to_thread(lambda: [rt.transform.to_png(r) for r in x_hat])
                for i, png in zip(todo, pngs):
                    views[i].update(image=base64.b64encode(png).decode(), image_source="decoded")
            elif rt.modality == "text":
                for i, words in zip(todo, top_words(x_hat, rt.transform.vocab, 12)):
                    views[i]["words"] = words
        return views

    def _stored_image(self, payload: dict) -> tuple[str, bytes] | None:
        """(payload field, file bytes) of the first image a payload names under a media root; None otherwise.

        Only files inside a --media-root (after resolving links) are read, and only PNG or JPEG:
        a payload is data anyone with write access wrote, and must not be a way to read the server's files."""
        if not self.media_roots:
            return None
        for name in MEDIA_FIELDS:
            value = payload.get(name)
            if not isinstance(value, str) or not value or "\x00" in value:
                continue
            for root in self.media_roots:
                path = Path(os.path.realpath(root / value))
                if path != root and root not in path.parents:
                    continue
                try:
                    if not path.is_file() or path.stat().st_size > MAX_MEDIA_BYTES:
                        continue
                    data = path.read_bytes()
                except OSError:
                    continue
                if is_png_or_jpeg(data):
                    return name, data
        return None

    # -------------------------------------------------------------- a model's manifest and figures

    def _bundle(self, request):
        version = integer(request.query.get("version"), "version")
        return self.repo.get(request.match_info["model"], version).bundle

    async def manifest(self, request):
        bundle = self._bundle(request)
        figures = sorted(p.name for p in Path(bundle.path).glob("*.png"))
        return json_answer({"name": bundle.name, "version": bundle.version, "manifest": bundle.manifest,
                            "figures": figures})

    async def figure(self, request):
        bundle = self._bundle(request)
        name = request.match_info["file"]
        figures = {p.name for p in Path(bundle.path).glob("*.png")}
        if name not in figures:
            raise NotFound(f"file: {shown(name)} is not a figure of {bundle.name}/{bundle.version} "
                           f"(figures: {', '.join(sorted(figures)) or 'none'})")
        return web.FileResponse(Path(bundle.path) / name, headers={"Cache-Control": "no-cache"})
