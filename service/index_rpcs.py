"""The index RPCs of zspace.v1.ZSpace: Search, Upsert, Delete, GetItem, ListIndexes, IndexStats.

Dependencies are explicit: the indexes served (IndexRegistry), the model
repository that encodes raw inputs with each index's own model, the limits.
FAISS and SQLite calls block, so they run in threads (searches through the
registry's batchers); the index itself serialises writes and lets searches
run together.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from zspace.index.contract import check_key
from zspace.index.errors import IndexMoved
from zspace.index.filters import MAX_IN_VALUES, Condition, Filter, as_filter, check_field, check_scalar, condition
from zspace.service.config import Limits
from zspace.service.indexes import IndexRegistry
from zspace.service.inputs import (
    InvalidArgument,
    array_to_tensor,
    features,
    input_rows,
    parse_json,
    parse_payloads,
    tensor_to_array,
)
from zspace.service.repository import ModelRepository
from zspace.service.rpc import RpcHandlers, TooLarge, rpc
from zspace.v1 import zspace_pb2 as pb

MAX_NAME_CHARS = 255  # an index is a folder: its name is a file name
OPERATORS = {pb.Condition.EQ: "==", pb.Condition.NE: "!=", pb.Condition.IN: "in", pb.Condition.LT: "<",
             pb.Condition.LE: "<=", pb.Condition.GT: ">", pb.Condition.GE: ">="}
MAX_VALUE_JSON = 64 * MAX_IN_VALUES  # one condition's value_json: an IN of the most values, each a short scalar


def request_filter(request) -> Filter:
    """A SearchRequest's filter, checked: the old single equality (filter_field, filter_value_json) and the
    structured `filter` (conditions, AND), both holding when both are given. Errors name the part."""
    conditions = []
    if request.filter_field:
        value = parse_json(request.filter_value_json, "filter_value_json", 4096)
        check_field(request.filter_field, "filter_field")
        check_scalar(value, "filter_value_json")
        conditions.append(Condition(request.filter_field, "==", value))
    for i, c in enumerate(request.filter.all):
        part = f"filter.all[{i}]"
        if c.op not in OPERATORS:
            raise InvalidArgument(f"{part}.op: unknown operator {c.op}; expected EQ, NE, IN, LT, LE, GT or GE")
        if not c.value_json:
            raise InvalidArgument(f"{part}.value_json: empty; give a JSON value, as 3 or \"coat\" (IN: [1, 2])")
        value = parse_json(c.value_json, f"{part}.value_json", MAX_VALUE_JSON)
        conditions.append(condition(c.field, OPERATORS[c.op], value, part))
    return as_filter(conditions)


def search_response(results: list[list[tuple[str, float, str]]]) -> pb.SearchResponse:
    """Hits -> SearchResponse, filled in place: half the time of building each Hit and copying it in."""
    response = pb.SearchResponse()
    for hits in results:
        add = response.results.add().hits.add
        for key, distance, payload in hits:
            add(key=key, distance=distance, payload_json=payload)
    return response


class IndexRpcs(RpcHandlers):
    RPCS = ("ListIndexes", "IndexStats", "Search", "Upsert", "Delete", "GetItem")

    def __init__(self, indexes: IndexRegistry, repo: ModelRepository, limits: Limits, metrics=None, admission=None):
        super().__init__(metrics, admission)
        self.indexes, self.repo, self.limits = indexes, repo, limits

    def label(self, request) -> str:
        """The model of the index a request names (its codes are that model's), for metrics."""
        index = self.indexes.indexes.get(getattr(request, "index", ""))
        return index.model[0] if index is not None else ""

    def _index_info(self, name: str, index) -> pb.IndexInfo:
        st = index.stats()
        return pb.IndexInfo(name=name, model=st["model"]["name"], model_version=st["model"]["version"], dim=st["dim"],
                            metric=st["metric"], factory=st["factory"], count=st["count"], trained=st["trained"],
                            note=st["training_note"] or "", fields=st.get("fields", []),
                            memory_bytes=st.get("memory_bytes", 0))

    def _index(self, name: str):
        if not name:
            raise InvalidArgument("index: required (see ListIndexes)")
        if len(name) > MAX_NAME_CHARS:
            raise InvalidArgument(f"index: {len(name)} characters, over the limit of {MAX_NAME_CHARS}")
        return self.indexes.get(name)

    async def _query_codes(self, index, request, which: str) -> np.ndarray:
        """The `inputs` (encoded by the index's model, VAE kinds: means; into a hamming index: a hash
        model's packed bits) or `vectors` field of a request, as codes."""
        binary = index.binary
        if which == "inputs":
            rt = self.repo.get(*index.model)
            x = await features(rt, request.inputs, "inputs", self.limits)
            if binary:
                if not rt.is_hash:
                    raise InvalidArgument(f"index: a hamming index of {rt.name}/{rt.version}, which is not a hash model")
                return await rt.bits(x)
            return (await rt.encode(x))[0]
        if binary and request.vectors.dtype == pb.UINT8:  # packed bits, as Encode's `bits` answers them
            return tensor_to_array(request.vectors, "vectors", cols=index.dim // 8, max_rows=self.limits.max_rows,
                                   raw_uint8=True)
        if not binary and request.vectors.dtype == pb.UINT8:
            raise InvalidArgument(f"vectors.dtype: UINT8 (packed bits) is for hamming indexes; this index holds "
                                  f"float codes (metric {index.metric}): send FLOAT32 or FLOAT16")
        return tensor_to_array(request.vectors, "vectors", cols=index.dim, max_rows=self.limits.max_rows)

    @rpc
    async def ListIndexes(self, request, context):
        infos = [self._index_info(n, ix) for n, ix in sorted(self.indexes.indexes.items())]
        broken = [pb.BrokenModel(path=p, error=e) for p, e in sorted(self.indexes.broken.items())]
        return pb.ListIndexesResponse(indexes=infos, broken=broken)

    @rpc
    async def IndexStats(self, request, context):
        return self._index_info(request.index, self._index(request.index))

    @rpc
    async def Search(self, request, context):
        index = self._index(request.index)
        if not 1 <= request.k <= self.limits.max_k:
            raise InvalidArgument(f"k: expected 1 to {self.limits.max_k}, got {request.k}")
        which = request.WhichOneof("query")
        if which not in ("inputs", "vectors", "key"):
            raise InvalidArgument("query: set one of inputs, vectors or key")
        # Everything cheap is checked before anything is decoded or read: the hits asked for, the filter.
        rows = self._query_rows(request, which)
        if rows * request.k > self.limits.max_hits:
            raise InvalidArgument(f"k: {rows} queries x k={request.k} is {rows * request.k} hits, over the limit of "
                                  f"{self.limits.max_hits}; send fewer queries per request or a smaller k")
        where = request_filter(request)
        if which == "key":  # LatentIndex.get checks the key (empty, too long) and names the field
            q = (await asyncio.to_thread(index.get, request.key)).vector[None]
        else:
            q = await self._query_codes(index, request, which)
        if not where:
            results = await self.indexes.search(request.index, q, int(request.k))
        else:
            results = await asyncio.to_thread(index.search, q, int(request.k), where, as_json=True)
        response = search_response(self._bounded(results))
        if request.explain:
            response.plan_json = json.dumps(await asyncio.to_thread(index.explain, where, int(request.k)))
        return response

    async def _write(self, name: str, write):
        """Run `write(index)` in a thread on the index served as `name`, and return that index.

        When the index's folder was replaced since it was opened, the write is refused by the
        index (IndexMoved: nothing written), the new folder is opened in its place, and the
        write goes there; if that one moved too, IndexMoved reaches the client as UNAVAILABLE."""
        index = self._index(name)
        try:
            await asyncio.to_thread(write, index)
        except IndexMoved:  # NOT_FOUND when the folder is gone, or holds nothing we can serve
            index = await asyncio.to_thread(self.indexes.reopen, name)
            await asyncio.to_thread(write, index)
        return index

    @staticmethod
    def _query_rows(request, which: str) -> int:
        """Queries in a Search, from the request's fields alone."""
        if which == "key":
            return 1
        if which == "vectors":
            return max(0, int(request.vectors.shape[0])) if len(request.vectors.shape) else 0
        return input_rows(request.inputs)

    def _bounded(self, results: list) -> list:
        """The hits, if their answer fits the message limit; measured on the stored JSON texts before any is copied."""
        size = sum(len(h.key) + len(h.payload) + 16 for row in results for h in row)
        if size > self.limits.max_answer_bytes:
            raise TooLarge(f"Search: the answer would be {size >> 20} MiB, over the message limit of "
                           f"{self.limits.max_answer_bytes >> 20} MiB; ask for fewer queries or a smaller k")
        return results

    @rpc
    async def Upsert(self, request, context):
        index = self._index(request.index)
        keys = list(request.keys)
        which = request.WhichOneof("items")
        if which is None:
            raise InvalidArgument("items: set inputs or vectors")
        # Keys and payloads are checked before any image is decoded: a mistake there costs nothing.
        rows = input_rows(request.inputs) if which == "inputs" else self._query_rows(request, "vectors")
        if len(keys) != rows:
            raise InvalidArgument(f"keys: {len(keys)} keys for {rows} items; give one key per item")
        for i, key in enumerate(keys):
            check_key(key, f"keys[{i}]")
        payloads = parse_payloads(list(request.payloads_json), len(keys))
        codes = await self._query_codes(index, request, which)
        if len(keys) != len(codes):
            raise InvalidArgument(f"keys: {len(keys)} keys for {len(codes)} items; give one key per item")
        index = await self._write(request.index, lambda ix: ix.upsert(keys, codes, payloads))
        return pb.UpsertResponse(count=index.stats()["count"])

    @rpc
    async def Delete(self, request, context):
        index = self._index(request.index)
        keys = list(request.keys)
        if not keys:
            raise InvalidArgument("keys: give at least one key")
        index = await self._write(request.index, lambda ix: ix.delete(keys))  # checks each key and names it
        return pb.DeleteResponse(count=index.stats()["count"])

    @rpc
    async def GetItem(self, request, context):
        index = self._index(request.index)
        item = await asyncio.to_thread(index.get, request.key)  # checks the key
        if index.binary:  # bits travel packed, as Encode answers them
            vector = array_to_tensor(np.packbits(item.vector[None] > 0.5, axis=1), pb.UINT8)
        else:
            vector = array_to_tensor(item.vector[None])
        return pb.Item(key=item.key, vector=vector, payload_json=json.dumps(item.payload))
