"""storage.ImageWriter: a copy written by its own thread, with the event loop never waiting on the disk."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from fabric.storage import DiskStorage, ImageWriter


def chunks(n: int, size: int = 64 * 1024) -> list[bytes]:
    return [bytes([i % 251]) * size for i in range(n)]


async def test_writes_drains_and_finishes_in_order(tmp_path):
    data = chunks(40)
    writer = ImageWriter(tmp_path / "image.dat", high_water=256 * 1024, writeback_every=512 * 1024)
    with writer as out:
        for chunk in data:
            out.write(chunk)
            await out.drain()
        out.write(bytearray(b"tail"))
        await out.finish()
        assert out.closed
    assert (tmp_path / "image.dat").read_bytes() == b"".join(data) + b"tail"


async def test_leaving_on_an_exception_drops_the_queue(tmp_path):
    with pytest.raises(RuntimeError):
        with ImageWriter(tmp_path / "image.dat", high_water=1 << 30) as out:
            for chunk in chunks(200):
                out.write(chunk)
            raise RuntimeError("the leg broke")
    assert out.closed
    assert (tmp_path / "image.dat").stat().st_size <= 200 * 64 * 1024


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_full_disk_reaches_the_receiver():
    out = ImageWriter(Path("/dev/full"))  # every write fails with ENOSPC
    out.write(b"x" * 1024)
    with pytest.raises(OSError) as failure:
        await out.finish()
    assert failure.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        out.write(b"more")
    out.abort()
    assert out.closed


async def test_writes_from_another_thread_wait_for_the_disk(tmp_path):
    data = chunks(64)
    out = ImageWriter(tmp_path / "image.dat", high_water=128 * 1024)
    seen: list[int] = []

    def produce() -> None:  # what a synthesis does in a worker thread
        for chunk in data:
            out.write(chunk)
            seen.append(out._queued)

    await asyncio.to_thread(produce)
    out.close()
    assert max(seen) <= 128 * 1024 + 64 * 1024
    assert (tmp_path / "image.dat").read_bytes() == b"".join(data)
    assert not [t for t in threading.enumerate() if t.name.startswith("image-writer")]


async def test_commit_after_finish_makes_the_copy_visible(tmp_path):
    storage = DiskStorage(tmp_path / "storage")
    pending = storage.new_copy("c1")
    with pending.open_image() as out:
        out.write(b"payload")
        await out.drain()
        await out.finish()
    final = pending.commit()
    assert (final / "image.dat").read_bytes() == b"payload"
    assert storage.recover() == []
