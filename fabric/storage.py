"""A media server's disk storage unit: copies written atomically under one folder.

A copy is written into a `.partial` folder and renamed into place only when complete, so a
crash mid-write leaves nothing that looks like a copy; `recover()` sweeps the leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

IMAGE_FILE = "image.dat"
META_FILE = "meta.json"
PARTIAL = ".partial"


class StorageError(Exception):
    """The storage unit cannot do what was asked (NetBackup status 84/85/2074)."""


class StorageFull(StorageError):
    pass


class StorageDown(StorageError):
    pass


@dataclass
class PendingCopy:
    """A copy being written; `commit()` makes it visible, `discard()` removes it."""

    final: Path
    work: Path
    storage: "DiskStorage"

    def open_image(self) -> BinaryIO:
        self.storage.check_writable()
        return (self.work / IMAGE_FILE).open("wb")

    def write_meta(self, meta: dict) -> None:
        (self.work / META_FILE).write_text(json.dumps(meta, indent=1))

    def commit(self) -> Path:
        self.storage.check_writable()
        with (self.work / IMAGE_FILE).open("rb+") as f:
            os.fsync(f.fileno())
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.work, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class DiskStorage:
    """The folder behind one media server's disk storage unit."""

    def __init__(self, root: Path):
        self.root = root
        self.full = False  # fault injection: the disk refuses writes
        self.down = False  # fault injection: the volume is offline
        root.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        self.check_readable()
        if self.full:
            raise StorageFull(f"disk storage unit {self.root} is full")

    def check_readable(self) -> None:
        if self.down:
            raise StorageDown(f"disk volume {self.root} is down")

    def new_copy(self, name: str) -> PendingCopy:
        self.check_writable()
        final = self.root / name
        work = self.root / f"{name}{PARTIAL}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return PendingCopy(final, work, self)

    def image_file(self, name: str) -> Path:
        self.check_readable()
        path = self.root / name / IMAGE_FILE
        if not path.is_file():
            raise StorageError(f"no copy {name!r} on {self.root}")
        return path

    def read_meta(self, name: str) -> dict:
        self.check_readable()
        try:
            return json.loads((self.root / name / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise StorageError(f"no readable header for {name!r}: {exc}") from None

    def delete(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def recover(self) -> list[str]:
        """After a crash: remove half-written copies. Returns what was swept."""
        swept = []
        for path in self.root.glob(f"*{PARTIAL}"):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path.name)
        return swept
