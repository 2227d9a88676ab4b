"""Benchmark of the REST API at scale: one Catalog-view page filtered by DTE mode and one PATCH, over real HTTP.

Run: python scripts/bench_api.py [--images 1000000] [--state DIR] [--runs 20] [--page 50]; the catalog
(images from scripts/bench_catalog.py, plus one copy each and a second for every fifth) is built in
DIR/hosts/primary1/catalog.sqlite (default: a temporary folder, removed afterwards; an existing one
is reused), served by `fabric serve --state DIR` in its own process, and timed from this one with a
keep-alive HTTP connection. Targets: a page under 50 ms, a PATCH under 5 ms (median). Exit 1 if missed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_catalog import CLIENTS, Measurement, build, random_backup_ids, report  # noqa: E402

from fabric.api import NB_CONTENT_TYPE, TOKEN_FILE, URL_FILE  # noqa: E402
from fabric.catalog import Catalog  # noqa: E402

LIST_TARGET_MS = 50.0
PATCH_TARGET_MS = 5.0
PRIMARY = "primary1"


def add_copies(path: Path) -> float:
    """Copy 1 of every image on one of four media servers, and a copy 2 for every fifth:
    the page's copy lists cost what they would in a real catalog."""
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO copies SELECT backup_id, 1, 'media' || (rowid % 4), '/storage/' || backup_id, image_dte_mode, "
                 "image_dte_mode, NULL, backup_time, 1 FROM images")
    conn.execute("INSERT INTO copies SELECT backup_id, 2, 'media-dr', '/storage/dr/' || backup_id, image_dte_mode, "
                 "image_dte_mode, 1, backup_time + 60, 0 FROM images WHERE rowid % 5 = 0")
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - started


def prepare(state: Path, count: int, seed: int) -> Path:
    catalog_path = state / "hosts" / PRIMARY / "catalog.sqlite"
    catalog_path.parent.mkdir(parents=True, exist_ok=True)
    existing = 0
    if catalog_path.exists():
        with Catalog.open(catalog_path) as catalog:
            existing = catalog.count_images()
    if existing:
        print(f"reusing {catalog_path} with {existing:,} images")
        return catalog_path
    seconds = build(catalog_path, count, seed)
    seconds += add_copies(catalog_path)
    print(f"built {count:,} images with their copies in {seconds:.1f} s ({catalog_path.stat().st_size / 1e6:.0f} MB)")
    return catalog_path


class Client:
    """One keep-alive connection, as a Catalog page or an admin tool would hold."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self.base = parts.path
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.auth = {"Authorization": f"Bearer {token}"}

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[float, int, dict, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        sent = {**self.auth, **(headers or {}), **({"Content-Type": NB_CONTENT_TYPE} if data else {})}
        started = time.perf_counter()
        self.conn.request(method, self.base + path, body=data, headers=sent)
        response = self.conn.getresponse()
        payload = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        return elapsed, response.status, dict(response.getheaders()), payload


def timed_get(client: Client, path: str, params: dict[str, str], expect_items: int | None = None) -> float:
    elapsed, status, _, payload = client.request("GET", f"{path}?{urlencode(params)}")
    if status != 200:
        raise SystemExit(f"GET {path} answered {status}: {payload[:200]!r}")
    if expect_items is not None and len(json.loads(payload)["data"]) != expect_items:
        raise SystemExit(f"GET {path} returned a short page")
    return elapsed


def measure(client: Client, catalog_path: Path, runs: int, page: int, seed: int) -> list[Measurement]:
    rng = random.Random(seed + 1)
    results = []
    for _ in range(3):  # warm the server's connection and page cache
        timed_get(client, "/catalog/images", {"dteMode": "ON", "page[limit]": str(page)})

    results.append(Measurement(
        f"GET /catalog/images dteMode=OFF, {page} per page, first page",
        [timed_get(client, "/catalog/images", {"dteMode": "OFF", "page[limit]": str(page)}, page) for _ in range(runs)],
        LIST_TARGET_MS,
    ))
    cursors = random_backup_ids(catalog_path, runs, rng, "AND image_dte_mode = 'on'")
    results.append(Measurement(
        f"GET /catalog/images dteMode=ON, {page} per page, after a random cursor",
        [timed_get(client, "/catalog/images", {"dteMode": "ON", "page[limit]": str(page), "page[after]": c}) for c in cursors],
        LIST_TARGET_MS,
    ))
    cursors = random_backup_ids(catalog_path, runs, rng)
    clients = [f"client{rng.randrange(CLIENTS):04d}" for _ in range(runs)]
    results.append(Measurement(
        f"GET /catalog/images filter=client+dteMode, {page} per page, after a random cursor",
        [timed_get(client, "/catalog/images", {"filter": f"clientName eq '{who}' and imageDteMode eq 'OFF'",
                                               "page[limit]": str(page), "page[after]": c}) for c, who in zip(cursors, clients)],
        LIST_TARGET_MS,
    ))

    samples = []
    for backup_id in random_backup_ids(catalog_path, runs, rng):
        _, status, headers, payload = client.request("GET", f"/catalog/images/{backup_id}")
        mode = json.loads(payload)["data"]["attributes"]["imageDteMode"]
        flipped = "OFF" if mode == "ON" else "ON"
        body = {"data": {"type": "image", "id": backup_id, "attributes": {"dteMode": flipped}}}
        elapsed, status, _, payload = client.request("PATCH", f"/catalog/images/{backup_id}", body, {"If-Match": headers["ETag"]})
        if status != 200 or json.loads(payload)["data"]["attributes"]["imageDteMode"] != flipped:
            raise SystemExit(f"PATCH {backup_id} answered {status}: {payload[:200]!r}")
        samples.append(elapsed)
    results.append(Measurement("PATCH /catalog/images/{id} with If-Match (audit row, updated image back)", samples, PATCH_TARGET_MS))
    return results


def serve(state: Path) -> tuple[subprocess.Popen, str, str]:
    url_file = state / "hosts" / PRIMARY / URL_FILE
    url_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "fabric.cli", "serve", "--state", str(state), "--primary-host", PRIMARY],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (url_file.exists() and url_file.read_text().strip()):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"fabric serve did not start: {server.communicate()[1][-500:]}")
        time.sleep(0.05)
    return server, url_file.read_text().strip(), (state / TOKEN_FILE).read_text().strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000, help="images to build (default 1,000,000)")
    parser.add_argument("--state", type=Path, help="state folder to build or reuse (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=20, help="samples per measurement (default 20)")
    parser.add_argument("--page", type=int, default=50, help="images per page (default 50)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        state = args.state or Path(tmp)
        catalog_path = prepare(state, args.images, args.seed)
        server, url, token = serve(state)
        try:
            print(f"serving {url} (fabric serve, its own process)")
            results = measure(Client(url, token), catalog_path, args.runs, args.page, args.seed)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)

    return report(results)


if __name__ == "__main__":
    sys.exit(main())
