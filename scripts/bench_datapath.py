"""Benchmark of the backup data path: one backup through the live fabric, DTE on and DTE off,
next to the bare asyncio TCP and TLS pumps of scripts/bench_channel.py, in one process and one run.

Run: python scripts/bench_datapath.py [--size 256MiB] [--files 16] [--rounds 3] [--no-check]

The fabric (embedded broker, primary, media server, two 10.5 clients) starts once; the
clients generate their data then, outside the timing. Each round runs, interleaved, the bare
TCP pump, a backup of the client with DTE_CLIENT_MODE Off (plaintext under Preferred On),
the bare TLS pump and a backup of the client on Automatic (encrypted under Preferred On).
A backup's time is the primary's job wall time from dispatch to end (the report's
`seconds`); the wall time around `Fabric.run_step` (bus request and reply included) is
shown next to it. Throughput is payload bytes / seconds, MB = 10^6 bytes, median of the
rounds. Exits 1 when fabric/bare (job seconds) is below --target for either mode.

Each stored copy is deleted from the media server's disk once timed (the catalog keeps its
image): kept, every round would write into never-used memory, which on a VM costs a host
page fault per page and, here, made 256 MiB page-cache writes 0.05 s -> 0.65 s after ~1 GiB.
--profile FILE writes a cProfile of the fabric jobs (the event loop's thread only).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the pumps of bench_channel.py, next to this file

from bench_channel import bare_pump  # noqa: E402

from fabric.datastream import CHUNK  # noqa: E402
from fabric.logs import configure  # noqa: E402
from fabric.pki import DomainCA  # noqa: E402
from fabric.scenario.loader import parse_scenario  # noqa: E402
from fabric.scenario.run import Fabric  # noqa: E402

SCENARIO = """
name: bench-datapath
description: One 10.5 client encrypting under Preferred On, one set to DTE Off, one media server.
seed: 11
global_dte_mode: preferred_on
hosts:
  primary1: {{role: primary, version: "10.5"}}
  media1:   {{role: media,   version: "10.5", dte_mode: on}}
  dte-on:   {{role: client,  version: "10.5", dte_mode: automatic, data: {{files: {files}, size: {size}}}}}
  dte-off:  {{role: client,  version: "10.5", dte_mode: off,       data: {{files: {files}, size: {size}}}}}
steps:
{steps}
"""
STEP = """  - backup: {{client: dte-{mode}, media: media1}}
    expect: {{status: 0, dte: {mode}}}
