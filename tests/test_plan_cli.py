"""`fabric plan` and `fabric validate`, run as a user runs them: the real CLI in a subprocess.

What these tests prove:

- `fabric plan FILE --json` prints exactly the DESIGN.md shape - {scenario, steps: [{step,
  op, decision, status, reason}]} with `step` counting from 1 over every step, `decision`
  null for set and image_dte_mode, `status` 0 unless the decision is fail - and the same
  plan the library computes; several files print a JSON list, in order;
- the human table names every step's decision and status;
- an invalid scenario is one `error: FILE:LINE:COL: ...` line on stderr, exit status 2,
  nothing on stdout and never a traceback, for `validate` and `plan` alike;
- the planner follows an image across domains and copies the way the steps say it moved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fabric.scenario.loader import ScenarioError, load_scenario
from fabric.scenario.plan import plan_scenario

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = sorted((ROOT / "topologies").glob("*.yaml"))
QUICKSTART = ROOT / "topologies" / "quickstart.yaml"
NOT_JOBS = {"set", "image_dte_mode", "mutate", "fault", "heal"}
NULL_DECISION_BY_CONTRACT = {"set", "image_dte_mode"}
CONTRACT_OPS = {"backup", "restore", "duplicate", "verify", "replicate", "import", "synthetic", *NOT_JOBS}
ROW_KEYS = ["step", "op", "decision", "status", "reason"]


def fabric(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fabric.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def plan_json(*files: Path | str) -> object:
    done = fabric("plan", *files, "--json")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def loadable(path: Path):
    try:
        return load_scenario(path)
    except ScenarioError as err:
        pytest.skip(f"does not load (test_loader.py reports it): {err}")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ======================================================================================
# plan --json
# ======================================================================================


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_plan_json_has_the_design_shape(path: Path):
    scenario = loadable(path)
    payload = plan_json(path)
    assert isinstance(payload, dict) and set(payload) == {"scenario", "steps"}
    assert payload["scenario"] == scenario.name
    assert len(payload["steps"]) == len(scenario.steps)
    for n, (row, step) in enumerate(zip(payload["steps"], scenario.steps), start=1):
        if row["op"] in CONTRACT_OPS:
            assert list(row) == ROW_KEYS, row
        else:  # an op DESIGN.md does not list yet: the contract's keys first, extensions after
            assert list(row)[:5] == ROW_KEYS, row
        assert row["step"] == n and row["op"] == step.op, row
        assert type(row["status"]) is int and isinstance(row["reason"], str), row
        if row["op"] in NOT_JOBS:
            assert row["decision"] is None and row["status"] == 0, row
        else:
            assert row["decision"] in ("encrypt", "plaintext", "fail"), row
            assert (row["status"] != 0) == (row["decision"] == "fail"), row
            assert row["reason"], row
        if row["op"] in NULL_DECISION_BY_CONTRACT:
            assert row["reason"], "a set / image_dte_mode row says what it changed"
    assert payload == plan_scenario(scenario).as_json()


def test_plan_json_quickstart_decisions():
    payload = plan_json(QUICKSTART)
    got = [(s["op"], s["decision"], s["status"]) for s in payload["steps"]]
    assert got == [
        ("backup", "encrypt", 0),
        ("backup", "plaintext", 0),
        ("restore", "encrypt", 0),
        ("verify", "encrypt", 0),
        ("duplicate", "encrypt", 0),
        ("duplicate", "fail", 8309),
        ("restore", "plaintext", 0),
    ]


def test_steps_count_over_set_and_image_dte_mode():
    payload = plan_json(ROOT / "topologies" / "image-mode-off-before-dup.yaml")
    rows = {s["step"]: s for s in payload["steps"]}
    assert rows[3]["op"] == "image_dte_mode" and rows[3]["decision"] is None
    assert (rows[4]["op"], rows[4]["decision"], rows[4]["status"]) == ("duplicate", "plaintext", 0)
    assert rows[8]["op"] == "image_dte_mode" and rows[8]["decision"] is None
    assert (rows[9]["op"], rows[9]["decision"], rows[9]["status"]) == ("verify", "fail", 8309)


def test_several_files_print_a_json_list_in_order():
    files = [ROOT / "topologies" / "client-modes.yaml", QUICKSTART, ROOT / "topologies" / "synthetic.yaml"]
    payload = plan_json(*files)
    assert isinstance(payload, list)
    assert [p["scenario"] for p in payload] == ["client-modes", "quickstart", "synthetic"]
    assert payload[1] == plan_json(QUICKSTART)


def test_the_same_file_twice_is_still_a_list():
    payload = plan_json(QUICKSTART, QUICKSTART)
    assert isinstance(payload, list) and len(payload) == 2 and payload[0] == payload[1]


def test_a_plan_with_failing_jobs_still_exits_0():
    done = fabric("plan", ROOT / "topologies" / "client-modes.yaml", "--json")
    assert done.returncode == 0
    assert any(s["decision"] == "fail" for s in json.loads(done.stdout)["steps"])


@pytest.mark.skipif(shutil.which("fabric") is None, reason="the fabric console script is not on PATH")
def test_the_console_script_is_the_same_cli():
    done = subprocess.run(["fabric", "plan", str(QUICKSTART), "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == plan_json(QUICKSTART)
    bad = subprocess.run(["fabric", "validate", "/nonexistent/x.yaml"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# ======================================================================================
# The human table
# ======================================================================================


def parse_table(text: str) -> tuple[str, list[dict[str, str]]]:
    """The title and the rows of `fabric plan`'s table, cut by the dashes line's columns."""
    lines = text.rstrip("\n").splitlines()
    title, header, dashes, *rows = lines
    spans, start = [], None
    for i, ch in enumerate(dashes + " "):
        if ch == "-" and start is None:
            start = i
        elif ch != "-" and start is not None:
            spans.append(start)
            start = None
    cut = lambda line: [line[a:b].strip() for a, b in zip(spans, spans[1:] + [None])]  # noqa: E731
    names = cut(header)
    return title, [dict(zip(names, cut(row))) for row in rows]


@pytest.mark.parametrize("name", ["ignore-image-mode", "synthetic", "failures"])
def test_human_table_names_each_decision(name: str):
    path = ROOT / "topologies" / f"{name}.yaml"
    scenario = loadable(path)
    done = fabric("plan", path)
    assert done.returncode == 0, done.stderr
    title, rows = parse_table(done.stdout)
    assert title == f"plan: {scenario.name}"
    assert len(rows) == len(scenario.steps)
    plan = plan_scenario(scenario)
    for row, planned in zip(rows, plan.steps):
        assert row["step"] == str(planned.step) and row["op"] == planned.op, row
        if planned.decision is None:
            assert row["decision"] == "-" and row["status"] == "", row
        else:
            assert row["decision"] == planned.decision.value, row
            assert row["status"] == str(planned.status), row
            assert row["why"] == planned.reason, row


def test_human_table_for_several_files():
    done = fabric("plan", QUICKSTART, ROOT / "topologies" / "client-modes.yaml")
    assert done.returncode == 0
    assert done.stdout.count("plan: ") == 2
    assert "8309" in done.stdout and "8310" in done.stdout and "8314" in done.stdout


# ======================================================================================
# validate, and errors
# ======================================================================================

BAD_FILES = [
    ("unknown-host-key", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media, verison: '10.5'}\nsteps:\n  - set: {global_dte_mode: enforced}\n", 4),
    ("unknown-host-in-step", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media}\n  c1: {role: client}\nsteps:\n  - backup: {client: web9, media: m1}\n", 7),
    ("invalid-yaml", "name: t\nhosts:\n\tp1: {role: primary}\n", 3),
    ("empty", "", 1),
    ("not-a-mapping", "just words\n", 1),
    ("deeply-nested", "name: " + "[" * 3000 + "]" * 3000 + "\n", 1),
]


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize("text, line", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_bad_file_is_one_located_line_and_exit_2(tmp_path: Path, command: str, text: str, line: int):
    path = write(tmp_path, "bad.yaml", text)
    done = fabric(command, path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {path}:{line}:"), lines[0]


def test_non_utf8_is_one_line_and_exit_2(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    done = fabric("validate", path)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "UTF-8" in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_file_is_one_line_and_exit_2(tmp_path: Path):
    done = fabric("validate", tmp_path / "nope.yaml")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "nope.yaml" in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_good_files(tmp_path: Path):
    files = [QUICKSTART, ROOT / "topologies" / "synthetic.yaml"]
    done = fabric("validate", *files)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, files):
        assert line.startswith(f"{path}: ok"), line


def test_one_bad_file_among_good_ones(tmp_path: Path):
    bad = write(tmp_path, "bad.yaml", BAD_FILES[0][1])
    for command in ("validate", "plan"):
        done = fabric(command, QUICKSTART, bad)
        assert done.returncode == 2, command
        assert done.stdout == "", "no partial plan when any file is invalid"
        assert done.stderr.splitlines() == [done.stderr.splitlines()[0]] and f"{bad}:4:" in done.stderr


def test_no_command_is_usage_and_exit_2():
    done = fabric()
    assert done.returncode == 2 and "usage" in (done.stdout + done.stderr).lower()


# ======================================================================================
# Where the planner reads an image from
# ======================================================================================

AIR = """\
name: air
domains:
  prod: {global_dte_mode: preferred_off}
  dr:   {global_dte_mode: enforced, trusts: [prod]}
