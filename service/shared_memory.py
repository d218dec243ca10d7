"""System shared memory regions that local clients register, so big tensors skip the gRPC message.

The KServe v2 shared-memory extension (what Triton serves and `tritonclient.utils.shared_memory`
speaks): a client creates a POSIX shared memory segment (`shm_open` name, `/dev/shm/NAME` on
Linux), registers a named region of it once (key, offset, byte size), and then its requests name
the region, an offset and a size instead of carrying the bytes; outputs can be written into a
region too. zspace.v1's tensors take the same regions (`Tensor.shared`), so one registry serves
both protocols.

Safety, since a client controls the segment:
- only names in /dev/shm are opened (no path, no symbolic link), as regular files, read-write;
- every use checks that the segment is still there (same inode) and still as large as the region:
  touching a mapping beyond the end of a file that was truncated would kill the server (SIGBUS);
  a segment that was removed unregisters its region (it would otherwise stay mapped for ever);
- a request holds its region while it runs: unregistering then takes the name away at once and
  unmaps when the last request using it finishes;
- tensors are copied out of a region before they are queued and answers copied in after, so no
  array outlives the request's hold on its region.
Regions are per server process (with `--workers`, per worker: a client's registration and its
requests travel on one connection, which the kernel gives to one worker).
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from zspace.errors import NotFound, UserError, shown
from zspace.service.rpc import StatusError

log = logging.getLogger("zspace.serve")

SHM_ROOT = Path("/dev/shm")
MAX_REGIONS = 1024       # per server process: each holds a file descriptor and a mapping
MAX_NAME_CHARS = 255


SHARING = ("local", "any", "off")  # who may register regions (zspace serve --shared-memory)


class NotAllowed(StatusError):
    code = grpc.StatusCode.PERMISSION_DENIED


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is on this machine's loopback
    or a Unix socket: the clients that can share our /dev/shm."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    if peer.startswith("ipv4:"):
        return peer[5:].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[5:].rsplit("]", 1)[0].lstrip("[")
        return host == "::1" or host.startswith("::ffff:127.")
    return False


def check_sharing(sharing: str, peer: str) -> None:
    """Refuse a registration that `sharing` does not allow from PEER. A region is another process's memory that
    the server reads and writes: by default only clients on loopback or a Unix socket may name one, so a remote
    client with the token cannot reach the memory of this machine's processes."""
    if sharing == "off":
        raise NotAllowed("shared memory is turned off on this server (zspace serve --shared-memory off); send "
                         "tensors in the messages")
    if sharing == "local" and not is_local_peer(peer):
        raise NotAllowed(f"shared memory is for clients on the server's machine (loopback or a Unix socket); this "
                         f"call came from {shown(peer)} (zspace serve --shared-memory any allows every client)")


class RegionExists(StatusError):
    code = grpc.StatusCode.ALREADY_EXISTS


class SegmentGone(StatusError):
    """The segment behind a region was removed or shrank: the region is unregistered."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class TooManyRegions(StatusError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    inode: tuple[int, int]
    mapping: mmap.mmap
    path: str                 # the segment's file, checked at every use (a string: pathlib costs more per call)
    users: int = 0
    retired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def segment_path(key: str, root: Path = SHM_ROOT) -> Path:
    """The file of a shm_open name ("/name" or "name"): one component under /dev/shm, nothing else."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or "\0" in name or len(name) > MAX_NAME_CHARS:
        raise UserError(f"key: {shown(key)} is not a shared memory name (expected '/NAME', one component of at "
                              f"most {MAX_NAME_CHARS} characters, as shm_open takes)")
    return root / name


