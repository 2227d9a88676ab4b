"""Benchmark of the catalog at scale: one Catalog-view page and one image DTE mode change on N images.

Run: python scripts/bench_catalog.py [--images 1000000] [--db FILE] [--runs 20]; without --db the
catalog is built in a temporary file and removed afterwards; an existing --db with images is reused.
"""

from __future__ import annotations

import argparse
import logging
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import structlog

from fabric.catalog import Catalog
from fabric.dte import DteMode

T0 = 1_700_000_000
CLIENTS = 1000
BATCH = 100_000
LIST_TARGET_MS = 50.0
UPDATE_TARGET_MS = 5.0


@dataclass(frozen=True)
class Measurement:
    name: str
    samples_ms: list[float]
    target_ms: float | None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def met(self) -> bool:
        return self.target_ms is None or self.median_ms < self.target_ms


def image_rows(count: int, seed: int) -> Iterator[tuple]:
    """Rows in the column order of the images table, oldest first: about three images a
    second from 1,000 clients, 70 % of them with DTE mode On."""
    rng = random.Random(seed)
    for i in range(count):
        client = f"client{i % CLIENTS:04d}"
        backup_time = T0 + i // 3
        mode = DteMode.ON.value if rng.random() < 0.7 else DteMode.OFF.value
        size = rng.randrange(1 << 20, 1 << 30)
        yield (f"{client}_{backup_time:010d}", client, "standard", "full" if i % 7 == 0 else "incremental",
               backup_time, mode, size, rng.randrange(1, 5000), i + 1, None, None, backup_time + 14 * 86400, 1)


def build(path: Path, count: int, seed: int) -> float:
    """Fill the catalog's images table directly, in big transactions: the product's
    commit_backup does one transaction per image, far too slow to make a million."""
    Catalog.open(path).close()  # the product creates the schema
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    rows = image_rows(count, seed)
    done = 0
    while done < count:
        batch = [row for _, row in zip(range(BATCH), rows)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
        conn.execute("COMMIT")
        done += len(batch)
        print(f"\r  built {done:,} / {count:,} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - started


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def random_backup_ids(path: Path, count: int, rng: random.Random, where: str = "") -> list[str]:
    with sqlite3.connect(path) as conn:
        highest = conn.execute("SELECT MAX(rowid) FROM images").fetchone()[0]
        found: list[str] = []
        while len(found) < count:
            row = conn.execute(f"SELECT backup_id FROM images WHERE rowid >= ? {where} LIMIT 1", (rng.randint(1, highest),)).fetchone()
            if row:
                found.append(row[0])
        return found


def measure(path: Path, runs: int, seed: int) -> list[Measurement]:
    rng = random.Random(seed + 1)
    results: list[Measurement] = []
    with Catalog.open(path) as catalog:
        catalog.list_images(dte_mode=DteMode.ON)  # warm the connection's caches once

        results.append(Measurement(
            "list 50, dte_mode=off, first page",
            [timed(lambda: catalog.list_images(dte_mode=DteMode.OFF, limit=50)) for _ in range(runs)],
            LIST_TARGET_MS,
        ))
        cursors = random_backup_ids(path, runs, rng, "AND image_dte_mode = 'on'")
        results.append(Measurement(
            "list 50, dte_mode=on, after a random cursor",
            [timed(lambda c=c: catalog.list_images(dte_mode=DteMode.ON, limit=50, after=c)) for c in cursors],
            LIST_TARGET_MS,
        ))
        cursors = random_backup_ids(path, runs, rng)
        clients = [f"client{rng.randrange(CLIENTS):04d}" for _ in range(runs)]
        results.append(Measurement(
            "list 50, client + dte_mode=off, after a random cursor",
            [timed(lambda c=c, who=who: catalog.list_images(client=who, dte_mode=DteMode.OFF, limit=50, after=c)) for c, who in zip(cursors, clients)],
            LIST_TARGET_MS,
        ))

        targets = random_backup_ids(path, runs, rng)
        samples = []
        for backup_id in targets:
            image = catalog.get_image(backup_id)
            assert image is not None
            flipped = DteMode.OFF if image.image_dte_mode is DteMode.ON else DteMode.ON
            samples.append(timed(lambda: catalog.set_image_dte_mode(backup_id, flipped, "bench", if_revision=image.revision)))
        results.append(Measurement("set_image_dte_mode (with audit row)", samples, UPDATE_TARGET_MS))

        results.append(Measurement("count_images(dte_mode=on) (no target)", [timed(lambda: catalog.count_images(dte_mode=DteMode.ON)) for _ in range(3)], None))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000, help="images to build (default 1,000,000)")
    parser.add_argument("--db", type=Path, help="catalog file to build or reuse (default: a temporary file)")
    parser.add_argument("--runs", type=int, default=20, help="samples per measurement (default 20)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp:
        path = args.db or Path(tmp) / "catalog.db"
        existing = 0
        if path.exists():
            with Catalog.open(path) as catalog:
                existing = catalog.count_images()
        if existing:
            print(f"reusing {path} with {existing:,} images")
        else:
            seconds = build(path, args.images, args.seed)
            print(f"built {args.images:,} images in {seconds:.1f} s ({path.stat().st_size / 1e6:.0f} MB)")
        results = measure(path, args.runs, args.seed)

    return report(results)


def report(results: list[Measurement]) -> int:
    """Print the measurements against their targets; the exit status says whether all were met."""
    width = max(len(r.name) for r in results)
    print(f"{'measurement':<{width}}  median ms   max ms  target")
    for r in results:
        target = "-" if r.target_ms is None else f"< {r.target_ms:g} ms {'ok' if r.met else 'MISSED'}"
        print(f"{r.name:<{width}}  {r.median_ms:9.3f}  {max(r.samples_ms):7.3f}  {target}")
    return 0 if all(r.met for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
