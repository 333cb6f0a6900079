"""Triton's system shared-memory extension: tensors passed through POSIX shared memory instead of the message.

A client on the same host (a sidecar in the pod) creates a shared-memory object (``shm_open``, e.g. with
``tritonclient.utils.shared_memory``), registers a region of it by name, and then names the region in an input's or
requested output's ``shared_memory_region`` / ``shared_memory_byte_size`` / ``shared_memory_offset`` parameters.
A 1.8 MB tensor then crosses no socket and no protobuf: the request is a few hundred bytes.

Design choices, each for a bound or a failure mode:

- **Off unless ``--allow-client-shm``** (Triton's flag and default): a registered key lets a network client read
  and write any shared-memory object the server's user can open.
- **No mapping.** Each use opens the object, reads or writes with ``pread``/``pwrite`` and closes it. A mapped
  object that its owner truncates raises SIGBUS in the server on the next access (a crash a client could cause);
  ``pread`` past the end returns short instead, which we refuse. A registration holds no descriptor and no memory.
- **One registry per server, on disk.** ``--workers N`` processes share the port and the kernel spreads
  connections, not calls: a client that registers on one worker and reconnects (idle or age limits) lands on
  another. Every worker reads the same directory (private to the server, 0700); ``flock`` orders registrations.
- **Bounded**: at most :data:`MAX_REGIONS` regions of at most ``--max-shm-mb`` together (an output written into a
  sparse object allocates its pages, charged to the server), names and keys of at most 255 bytes, and a call reads
  at most ``--max-message-mb`` from shared memory, counted against ``--max-inflight-mb`` like a message's bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from optic.server.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted

SHM_DIR = Path("/dev/shm")  # where glibc's shm_open keeps POSIX shared-memory objects on Linux
MAX_REGIONS = 256
DEFAULT_MAX_BYTES = 1 << 30  # --max-shm-mb: bytes of all registered regions together
KEPT_READ_BYTES = 64 << 20  # read buffers kept for the next call of the same size
MAX_NAME_BYTES = 255
DISABLED = "client shared memory is off: start the server with --allow-client-shm to use it"


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class TensorRef:
    """Where one input or output lives: ``byte_size`` bytes at ``offset`` into a registered region."""

    tensor: str
    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class Placed:
    """A tensor's reference resolved to its registered region once per call, before any work: the call then reads
    and writes where it started, whatever is unregistered or registered again meanwhile."""

    ref: TensorRef
    region: Region

    @property
    def start(self) -> int:
        return self.region.offset + self.ref.offset


def _bounded(what: str, value: str) -> str:
    if not value or len(value.encode()) > MAX_NAME_BYTES or "\0" in value:
        raise InvalidArgument(f"{what} must be 1 to {MAX_NAME_BYTES} bytes without NUL, got {value[:64]!r}")
    return value


def object_path(key: str, shm_dir: Path = SHM_DIR) -> Path:
    """The file ``shm_open(key)`` names, with glibc's rules: leading slashes dropped, no other slash."""
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", "..") or "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"shared-memory key {key[:64]!r} must be one name of 1 to {MAX_NAME_BYTES} bytes, like '/input0' "
            "(no other '/', not '.' or '..')"
        )
    return shm_dir / name


