"""A client's data: files generated deterministically from the scenario seed, or a real folder.

Generated files begin with a plaintext marker line, so a test watching the wire can tell
whether a client's bytes crossed it in clear.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

MARKER = b"FABRIC-PLAINTEXT-MARKER"


@dataclass(frozen=True)
class SourceFile:
    """One file a client can back up: where it is, and what it was when last hashed."""

    path: str  # relative to the dataset root, with '/'
    size: int
    sha256: str


def marker_line(client: str, path: str) -> bytes:
    return MARKER + b" " + client.encode() + b":" + path.encode() + b"\n"


def _content(seed: int, client: str, path: str, generation: int, size: int) -> bytes:
    head = marker_line(client, path)[:size]
    # shake_128 is a fast deterministic stream (about 500 MB/s here): same seed, same bytes.
    body = hashlib.shake_128(f"{seed}:{client}:{path}:{generation}".encode()).digest(size - len(head)) if size > len(head) else b""
    return head + body


class Dataset:
    """The files under one client's data folder, with their checksums."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, SourceFile] = {}

    @classmethod
    def generate(cls, root: Path, client: str, seed: int, files: int, total_size: int) -> "Dataset":
        """Write `files` files adding up to `total_size` bytes (idempotent for the same inputs)."""
        dataset = cls(root)
        root.mkdir(parents=True, exist_ok=True)
        base, extra = divmod(total_size, files)
        for n in range(files):
            dataset._write(client, seed, f"file{n:05d}.dat", base + (1 if n < extra else 0), 0)
        return dataset

    @classmethod
    def scan(cls, root: Path) -> "Dataset":
        """A real folder: every regular file below it, hashed now."""
        dataset = cls(root)
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            rel = path.relative_to(root).as_posix()
            dataset.files[rel] = SourceFile(rel, path.stat().st_size, digest.hexdigest())
        return dataset

    def mutate(self, client: str, seed: int, count: int, generation: int) -> list[str]:
        """Rewrite `count` existing files (round-robin from the generation) so an incremental has work."""
        names = sorted(self.files)
        changed = [names[(generation * count + i) % len(names)] for i in range(min(count, len(names)))]
        for name in changed:
            self._write(client, seed, name, self.files[name].size, generation)
        return changed

    def _write(self, client: str, seed: int, name: str, size: int, generation: int) -> None:
        data = _content(seed, client, name, generation, size)
        path = self.root / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.files[name] = SourceFile(name, size, hashlib.sha256(data).hexdigest())

    def path_of(self, name: str) -> Path:
        return self.root / name

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())
