"""The backup image stream: files as they cross a data leg, and as a media server stores them.

On the wire each file is one JSON header frame then its content in frames; on disk a copy
is the same sequence with a 4-byte length before each header (`image.dat`).

The daemons of `fabric run` share one event loop, so the receiver of a copy does not write
the disk itself: it hands each chunk to its `out` (a storage.ImageWriter, which writes and
syncs in a thread of its own) and awaits only that writer's `drain()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Protocol

CHUNK = 1 << 20
_LEN = struct.Struct(">I")


class StreamError(Exception):
    """The stream broke its own format (a peer bug or a corrupted copy)."""


class FrameLeg(Protocol):
    async def send_frame(self, payload: bytes) -> None: ...
    async def send_end(self) -> None: ...
    async def recv_frame(self) -> bytes | None: ...


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def header(self) -> bytes:
        return json.dumps({"path": self.path, "size": self.size, "sha256": self.sha256}).encode()

    @classmethod
    def from_header(cls, raw: bytes) -> "FileEntry":
        try:
            obj = json.loads(raw)
            entry = cls(str(obj["path"]), int(obj["size"]), str(obj["sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamError(f"bad file header: {exc}") from None
        if entry.size < 0 or entry.path.startswith("/") or ".." in entry.path.split("/"):
            raise StreamError(f"unsafe file header: {entry.path!r}")
        return entry


# -- sending ---------------------------------------------------------------------------


async def send_files(leg: FrameLeg, root: Path, entries: Iterable[FileEntry]) -> int:
    """Send files from a folder (a client's data). Returns the content bytes sent."""
    total = 0
    for entry in entries:
        await leg.send_frame(entry.header())
        with (root / entry.path).open("rb") as f:
            total += await _send_content(leg, f, entry.size)
    await leg.send_end()
    return total


async def send_image(leg: FrameLeg, image_file: Path) -> int:
    """Send a stored copy (media server to client, or to another media server)."""
    total = 0
    with image_file.open("rb") as f:
        for entry in _read_headers(f):
            await leg.send_frame(entry.header())
            total += await _send_content(leg, f, entry.size)
    await leg.send_end()
    return total


async def send_metadata(leg: FrameLeg, payload: dict) -> None:
    """Catalog information (verify, import): one JSON frame."""
    await leg.send_frame(json.dumps(payload).encode())
    await leg.send_end()


async def _send_content(leg: FrameLeg, f: BinaryIO, size: int) -> int:
    send_file = getattr(leg, "send_file", None)
    if send_file is not None:  # a channel leg: zero-copy on plaintext legs
        if os.fstat(f.fileno()).st_size - f.tell() < size:
            raise StreamError("a file shrank while it was being sent")
        await send_file(f, size)
        return size
    return await _send_chunks(leg, f, size)


async def _send_chunks(leg: FrameLeg, f: BinaryIO, size: int) -> int:
    # Read on the loop: reading the next chunk in a worker thread while this one is on the
    # wire was measured (scripts/bench_datapath.py) and gained nothing, the thread hand-off
    # costing about what the read of a cached 1 MiB costs.
    left = size
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise StreamError("a file shrank while it was being sent")
        await leg.send_frame(chunk)
        left -= len(chunk)
    return size


def _read_headers(f: BinaryIO):
    """Walk an image.dat, yielding each entry with `f` positioned at its content."""
    while raw_len := f.read(_LEN.size):
        if len(raw_len) != _LEN.size:
            raise StreamError("truncated copy")
        (length,) = _LEN.unpack(raw_len)
        entry = FileEntry.from_header(f.read(length))
        yield entry


# -- receiving -------------------------------------------------------------------------


class ImageOut(Protocol):
    """Where a received copy goes: any binary file; a storage.ImageWriter also has the
    two coroutines, so the disk never blocks the event loop."""

    def write(self, data: bytes) -> int: ...


async def receive_image(leg: FrameLeg, out: ImageOut, hash_files: bool = False) -> tuple[list[FileEntry], int]:
    """Store the stream as an image.dat. The sender's checksums are kept as recorded;
    with `hash_files` they are recomputed (a duplication must not trust a bad copy).

    When `out` has `drain()` and `finish()` (storage.ImageWriter), every write is followed
    by `await out.drain()`, and the copy is written out and fsynced (`await out.finish()`)
    before this returns."""
    drain = getattr(out, "drain", None)
    finish = getattr(out, "finish", None)
    entries, total = [], 0
    async for entry, chunks in _entries(leg):
        header = entry.header()
        out.write(_LEN.pack(len(header)) + header)
        digest = hashlib.sha256() if hash_files else None
        async for chunk in chunks:
            out.write(chunk)
            if drain is not None:
                await drain()
            if digest:
                digest.update(chunk)
            total += len(chunk)
        if digest and digest.hexdigest() != entry.sha256:
            raise StreamError(f"{entry.path}: checksum differs from the source's")
        entries.append(entry)
    if finish is not None:
        await finish()
    return entries, total


async def receive_to_folder(leg: FrameLeg, folder: Path) -> tuple[list[FileEntry], int]:
    """A restore: write each file under `folder`, hashing what was really written."""
    entries, total = [], 0
    async for entry, chunks in _entries(leg):
        target = folder / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with target.open("wb") as f:
            async for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                total += len(chunk)
        entries.append(FileEntry(entry.path, entry.size, digest.hexdigest()))
    return entries, total


async def receive_metadata(leg: FrameLeg) -> dict:
    frame = await leg.recv_frame()
    if frame is None:
        raise StreamError("no catalog information was sent")
    if await leg.recv_frame() is not None:
        raise StreamError("more than one catalog information frame")
    try:
        return json.loads(frame)
    except ValueError as exc:
        raise StreamError(f"bad catalog information: {exc}") from None


async def _entries(leg: FrameLeg):
    while (header := await leg.recv_frame()) is not None:
        entry = FileEntry.from_header(header)
        yield entry, _content(leg, entry.size)


async def _content(leg: FrameLeg, size: int):
    left = size
    while left:
        chunk = await leg.recv_frame()
        if chunk is None or len(chunk) > left:
            raise StreamError("a file's content ended early or ran over its size")
        left -= len(chunk)
        yield chunk


# -- reading a stored copy -------------------------------------------------------------


def image_checksums(image_file: Path) -> list[FileEntry]:
    """Read a stored copy back and hash every file (verify, import)."""
    out = []
    with image_file.open("rb") as f:
        for entry in _read_headers(f):
            digest, left = hashlib.sha256(), entry.size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise StreamError(f"{entry.path}: the copy is truncated")
                digest.update(chunk)
                left -= len(chunk)
            out.append(FileEntry(entry.path, entry.size, digest.hexdigest()))
    return out


def merge_images(sources: list[Path], out: BinaryIO) -> list[FileEntry]:
    """Synthesize: the newest version of every file across a full and its incrementals
    (later sources win), written as one image.dat."""
    latest: dict[str, tuple[Path, int, FileEntry]] = {}
    for source in sources:
        with source.open("rb") as f:
            for entry in _read_headers(f):
                latest[entry.path] = (source, f.tell(), entry)
                f.seek(entry.size, 1)
    entries = []
    for path in sorted(latest):
        source, offset, entry = latest[path]
        header = entry.header()
        out.write(_LEN.pack(len(header)))
        out.write(header)
        with source.open("rb") as f:
            f.seek(offset)
            left = entry.size
            while left:
                chunk = f.read(min(CHUNK, left))
                out.write(chunk)
                left -= len(chunk)
        entries.append(entry)
    return entries