hosts:
  p1: {role: primary, domain: prod}
  pm: {role: media, domain: prod}
  pc: {role: client, domain: prod}
  d1: {role: primary, domain: dr}
  dm: {role: media, domain: dr}
steps:
  - backup:    {client: pc, media: pm, as: img}
  - replicate: {image: img, to: dm}
  - import:    {image: img, media: dm}
  - verify:    {image: img}
  - restore:   {image: img, to: pc}
"""


def test_replicate_and_import_decisions(tmp_path: Path):
    rows = plan_json(write(tmp_path, "air.yaml", AIR))["steps"]
    # Preferred Off at prod: a plaintext backup, replicated in plaintext (the source
    # domain decides); the DR import follows DR's Enforced: encrypted.
    assert [(r["op"], r["decision"]) for r in rows[:3]] == [("backup", "plaintext"), ("replicate", "plaintext"), ("import", "encrypt")]


def test_after_import_the_source_domain_still_reads_its_own_copy(tmp_path: Path):
    """Import makes a copy at DR; it does not move production's image there. A verify and
    a restore in production read pm under production's Preferred Off: plaintext."""
    rows = plan_json(write(tmp_path, "air.yaml", AIR))["steps"]
    assert (rows[3]["op"], rows[3]["decision"]) == ("verify", "plaintext"), rows[3]
    assert (rows[4]["op"], rows[4]["decision"]) == ("restore", "plaintext"), rows[4]
    done = fabric("plan", tmp_path / "air.yaml")
    _, table = parse_table(done.stdout)
    assert table[3]["on"] == "pm" and table[4]["on"] == "pm -> pc", table[3:]


NO_COPY = """\
name: no-copy
hosts:
  p1: {role: primary}
  m1: {role: media}
  m2: {role: media}
  c1: {role: client}
steps:
  - backup:  {client: c1, media: m1, as: img}
  - %s
"""


@pytest.mark.parametrize(
    "step",
    ["restore: {image: img, to: c1, from: m2}", "verify: {image: img, media: m2}", "duplicate: {image: img, to: m1, from: m2}"],
    ids=["restore-from", "verify-on", "duplicate-from"],
)
def test_reading_a_copy_from_a_media_server_that_has_none(tmp_path: Path, step: str):
    """m2 never received the image. Either the loader rejects the step (exit 2, naming
    line 9), or the plan fails it for that reason; it must not be planned as if a copy
    were there (today: encrypt, status 0)."""
    path = write(tmp_path, "nocopy.yaml", NO_COPY % step)
    done = fabric("plan", path, "--json")
    assert "Traceback" not in done.stderr
    if done.returncode == 2:
        assert f"{path}:9:" in done.stderr
        return
    assert done.returncode == 0
    row = json.loads(done.stdout)["steps"][1]
    assert row["decision"] == "fail" and not 8300 <= row["status"] < 8400, row
