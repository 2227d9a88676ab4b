"""End to end: scenarios on live daemons (embedded MQTT broker, real TLS sockets, SQLite).

Proves the design's invariants where they can be seen: on the wire (through a capturing
relay, not a log line), in the catalog file, and on the media servers' disks.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.catalog import Catalog
from fabric.daemons.client import Client
from fabric.datastream import send_files
from fabric.dataset import MARKER
from fabric.dte import DteMode
from fabric.scenario.loader import load_scenario, parse_scenario
from fabric.scenario.plan import plan_scenario
from fabric.scenario.run import Fabric, run_scenario

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent

BASE = """
name: {name}
seed: 3
global_dte_mode: {mode}
{extra}
hosts:
  primary1: {{role: primary, version: "10.5"}}
  media1:   {{role: media,   version: "10.5"}}
  media2:   {{role: media,   version: "10.5"}}
  web1:     {{role: client,  version: "10.5", data: {{files: 6, size: 3MiB}}}}
  old:      {{role: client,  version: "8.3",  data: {{files: 3, size: 1MiB}}}}
steps:
{steps}
"""


def scenario(name: str, steps: str, mode: str = "preferred_on", extra: str = ""):
    return parse_scenario(BASE.format(name=name, mode=mode, steps=steps, extra=extra), f"<{name}>")


def catalog_of(state: Path) -> Catalog:
    return Catalog.open(state / "hosts" / "primary1" / "catalog.sqlite")


def stored_copies(state: Path, media: str) -> list[Path]:
    return sorted((state / "hosts" / media / "storage").glob("*"))


async def test_quickstart_runs_as_planned(tmp_path):
    quick = load_scenario(ROOT / "topologies" / "quickstart.yaml")
    plan = plan_scenario(quick)
    report = await run_scenario(quick, tmp_path)
    assert report.ok, [s.unmet for s in report.steps]
    for planned, ran in zip(plan.steps, report.steps):
        assert ran.status == planned.status, (planned, ran)
        if planned.decision is None:
            continue
        # TLS on exactly the jobs the plan said `encrypt`.
        assert (ran.tls is not None) == (planned.decision.value == "encrypt"), (planned, ran)
        if planned.decision.value == "encrypt":
            assert ran.tls["version"] == "TLSv1.3" and ran.dte_mode == "on"
    restores = [s for s in report.steps if s.op == "restore"]
    assert restores and all(s.verified for s in restores)


async def test_encrypted_legs_never_show_client_data_on_the_wire(tmp_path):
    steps = """
  - backup:    {client: web1, media: media1, as: enc}
  - restore:   {image: enc, to: web1}
  - duplicate: {image: enc, to: media2}
"""
    seen = {}

    async def inspect(fabric: Fabric):
        network = fabric.network
        seen["backup"] = network.captured("web1", "media1")
        seen["restore"] = network.captured("media1", "web1")
        seen["duplicate"] = network.captured("media1", "media2")

    report = await run_scenario(scenario("wire-on", steps), tmp_path, capture=True, keep=inspect)
    assert [s.status for s in report.steps] == [0, 0, 0]
    for leg, wire in seen.items():
        assert len(wire) > 3_000_000 if leg != "restore" else len(wire) > 100, leg
        assert MARKER not in wire, f"{leg}: client data crossed the wire in clear"
        assert b'"dte":"on"' in wire[:300], leg  # the plaintext header said so before TLS


async def test_plaintext_legs_do_show_client_data(tmp_path):
    steps = """
  - backup:    {client: web1, media: media1, as: plain}
  - restore:   {image: plain, to: web1}
