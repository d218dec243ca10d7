"""Bulk import of codes computed elsewhere: `zspace index import --model --codes --keys [--payloads] --out`.

A user who encoded a collection on another machine (or with the bundle's ONNX encoder in their
own pipeline) brings three files in the same row order: codes.npy [n, latent_dim], keys.txt
(one key per line) and optionally payloads.jsonl (one JSON object per line). Everything is
checked as an upsert is (keys, payloads, payload index types), a batch at a time, and the index
is made whole or not at all (index/backends.py): a failed import leaves nothing behind.

The codes file is memory-mapped and read a batch at a time, and keys and payloads are read as
lines, so an import's memory is the index being built plus one batch.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from zspace.bundle import load_bundle, resolve_bundle
from zspace.errors import shown
from zspace.index import backends
from zspace.index.contract import IndexSpec, LatentCodeIndex, as_codes, check_key, payload_json
from zspace.index.errors import IndexError_
from zspace.index.fields import FieldSpec, extract, field_specs
from zspace.progress import Progress

BATCH = 50_000
PARSE_ELSEWHERE_FROM = 200_000  # items from which payloads are parsed in other processes
PARSERS = 2  # parsing processes: with one, this process waited for it a third of the time (two cores)


def import_codes(model_ref: Path, codes_path: Path, keys_path: Path, payloads_path: Path | None, out: Path,
                 spec: IndexSpec = IndexSpec(), quiet: bool = False) -> LatentCodeIndex:
    """A new index at `out` holding the given codes, keys and payloads; the index, open."""
    out = Path(out)
    if (out / "index.json").exists():
        raise IndexError_(f"{out}: an index already exists here")
    backends.backend_class(spec.backend).check_spec(spec, out)
    bundle = load_bundle(resolve_bundle(model_ref))
    metric = spec.metric or ("hamming" if bundle.is_hash else "cosine" if bundle.modality == "text" else "l2")
    codes = read_codes(Path(codes_path), bundle.latent_dim, metric == "hamming")
    n = len(codes)
    keys = count_lines(Path(keys_path), "--keys")
    if keys != n:
        raise IndexError_(f"--keys: {keys} lines, but --codes holds {n} rows; give one key per code, same order")
    if payloads_path is not None and (rows := count_lines(Path(payloads_path), "--payloads")) != n:
        raise IndexError_(f"--payloads: {rows} lines, but --codes holds {n} rows; one JSON object per code, same order")

    specs = field_specs(spec.fields)

    def fill(index: LatentCodeIndex) -> None:
        bar = None if quiet else Progress(-(-n // BATCH), "import")
        seen: set[str] = set()
        bulk = hasattr(index, "import_new")  # the FAISS backend: bulk SQLite inserts, payload dicts not needed
        lines = read_lines(Path(payloads_path)) if payloads_path is not None else None
        # Payload lines are parsed and checked in PARSERS other processes while this one writes the batches
        # before: JSON is most of an import's Python time, and the GIL would serialise it with the writes here.
        parser = ProcessPoolExecutor(PARSERS, mp_context=_fork) \
            if bulk and lines is not None and n >= PARSE_ELSEWHERE_FROM and (_fork := forking_context()) else None
        try:
            batches = enumerate_batches(read_keys(Path(keys_path)), BATCH)
            ahead = deque()
            while len(ahead) < (PARSERS if parser else 1) and (first := _parse(parser, next(batches, None), lines,
                                                                                specs, not bulk)):
                ahead.append(first)
            while ahead:
                (start, key_batch), parsed = ahead.popleft()
                if (following := _parse(parser, next(batches, None), lines, specs, not bulk)) is not None:
                    ahead.append(following)  # parsed meanwhile
                texts, values, payloads = parsed.result()
                vectors = _checked(index, start, key_batch, codes, seen)
                try:
                    if bulk:
                        index.import_new(key_batch, vectors, values, texts)
                    else:
                        index.upsert(key_batch, vectors, payloads, maintain=False)
                except IndexError_ as exc:
                    raise IndexError_(_with_rows(str(exc), start)) from None
                if bar:
                    bar.update(note=f"{start + len(key_batch):,} items")
        finally:
            if parser is not None:
                parser.shutdown(cancel_futures=True)
        if bar:
            bar.close(f"{n:,} items")
        index.finish_build()

    return backends.build(out, spec, (bundle.name, bundle.version), bundle.latent_dim, metric, fill)


def forking_context():
    """multiprocessing's fork context where forking is safe here, else None (the import parses in-process).

    Fork, not spawn: spawn re-runs the caller's main script in the child, which a script without an
    `if __name__ == "__main__"` guard turns into an error. Forking is safe while this process runs one
    Python thread (the child only parses JSON: it touches no lock another thread could hold)."""
    if "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return None
    return multiprocessing.get_context("fork")


def _parse(parser, batch, lines, specs: list[FieldSpec], dicts: bool):
    """((start, keys), a future of parse_lines for the batch's payload lines), or None after the last batch."""
    if batch is None:
        return None
    start, keys = batch
    raw = [next(lines) for _ in keys] if lines is not None else None
    if parser is not None:
        return batch, parser.submit(parse_lines, raw, start, specs, dicts, keys)
    done: Future = Future()
    try:
        done.set_result(parse_lines(raw, start, specs, dicts, keys))
    except IndexError_ as exc:
        done.set_exception(exc)
    return batch, done


def parse_lines(raw: list[bytes] | None, start: int, specs: list[FieldSpec], dicts: bool,
                keys: list[str]) -> tuple[list[str], dict[str, list], list[dict] | None]:
    """A batch's keys and payload lines checked as an upsert checks them: (the payloads' JSON texts, the
    declared fields' values, the payloads themselves when `dicts`). No lines: empty payloads, one per key.
    Errors name the line."""
    try:  # each key's form here; a key given twice is found by the importing process, which sees them all
        for i, key in enumerate(keys):
            check_key(key, f"keys[{i}]")
    except IndexError_ as exc:
        raise IndexError_(_with_rows(str(exc), start)) from None
    count = len(keys)
    if raw is None:
        return ["{}"] * count, {s.name: [None] * count for s in specs}, [{} for _ in range(count)] if dicts else None
    payloads = []
    for i, line in enumerate(raw):
        try:
            payload = json.loads(line.decode())  # str: json would sniff the bytes' encoding every line
        except ValueError as exc:  # UnicodeDecodeError included
            raise IndexError_(f"--payloads line {start + i + 1}: not JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise IndexError_(f"--payloads line {start + i + 1}: expected a JSON object, got {type(payload).__name__}")
        payloads.append(payload)
    try:
        texts = [payload_json(p, f"payloads[{i}]") for i, p in enumerate(payloads)]
        values = extract(specs, payloads)
    except IndexError_ as exc:
        raise IndexError_(_with_rows(str(exc), start)) from None
    return texts, values, payloads if dicts else None


def _checked(index: LatentCodeIndex, start: int, keys: list[str], codes: np.ndarray, seen: set[str]) -> np.ndarray:
    """A batch's keys unique in the whole file, and its codes checked as an upsert's; the codes as float32."""
    for i, key in enumerate(keys):
        if key in seen:
            raise IndexError_(f"--keys line {start + i + 1}: {shown(key)} appears earlier in the file; keys are unique")
        seen.add(key)
    try:  # the keys themselves were checked with their batch's payloads (parse_lines)
        vectors = as_codes(np.asarray(codes[start:start + len(keys)]), index.dim, index.binary, "--codes")
        if not np.isfinite(vectors).all():
            row = int(np.flatnonzero(~np.isfinite(vectors).all(1))[0])
            raise IndexError_(f"--codes row {start + row}: NaN or infinity")
    except IndexError_ as exc:
        raise IndexError_(_with_rows(str(exc), start)) from None
    return vectors


def read_codes(path: Path, dim: int, binary: bool) -> np.ndarray:
    """codes.npy, memory-mapped, its shape checked against the model's latent width."""
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexError_(f"--codes: {path} is not a .npy array ({exc})") from None
    width = dim // 8 if binary and codes.dtype == np.uint8 else dim
    if codes.ndim != 2 or codes.shape[1] != width:
        raise IndexError_(f"--codes: shape {list(codes.shape)}, but the model's codes are [n, {width}]"
                          + (" (packed bits)" if width != dim else ""))
    if not (np.issubdtype(codes.dtype, np.floating) or codes.dtype == np.uint8):
        raise IndexError_(f"--codes: dtype {codes.dtype}; expected float32 or float64 codes (hash models: uint8 bits)")
    return codes


def count_lines(path: Path, part: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + _unterminated(path)
    except OSError as exc:
        raise IndexError_(f"{part}: cannot read {path} ({exc.strerror})") from None


def _unterminated(path: Path) -> int:
    """1 when the file's last line has no newline (it still counts as a line)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return 0
        f.seek(-1, 2)
        return int(f.read(1) != b"\n")


def read_keys(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict", newline="\n") as f:
        for number, line in enumerate(f, 1):
            key = line[:-1] if line.endswith("\n") else line
            if key.endswith("\r"):
                key = key[:-1]
            if not key:
                raise IndexError_(f"--keys line {number}: empty; every code needs a key")
            yield key


def read_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from f


def enumerate_batches(items: Iterator[str], size: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the batch's first item, the batch) for consecutive batches of `size`."""
    batch, start = [], 0
    try:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield start, batch
                start += size
                batch = []
    except UnicodeDecodeError as exc:
        raise IndexError_(f"--keys: not UTF-8 after line {start + len(batch)} ({exc.reason})") from None
    if batch:
        yield start, batch


def _with_rows(message: str, start: int) -> str:
    """'payloads[3].year: ...' of a batch starting at row `start` -> '--payloads line 12, year: ...'."""
    for part, flag in (("keys", "--keys"), ("payloads", "--payloads")):
        if message.startswith(f"{part}[") and "]" in message:
            i = int(message[len(part) + 1:message.index("]")])
            rest = message[message.index("]") + 1:]
            return f"{flag} line {start + i + 1}{', ' + rest[1:] if rest.startswith('.') else rest}"
    return message