@contextlib.contextmanager
def _opened(path: Path, key: str, write: bool) -> Iterator[int]:
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NotFound(f"no shared-memory object with key {key[:64]!r}") from None
    except PermissionError:
        raise PermissionDenied(f"the server may not open shared-memory object {key[:64]!r} to read and write") from None
    except OSError as exc:  # a symlink (O_NOFOLLOW), a directory, too many open files...
        raise InvalidArgument(f"cannot open shared-memory object {key[:64]!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO opens (O_NONBLOCK: without waiting) and is refused here
            raise InvalidArgument(f"{key[:64]!r} is not a shared-memory object")
        yield fd
    finally:
        os.close(fd)


class SharedMemoryRegistry:
    """The regions clients registered, in ``directory`` (one JSON file per region, named by the name's hash).

    Registering and unregistering take an exclusive ``flock`` (callers run them off the event loop); lookups read
    one small file and take no lock (files are replaced atomically).
    """

    def __init__(
        self,
        directory: Path,
        shm_dir: Path = SHM_DIR,
        max_regions: int = MAX_REGIONS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.directory, self.shm_dir = directory, shm_dir
        self.max_regions, self.max_bytes = max_regions, max_bytes
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A fresh buffer's pages fault in one by one as the read fills them (a mapping of its own above the mmap
        # threshold, or heap pages handed back every 5 s: app.py): 0.7 ms of a 1.77 MB detector input's 1.17 ms
        # read, measured with a 1 MiB threshold. Kept buffers are in memory. Event loop only; KEPT_READ_BYTES kept.
        self._regions_seen: dict[str, tuple[tuple[int, int], Region]] = {}  # get()'s cache
        self._kept: dict[int, list[np.ndarray]] = {}
        self._kept_bytes = 0

    def _file(self, name: str) -> Path:
        return self.directory / (hashlib.sha256(name.encode()).hexdigest() + ".json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _regions(self) -> list[Path]:
        return sorted(self.directory.glob("*.json"))

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        _bounded("region name", name)
        path = object_path(key, self.shm_dir)
        if byte_size <= 0:
            raise InvalidArgument(f"region {name[:64]!r}: byte_size must be positive")
        with _opened(path, key, write=True) as fd:  # read and write, as Triton opens it: refused now, not later
            size = os.fstat(fd).st_size
        if offset + byte_size > size:
            raise InvalidArgument(
                f"region {name[:64]!r}: offset {offset} + byte_size {byte_size} is past the end of "
                f"shared-memory object {key[:64]!r} ({size} bytes)"
            )
        with self._locked():
            target = self._file(name)
            if target.exists():
                raise AlreadyExists(f"shared-memory region {name[:64]!r} is already registered")
            regions = self.status()
            if len(regions) >= self.max_regions:
                raise ResourceExhausted(
                    f"the server holds its limit of {self.max_regions} shared-memory regions; unregister some first"
                )
            held = sum(r.byte_size for r in regions)
            if held + byte_size > self.max_bytes:  # outputs written into a sparse object are the server's memory
                raise ResourceExhausted(
                    f"regions would hold {(held + byte_size) / 2**20:.1f} MB; the server allows "
                    f"{self.max_bytes / 2**20:g} MB of registered regions (--max-shm-mb)"
                )
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(Region(name, key, offset, byte_size))))
            tmp.replace(target)

    def unregister(self, name: str) -> None:
        """Forget one region, or every region when ``name`` is empty (Triton's rule). Unknown names are no error.
        Calls that resolved a region before it was unregistered finish with it."""
        with self._locked():
            for path in self._regions() if not name else [self._file(name)]:
                path.unlink(missing_ok=True)

    def status(self, name: str = "") -> list[Region]:
        if name:
            return [self.get(name)]
        regions = []
        for path in self._regions():
            with contextlib.suppress(FileNotFoundError):  # unregistered while we listed
                regions.append(Region(**json.loads(path.read_text())))
        return regions

    def get(self, name: str) -> Region:
        """One ``stat`` per call; the file is read again only when it is a new one (registered again: a new
        inode, as every registration writes a new file and renames it into place)."""
        path = self._file(name)
        try:
            info = os.stat(path)
            identity = (info.st_ino, info.st_mtime_ns)
            cached = self._regions_seen.get(name)
            if cached is not None and cached[0] == identity:
                return cached[1]
            region = Region(**json.loads(path.read_text()))
        except FileNotFoundError:
            self._regions_seen.pop(name, None)
            raise NotFound(f"no shared-memory region named {name[:64]!r} is registered") from None
        if len(self._regions_seen) >= 2 * self.max_regions:  # names unregistered and never asked for again
            self._regions_seen.clear()
        self._regions_seen[name] = (identity, region)
        return region

    def place(self, ref: TensorRef, what: str) -> Placed:
        """Resolve a reference to its region and check that it lies inside it (``what``: input or output)."""
        region = self.get(ref.region)
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidArgument(
                f"{what} {ref.tensor[:64]!r}: offset {ref.offset} + byte_size {ref.byte_size} is past the end of "
                f"region {ref.region[:64]!r} ({region.byte_size} bytes)"
            )
        return Placed(ref, region)

    def read(self, placed: Placed) -> np.ndarray:
        """The input's bytes, read into a fresh buffer (never a view: the client may overwrite the region). Done on
        the caller's thread: at most --max-message-mb, as gRPC parses a message of that size on the event loop."""
        ref, key = placed.ref, placed.region.key
        kept = self._kept.get(ref.byte_size)
        if kept:
            data = kept.pop()
            self._kept_bytes -= data.nbytes
        else:
            data = np.empty(ref.byte_size, dtype=np.uint8)
        view, start = data.data, placed.start
        with _opened(object_path(key, self.shm_dir), key, write=False) as fd:
            while view:  # one read returns at most ~2 GiB on Linux
                got = os.preadv(fd, [view], start)
                if got == 0:
                    raise InvalidArgument(
                        f"input {ref.tensor[:64]!r}: shared-memory object {key[:64]!r} now ends before the region does"
                    )
                view, start = view[got:], start + got
        return data

    def recycle(self, buffers: Iterable[np.ndarray]) -> None:
        """Keep the buffers of a finished call's inputs for the next call (only once nothing can read them: after
        the call's model run, never after an error, when its batch may still be running)."""
        for buffer in buffers:
            if self._kept_bytes + buffer.nbytes <= KEPT_READ_BYTES:
                self._kept.setdefault(buffer.nbytes, []).append(buffer)
                self._kept_bytes += buffer.nbytes

    def write(self, placed: Placed, data: bytes) -> None:
        ref, key = placed.ref, placed.region.key
        if len(data) > ref.byte_size:
            raise InvalidArgument(
                f"output {ref.tensor[:64]!r} is {len(data)} bytes; its shared_memory_byte_size is {ref.byte_size}"
            )
        start = placed.start
        with _opened(object_path(key, self.shm_dir), key, write=True) as fd:
            # pwrite past the end would grow the client's object. Best effort: an object truncated between this
            # check and the write does grow (back to the region's end at most).
            if os.fstat(fd).st_size < start + len(data):
                raise InvalidArgument(
                    f"output {ref.tensor[:64]!r}: shared-memory object {key[:64]!r} now ends before the region does"
                )
            view = memoryview(data)
            while view:
                try:
                    written = os.pwrite(fd, view, start)
                except OSError as exc:  # ENOSPC: the object was sparse and /dev/shm is full
                    raise ResourceExhausted(f"output {ref.tensor[:64]!r}: {exc.strerror}") from None
                view, start = view[written:], start + written