"""
ORDER = ("bare tcp", "fabric dte=off", "bare tls", "fabric dte=on")
PAIRS = (("dte=off", "fabric dte=off", "bare tcp"), ("dte=on", "fabric dte=on", "bare tls"))


@dataclass
class Samples:
    total: int = 0
    seconds: list[float] = field(default_factory=list)  # job wall time (fabric) or pump time (bare)
    wall: list[float] = field(default_factory=list)  # around run_step (fabric only)

    def mb_per_s(self, values: list[float] | None = None) -> float:
        return self.total / statistics.median(values or self.seconds) / 1e6


async def run(size: str, files: int, rounds: int, parent: str | None,
              profile: cProfile.Profile | None = None) -> dict[str, Samples]:
    state = Path(tempfile.mkdtemp(prefix="bench-datapath-", dir=parent))
    steps = "".join(STEP.format(mode=mode) for _ in range(rounds) for mode in ("off", "on"))
    scenario = parse_scenario(SCENARIO.format(files=files, size=size, steps=steps), "<bench-datapath>")
    fabric = Fabric(scenario, state / "fabric")
    samples = {name: Samples() for name in ORDER}
    try:
        ca = DomainCA.create("bench", state / "bare")
        media, client = ca.issue("media1", state / "bare"), ca.issue("web1", state / "bare")
        await fabric.start()  # data generation happens here, outside every timing
        payload = sum(fabric.daemons[name].dataset.total_bytes for name in ("dte-on", "dte-off")) // 2
        chunk = bytes(range(256)) * (CHUNK // 256)
        bare_total = payload // len(chunk) * len(chunk)  # the bare pumps send whole chunks
        samples["bare tcp"].total = samples["bare tls"].total = bare_total
        samples["fabric dte=off"].total = samples["fabric dte=on"].total = payload
        jobs = iter(scenario.steps)
        for _ in range(rounds):  # interleaved: the machine's noise hits every path alike
            for name in ORDER:
                os.sync()  # the data generation's (or the last pump's) dirty pages are not this run's cost
                if name.startswith("bare"):
                    tls = name == "bare tls"
                    timing = await bare_pump(bare_total, chunk, media if tls else None, client if tls else None)
                    samples[name].seconds.append(timing.seconds)
                    continue
                step = next(jobs)
                # The bare pumps send from memory; give the fabric's client its files in the
                # page cache too (this VM's host drops page caches from time to time, which
                # turned a DTE-off ratio of 0.87 into 0.58 between two identical runs).
                for path in fabric.daemons[step.client].dataset.root.iterdir():
                    path.read_bytes()
                if profile:
                    profile.enable()
                started = time.perf_counter()
                report = await fabric.run_step(step)
                wall = time.perf_counter() - started
                if profile:
                    profile.disable()
                if report.status != 0 or report.expect != "met" or report.bytes != payload:
                    raise RuntimeError(f"{name}: status {report.status}, dte {report.dte_mode}, {report.bytes} bytes: "
                                       f"{report.reason} {report.unmet}")
                samples[name].seconds.append(report.seconds)
                samples[name].wall.append(wall)
                fabric.daemons["media1"].storage.delete(report.backup_id)  # see the module's doc
    finally:
        await fabric.stop()
        shutil.rmtree(state, ignore_errors=True)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="data per client (KiB/MiB/GiB suffixes)")
    parser.add_argument("--files", type=int, default=16, help="files per client")
    parser.add_argument("--rounds", type=int, default=3, help="median of N")
    parser.add_argument("--target", type=float, default=0.8, help="lowest acceptable fabric/bare")
    parser.add_argument("--no-check", action="store_true", help="print only; exit 0 whatever the ratios")
    parser.add_argument("--tmp", default=None, help="parent of the temporary state folder (default: the system's)")
    parser.add_argument("--log", type=Path, default=None, help="JSON log file (default: warnings only, to stderr)")
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of the fabric jobs here (pstats)")
    args = parser.parse_args()
    configure(args.log)  # INFO to a file, or WARNING: no log line costs time on the data path
    profile = cProfile.Profile() if args.profile else None
    samples = asyncio.run(run(args.size, args.files, args.rounds, args.tmp, profile))
    if profile:
        profile.dump_stats(args.profile)

    out = sys.stdout
    payload = samples["fabric dte=on"].total
    out.write(f"{payload / 2**20:.0f} MiB in {args.files} files, median of {args.rounds} rounds, MB = 10^6 bytes\n")
    out.write(f"  {'':15} {'MB/s':>6} {'seconds':>8}   {'MB/s':>6} {'wall s':>7} (around run_step)\n")
    for name in ORDER:
        s = samples[name]
        line = f"  {name:15} {s.mb_per_s():6.0f} {statistics.median(s.seconds):8.3f}"
        if s.wall:
            line += f"   {s.mb_per_s(s.wall):6.0f} {statistics.median(s.wall):7.3f}"
        out.write(line + "\n")
    failed = False
    for kind, fabric, bare in PAIRS:
        ratio = samples[fabric].mb_per_s() / samples[bare].mb_per_s()
        wall_ratio = samples[fabric].mb_per_s(samples[fabric].wall) / samples[bare].mb_per_s()
        below = ratio < args.target
        failed |= below
        out.write(f"  fabric/bare {kind:7}: {ratio:.2f} job, {wall_ratio:.2f} around run_step"
                  f"{f'  BELOW {args.target}' if below else ''}\n")
    return 1 if failed and not args.no_check else 0


if __name__ == "__main__":
    sys.exit(main())