"""
    seen = {}

    async def inspect(fabric: Fabric):
        seen["backup"] = fabric.network.captured("web1", "media1")
        seen["restore"] = fabric.network.captured("media1", "web1")

    report = await run_scenario(scenario("wire-off", steps, mode="preferred_off"), tmp_path, capture=True, keep=inspect)
    assert [s.dte_mode for s in report.steps] == ["off", "off"]
    assert MARKER + b" web1:" in seen["backup"]
    assert MARKER + b" web1:" in seen["restore"]


class DowngradingClient(Client):
    """A client that ignores the primary and offers every backup in plaintext."""

    async def cmd_send_backup(self, body: dict) -> dict:
        entries = list(self.dataset.files.values())
        from fabric.datastream import FileEntry

        files = [FileEntry(f.path, f.size, f.sha256) for f in entries]
        return await self.send_leg(body["job_id"], "backup", DteMode.OFF, body["receiver"], body["port"],
                                   lambda leg: send_files(leg, self.dataset.root, files))


async def test_a_client_cannot_talk_a_job_down_to_plaintext(tmp_path):
    sc = scenario("downgrade", "  - backup: {client: web1, media: media1, as: x}")
    fabric = Fabric(sc, tmp_path, capture=True)
    await fabric.start()
    try:
        honest = fabric.daemons["web1"]
        await honest.stop()
        rogue = DowngradingClient(honest.config, fabric.broker_url, fabric.route)
        await rogue.start()
        fabric.daemons["web1"] = rogue
        report = await fabric.run_step(sc.steps[0])
        wire = fabric.network.captured("web1", "media1")
    finally:
        await fabric.stop()
    assert report.status == 8313, report
    assert "cannot" in report.reason or "decided DTE on" in report.reason
    assert MARKER not in wire  # refused before a byte of payload
    with catalog_of(tmp_path) as catalog:
        assert catalog.list_images() == []
    assert stored_copies(tmp_path, "media1") == []


async def test_failed_jobs_leave_no_image_and_no_copy(tmp_path):
    steps = """
  - backup:    {client: web1, media: media1, as: good}
  - fault:     {kind: disk_full, host: media2}
  - backup:    {client: web1, media: media2}
    expect:    {status: 84}
  - duplicate: {image: good, to: media2}
    expect:    {status: 84}
  - heal:      {host: media2}
  - fault:     {kind: volume_down, host: media1}
  - verify:    {image: good}
    expect:    {status: 2074}
  - heal:      {host: media1}
  - fault:     {kind: cut, link: [web1, media1], after: 1MiB}
  - backup:    {client: web1, media: media1}
    expect:    {status: 40}
  - heal:      {link: [web1, media1]}
  - fault:     {kind: crash, host: media2}
  - backup:    {client: web1, media: media2}
    expect:    {status: 2106}
  - heal:      {host: media2}
  - backup:    {client: web1, media: media2}
    expect:    {status: 0}
"""
    report = await run_scenario(scenario("failures", steps), tmp_path)
    assert report.ok, [(s.step, s.status, s.reason, s.unmet) for s in report.steps]
    with catalog_of(tmp_path) as catalog:
        images = catalog.list_images()
        assert len(images) == 2  # the first and the last backup only
        assert all(len(catalog.copies(i.backup_id)) == 1 for i in images)
        jobs = {j.job_id: j for j in catalog.list_jobs(limit=100)}
    assert all(j.state == "done" for j in jobs.values())
    # Nothing half-written stays on any media server's disk.
    for media in ("media1", "media2"):
        assert not [p for p in stored_copies(tmp_path, media) if p.name.endswith(".partial")]


async def test_a_retry_succeeds_and_records_one_image(tmp_path):
    steps = """
  - fault:  {kind: cut, link: [web1, media1], after: 512KiB}
  - backup: {client: web1, media: media1, as: retried}
    expect: {status: 0, dte: on}
"""
    report = await run_scenario(scenario("retry", steps, extra="retry: {attempts: 2, delay: 0.1}"), tmp_path)
    assert report.ok, report.steps[-1]
    assert report.steps[-1].attempts == 2
    with catalog_of(tmp_path) as catalog:
        assert len(catalog.list_images()) == 1
        job = catalog.get_job(report.steps[-1].job_id)
        assert job.attempt == 2 and job.status == 0


async def test_broker_down_fails_the_submission_and_recovers(tmp_path):
    steps = """
  - backup: {client: web1, media: media1, as: a}
  - fault:  {kind: broker_down}
  - backup: {client: web1, media: media1}
    expect: {status: 25}
  - heal:   {broker: true}
  - verify: {image: a}
    expect: {status: 0, verified: true, dte: on}
"""
    report = await run_scenario(scenario("broker", steps), tmp_path)
    assert report.ok, [(s.step, s.status, s.reason) for s in report.steps]


async def test_image_mode_change_governs_the_next_job(tmp_path):
    steps = """
  - backup:         {client: web1, media: media1, as: img}
    expect:         {dte: on}
  - set:            {global_dte_mode: preferred_off}
  - verify:         {image: img}
    expect:         {dte: on}
  - image_dte_mode: {image: img, mode: off}
  - verify:         {image: img}
    expect:         {dte: off, verified: true}