class SharedMemoryRegistry:
    """Named regions of system shared memory for this server process; every method is thread-safe."""

    def __init__(self, root: Path = SHM_ROOT, max_regions: int = MAX_REGIONS):
        self.root, self.max_regions = Path(root), max_regions
        self.regions: dict[str, Region] = {}
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- registration

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise UserError(f"name: expected 1 to {MAX_NAME_CHARS} printable characters, got {shown(name)}")
        if byte_size < 1:
            raise UserError(f"byte_size: expected a positive size of the region, got {byte_size}")
        path = segment_path(key, self.root)
        with self.lock:
            if name in self.regions:
                raise RegionExists(f"shared memory region {shown(name)} is already registered (key "
                                   f"{shown(self.regions[name].key)}); unregister it first or choose another name")
            if len(self.regions) >= self.max_regions:
                raise TooManyRegions(f"{len(self.regions)} shared memory regions are registered, the most this "
                                     "server holds; unregister some")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                raise NotFound(f"key: no shared memory segment {shown(key)} on the server's machine (is the client "
                               "on another machine or in another container?)") from None
            except OSError as exc:
                raise UserError(f"key: cannot open shared memory segment {shown(key)} ({exc.strerror})") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise UserError(f"key: {shown(key)} is not a shared memory segment")
                if offset + byte_size > st.st_size:
                    raise UserError(f"offset + byte_size: {offset} + {byte_size} is past the end of segment "
                                          f"{shown(key)} ({st.st_size} bytes)")
                mapping = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            region = Region(name, key, offset, byte_size, fd, (st.st_dev, st.st_ino), mapping, str(path))
            self.regions[name] = region
        return region

    def status(self, name: str = "") -> list[Region]:
        """Every region (or the one named), after dropping those whose segment is gone."""
        for region in list(self.regions.values()):
            if self._gone(region):
                self._retire(region, "its segment was removed")
        if name:
            return [self.get(name)]
        return sorted(self.regions.values(), key=lambda r: r.name)

    def unregister(self, name: str = "") -> None:
        """The named region, or every one ("", as Triton does). A region in use is unmapped when its requests end."""
        regions = list(self.regions.values()) if not name else [self.get(name)]
        for region in regions:
            self._retire(region, "unregistered")

    def get(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None:
            raise NotFound(f"shared memory region {shown(name)} is not registered "
                           f"({len(self.regions)} registered)")
        return region

    def close(self) -> None:
        self.unregister()

    # ---------------------------------------------------------------- use

    @contextmanager
    def hold(self, name: str, field_name: str):
        """Region NAME, kept mapped while the block runs (unregistering meanwhile unmaps it after)."""
        with self.lock:
            region = self.get(name)
            region.users += 1
        try:
            if self._gone(region):
                self._retire(region, "its segment was removed")
                raise SegmentGone(f"{field_name}: the segment {shown(region.key)} of shared memory region "
                                  f"{shown(name)} was removed; the region is unregistered")
            yield region
        finally:
            with self.lock:
                region.users -= 1
                done = region.retired and region.users == 0
            if done:
                self._unmap(region)

    def read(self, name: str, offset: int, byte_size: int, dtype: str, field_name: str) -> np.ndarray:
        """A private copy of BYTE_SIZE bytes at OFFSET of region NAME, as a flat array of DTYPE."""
        with self.hold(name, field_name) as region:
            start = self._span(region, offset, byte_size, field_name)
            view = np.frombuffer(region.mapping, dtype=np.uint8, count=byte_size, offset=start)
            try:
                return view.copy().view(dtype)
            finally:
                del view  # the mapping can be closed only when no array looks at it

    def write(self, name: str, offset: int, room: int, data: np.ndarray, field_name: str) -> None:
        """DATA's bytes into region NAME at OFFSET, where the caller said there are ROOM bytes."""
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if flat.nbytes > room:
            raise UserError(f"{field_name}: the answer is {flat.nbytes} bytes, the shared memory given for it "
                                  f"holds {room}")
        with self.hold(name, field_name) as region:
            start = self._span(region, offset, flat.nbytes, field_name)
            view = np.frombuffer(region.mapping, dtype=np.uint8, count=flat.nbytes, offset=start)
            try:
                view[:] = flat
            finally:
                del view

    def _span(self, region: Region, offset: int, byte_size: int, field_name: str) -> int:
        """Where OFFSET..OFFSET+BYTE_SIZE of the region starts in its mapping; checked against the region, and
        against the segment's size now (a segment truncated since registration would fault, not fail)."""
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise UserError(f"{field_name}: {byte_size} bytes at offset {offset} do not fit shared memory region "
                                  f"{shown(region.name)} of {region.byte_size} bytes")
        if os.fstat(region.fd).st_size < region.offset + region.byte_size:
            self._retire(region, "its segment shrank")
            raise SegmentGone(f"{field_name}: the segment {shown(region.key)} of shared memory region "
                              f"{shown(region.name)} is now smaller than the region; the region is unregistered")
        return region.offset + offset

    def _gone(self, region: Region) -> bool:
        try:
            st = os.stat(region.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != region.inode

    def _retire(self, region: Region, why: str) -> None:
        with self.lock:
            if self.regions.get(region.name) is region:
                del self.regions[region.name]
            if region.retired:
                return
            region.retired = True
            idle = region.users == 0
        log.info("shared memory region %s (%s) %s", shown(region.name), shown(region.key), why)
        if idle:
            self._unmap(region)

    def _unmap(self, region: Region) -> None:
        with region.lock:
            if region.fd < 0:
                return
            region.mapping.close()
            os.close(region.fd)
            region.fd = -1


# The regions of this process. Like its file descriptors they belong to the process, not to one object: both
# protocols' handlers and the tensor readers (inputs.tensor_to_array) share them, and the server closes them.
REGIONS = SharedMemoryRegistry()
