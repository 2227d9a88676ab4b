"""End to end for the secondary operations: replication and import across domains,
synthetic backups, incrementals, lifecycle policies, upgrades, on live daemons.

The §6.4 and §6.6 [S] cells are checked twice: through `fabric plan` and through
`fabric run` (the job's real DTE mode, or its failure).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.catalog import Catalog
from fabric.scenario.loader import load_scenario, parse_scenario
from fabric.scenario.plan import plan_scenario
from fabric.scenario.run import run_scenario

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
MODES = ("preferred_off", "preferred_on", "enforced")

TWO_DOMAINS = """
name: {name}
seed: 5
domains:
  prod: {{global_dte_mode: preferred_on}}
  dr:   {{global_dte_mode: preferred_on, trusts: [prod]}}
hosts:
  primary-prod: {{role: primary, version: "10.5", domain: prod}}
  src:          {{role: media,   version: "10.5", domain: prod}}
  web1:         {{role: client,  version: "10.5", domain: prod, data: {{files: 4, size: 256KiB}}}}
  primary-dr:   {{role: primary, version: "10.5", domain: dr}}
  dr-on:        {{role: media,   version: "10.5", domain: dr}}
  dr-off:       {{role: media,   version: "10.5", domain: dr, dte_mode: off}}
  dr-old:       {{role: media,   version: "9.0",  domain: dr}}
  dr-web:       {{role: client,  version: "10.5", domain: dr}}
steps:
{steps}
"""

# §6.4 [S], image DTE mode Off: rows global mode, columns target media On / Off / earlier than 9.1.
REPLICATION_IMAGE_OFF = {"preferred_off": "NNN", "preferred_on": "ENE", "enforced": "EFE"}
# §6.4 [S], image On, media On, DTE_IGNORE_IMAGE_MODE = NEVER: E for both host columns.
REPLICATION_IMAGE_ON = {"preferred_off": "EE", "preferred_on": "EE", "enforced": "EE"}
EXPECT = {"E": "{status: 0, dte: on}", "N": "{status: 0, dte: off}", "F": "{fails: true}"}


def _replication_steps() -> str:
    lines = [
        "  - set: {domain: prod, global_dte_mode: preferred_off}",
        "  - backup: {client: web1, media: src, as: img-off}",
        "    expect: {dte: off}",
        "  - set: {domain: prod, global_dte_mode: preferred_on}",
        "  - backup: {client: web1, media: src, as: img-on}",
        "    expect: {dte: on}",
    ]
    for mode in MODES:
        lines.append(f"  - set: {{domain: prod, global_dte_mode: {mode}}}")
        for target, cell in zip(("dr-on", "dr-off", "dr-old"), REPLICATION_IMAGE_OFF[mode]):
            lines += [f"  - replicate: {{image: img-off, to: {target}}}", f"    expect: {EXPECT[cell]}"]
        for target, cell in zip(("dr-on", "dr-old"), REPLICATION_IMAGE_ON[mode]):
            lines += [f"  - replicate: {{image: img-on, to: {target}}}", f"    expect: {EXPECT[cell]}"]
    return "\n".join(lines)


def _cells(plan, scenario) -> list[tuple[int, str, str]]:
    """(step, decision letter, expected letter) for every step with an expectation."""
    letters = {"encrypt": "E", "plaintext": "N", "fail": "F"}
    out = []
    for planned, step in zip(plan.steps, scenario.steps):
        if step.expect is None or (step.expect.fails is None and step.expect.dte is None):
            continue
        expected = "F" if step.expect.fails else ("E" if step.expect.dte.value == "on" else "N")
        out.append((step.index, letters[planned.decision.value], expected))
    return out


async def test_replication_cells_of_6_4_through_plan_and_run(tmp_path):
    scenario = parse_scenario(TWO_DOMAINS.format(name="repl-6.4", steps=_replication_steps()), "<6.4>")
    for step, decided, expected in _cells(plan_scenario(scenario), scenario):
        assert decided == expected, f"plan step {step}"
    report = await run_scenario(scenario, tmp_path)
    assert report.ok, [(s.step, s.status, s.dte_mode, s.unmet) for s in report.steps if s.unmet]
    encrypted = [s for s in report.steps if s.op == "replicate" and s.dte_mode == "on"]
    assert encrypted and all(s.tls for s in encrypted)


SYNTH = """
name: synth-6.6
seed: 9
global_dte_mode: preferred_on
hosts:
  primary1: {{role: primary, version: "10.5"}}
  m-on:     {{role: media,   version: "10.5"}}
  m-off:    {{role: media,   version: "10.5", dte_mode: off}}
  m-old:    {{role: media,   version: "9.0"}}
  web1:     {{role: client,  version: "10.5", data: {{files: 6, size: 384KiB}}}}