"""
    report = await run_scenario(scenario("image-mode", steps), tmp_path)
    assert report.ok, [(s.step, s.dte_mode, s.unmet) for s in report.steps]
    with catalog_of(tmp_path) as catalog:
        audit = catalog.list_audit()
    assert any("image_dte_mode" in a.what or "dte" in a.what.lower() for a in audit)


def test_cli_run_json_report_shape(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fabric.cli", "run", str(ROOT / "topologies" / "quickstart.yaml"),
                          "--json", "--state", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["scenario"] == "quickstart"
    required = {"step", "op", "job_id", "status", "dte_mode", "backup_id", "copy", "bytes", "seconds", "tls", "verified", "expect"}
    for step in report["steps"]:
        assert required <= set(step)
    first = report["steps"][0]
    assert first["tls"]["version"] == "TLSv1.3" and first["tls"]["cipher"]
    # The catalog the report points at is a real SQLite file with the images in it.
    db = sqlite3.connect(report["catalogs"]["default"])
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 2


def test_cli_run_unmet_expectation_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.format(name="unmet", mode="preferred_on", extra="", steps="""
  - backup: {client: web1, media: media1}
    expect: {dte: off}
"""))
    out = subprocess.run([sys.executable, "-m", "fabric.cli", "run", str(bad), "--state", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "UNMET" in out.stdout + out.stderr


async def test_a_media_server_crashing_mid_duplication_loses_nothing(tmp_path):
    steps = """
  - backup:    {client: web1, media: media1, as: a}
  - fault:     {kind: crash, host: media2, after: 1MiB}
  - duplicate: {image: a, to: media2}
    expect:    {fails: true}
  - heal:      {host: media2}
  - restore:   {image: a, to: web1}
    expect:    {status: 0, verified: true, dte: on}
  - duplicate: {image: a, to: media2}
    expect:    {status: 0, dte: on}
"""
    report = await run_scenario(scenario("crash-mid-dup", steps), tmp_path)
    assert report.ok, [(s.step, s.status, s.reason, s.unmet) for s in report.steps]
    assert report.steps[2].status in (40, 2106), report.steps[2]
    with catalog_of(tmp_path) as catalog:
        (image,) = catalog.list_images()
        copies = catalog.copies(image.backup_id)
    assert [c.media_server for c in copies] == ["media1", "media2"]  # the failed copy left no record
    assert not [p for p in stored_copies(tmp_path, "media2") if p.name.endswith(".partial")]


async def test_daemons_as_processes_survive_sigkill(tmp_path):
    """`--processes`: each daemon is an OS process; a crash fault is a real SIGKILL."""
    steps = """
  - backup:    {client: web1, media: media1, as: a}
  - set:       {global_dte_mode: preferred_off}
  - fault:     {kind: crash, host: primary1}
  - heal:      {host: primary1}
  - backup:    {client: web1, media: media1}
    expect:    {status: 0, dte: off}
  - restore:   {image: a, to: web1}
    expect:    {status: 0, dte: on, verified: true}
  - fault:     {kind: crash, host: media1}
  - backup:    {client: web1, media: media1}
    expect:    {status: 2106}
  - heal:      {host: media1}
  - verify:    {image: a}
    expect:    {status: 0, dte: on, verified: true}
  - fault:     {kind: disk_full, host: media2}
  - duplicate: {image: a, to: media2}
    expect:    {status: 84}
"""
    path = tmp_path / "sigkill.yaml"
    path.write_text(BASE.format(name="sigkill", mode="preferred_on", extra="", steps=steps))
    report = await run_scenario(load_scenario(path), tmp_path / "state", processes=True)
    assert report.ok, [(s.step, s.status, s.reason, s.unmet) for s in report.steps]
    with catalog_of(tmp_path / "state") as catalog:
        assert len(catalog.list_images()) == 2  # nothing committed was lost, nothing failed was kept
        assert catalog.get_settings().global_mode.value == "preferred_off"  # survived the primary's crash


async def test_a_second_run_on_the_same_state_starts_from_the_topology(tmp_path):
    """The state folder keeps the catalog across runs; the settings start from the YAML."""
    steps = """
  - backup: {client: web1, media: media1, as: a}
    expect: {dte: on}
  - set:    {global_dte_mode: enforced}
  - backup: {client: old, media: media1}
    expect: {status: 8302}
"""
    first = await run_scenario(scenario("twice", steps), tmp_path)
    second = await run_scenario(scenario("twice", steps), tmp_path)
    assert first.ok and second.ok, [(s.step, s.status, s.unmet) for s in second.steps]
    with catalog_of(tmp_path) as catalog:
        assert len(catalog.list_images()) == 2  # one per run: the catalog is kept
        assert catalog.get_settings().global_mode.value == "enforced"