steps:
{steps}
"""
# §6.6 [S], all component images Off: columns all 9.1+ On / all 9.1+ Off / any earlier than 9.1.
SYNTH_IMAGE_OFF = {"preferred_off": "NNN", "preferred_on": "ENN", "enforced": "EFF"}
# §6.6, one component On, media On, NEVER: all 9.1+ -> E, any earlier -> F ([S]; Enforced row [I]).
SYNTH_IMAGE_ON = {"preferred_off": "EF", "preferred_on": "EF", "enforced": "EF"}


def _synthetic_steps() -> str:
    lines = [
        "  - set: {global_dte_mode: preferred_off}",
        "  - backup: {client: web1, media: m-on, as: full-off}",
        "  - mutate: {client: web1, files: 2}",
        "  - backup: {client: web1, media: m-on, as: incr-off, kind: incremental}",
        "  - set: {global_dte_mode: preferred_on}",
        "  - mutate: {client: web1, files: 2}",
        "  - backup: {client: web1, media: m-on, as: incr-on, kind: incremental}",
        "    expect: {dte: on}",
    ]
    n = 0
    for mode in MODES:
        lines.append(f"  - set: {{global_dte_mode: {mode}}}")
        for target, cell in zip(("m-on", "m-off", "m-old"), SYNTH_IMAGE_OFF[mode]):
            n += 1
            lines += [f"  - synthetic: {{images: [full-off, incr-off], media: {target}, as: s{n}}}", f"    expect: {EXPECT[cell]}"]
        for target, cell in zip(("m-on", "m-old"), SYNTH_IMAGE_ON[mode]):
            n += 1
            lines += [f"  - synthetic: {{images: [full-off, incr-off, incr-on], media: {target}, as: s{n}}}", f"    expect: {EXPECT[cell]}"]
    lines += ["  - restore: {image: s1, to: web1}", "    expect: {status: 0, verified: true}"]
    return "\n".join(lines)


async def test_synthetic_cells_of_6_6_through_plan_and_run(tmp_path):
    scenario = parse_scenario(SYNTH.format(steps=_synthetic_steps()), "<6.6>")
    plan = plan_scenario(scenario)
    for step, decided, expected in _cells(plan, scenario):
        assert decided == expected, f"plan step {step}"
    report = await run_scenario(scenario, tmp_path)
    assert report.ok, [(s.step, s.status, s.dte_mode, s.unmet) for s in report.steps if s.unmet]
    with Catalog.open(tmp_path / "hosts" / "primary1" / "catalog.sqlite") as catalog:
        by_id = {s.backup_id: s for s in report.steps if s.op == "synthetic" and s.status == 0}
        full_files = len(catalog.files(report.steps[1].backup_id))
        for backup_id in by_id:
            image = catalog.get_image(backup_id)
            # A synthetic full has every file, at its newest version.
            assert image.schedule_type == "full" and image.num_files == full_files
        incr = catalog.get_image(report.steps[3].backup_id)
        assert incr.schedule_type == "incremental" and incr.num_files == 2  # only what changed


async def test_dr_scenario_replicates_imports_and_restores(tmp_path):
    scenario = load_scenario(ROOT / "topologies" / "dr-replication.yaml")
    report = await run_scenario(scenario, tmp_path)
    assert report.ok, [(s.step, s.status, s.unmet) for s in report.steps if s.unmet]
    imports = [s for s in report.steps if s.op == "import" and s.status == 0]
    assert imports
    dr_primary = next(h.name for h in scenario.hosts.values() if h.domain != "prod" and h.role.value == "primary")
    with Catalog.open(tmp_path / "hosts" / dr_primary / "catalog.sqlite") as catalog:
        image = catalog.get_image(imports[0].backup_id)
        assert image is not None and image.origin_domain == "prod"
        copy = catalog.copies(image.backup_id)[0]
        assert copy.copy_dte_mode.value in ("on", "off") and copy.hierarchical_dte_mode.value in ("on", "off")


async def test_lifecycle_policy_runs_parent_and_child_jobs(tmp_path):
    report = await run_scenario(load_scenario(ROOT / "topologies" / "slp-gold.yaml"), tmp_path)
    assert report.ok, [(s.step, s.status, s.unmet) for s in report.steps if s.unmet]
    first = report.steps[0]
    assert [c["op"] for c in first.children] == ["backup", "duplicate", "replicate", "import"]
    assert [c["copy_dte_mode"] for c in first.copies] == ["on", "on"]
    with Catalog.open(tmp_path / "hosts" / "primary-prod" / "catalog.sqlite") as catalog:
        jobs = catalog.list_jobs(limit=100)
    parent = next(j for j in jobs if j.job_id == first.job_id)
    assert parent.job_type == "policy" and parent.dte_mode is None  # a parent job has no DTE mode (§6.9)
    children = [j for j in jobs if j.parent_job_id == parent.job_id]
    assert {j.job_type for j in children} == {"backup", "duplicate", "replicate"}
    assert all(j.dte_mode is not None for j in children)


async def test_upgrading_a_media_server_lets_the_image_on_duplicate(tmp_path):
    steps = """
  - backup:    {client: web1, media: m-on, as: img}
    expect:    {dte: on}
  - duplicate: {image: img, to: m-old}
    expect:    {status: 8309}
  - set:       {host: m-old, version: "10.5"}
  - duplicate: {image: img, to: m-old}
    expect:    {status: 0, dte: on}
"""
    report = await run_scenario(parse_scenario(SYNTH.format(steps=steps), "<upgrade>"), tmp_path)
    assert report.ok, [(s.step, s.status, s.unmet) for s in report.steps if s.unmet]
    assert report.steps[-1].copies[-1]["copy_dte_mode"] == "on"
