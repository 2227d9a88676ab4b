"""The scenario loader turns topology YAML into a Scenario, or into one located ScenarioError.

What these tests prove:

- every file in topologies/ loads and plans, every job step carries an `expect`, and each
  `expect` agrees with what `fabric plan` decides (status, fails, and dte on <=> encrypt);
- YAML 1.1's bare `on`/`off` mean the DTE words, sizes take KiB/MiB/GiB, host profiles
  merge under the topology's own keys, and an error inside a profile names the profile;
- each class of mistake a user can make gives a ScenarioError with the right file, line,
  key path and a message that says what is wrong (not a traceback, not a wrong line);
- no input at all - random text, random bytes, random YAML, random edits of quickstart -
  makes the loader (or the planner, on what loads) raise anything but ScenarioError.
"""

from __future__ import annotations

import re
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.dte import ClientMode, Decision, MediaMode, Role, Version
from fabric.model import BackupKind, Expect, PolicyType, Scenario
from fabric.scenario.loader import (
    HOST_KEYS,
    NO_EXPECT,
    STEP_KEYS,
    TOP_KEYS,
    ScenarioError,
    default_profile_dirs,
    load_scenario,
    parse_scenario,
)
from fabric.scenario.plan import plan_scenario

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = sorted((ROOT / "topologies").glob("*.yaml"))
HOSTS_DIR = ROOT / "hosts"
QUICKSTART = ROOT / "topologies" / "quickstart.yaml"


def parse(text: str, path: str = "t.yaml", profile_dirs: tuple[Path, ...] = (HOSTS_DIR,)) -> Scenario:
    return parse_scenario(textwrap.dedent(text), path, profile_dirs)


def error_of(text: str, path: str = "t.yaml", profile_dirs: tuple[Path, ...] = (HOSTS_DIR,)) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse(text, path, profile_dirs)
    return info.value


# ======================================================================================
# The topologies shipped in topologies/
# ======================================================================================


def test_there_are_real_scenarios():
    names = {p.stem for p in TOPOLOGIES}
    for wanted in ("enforce-rollout", "image-mode-off-before-dup", "ignore-image-mode", "dr-replication",
                   "client-modes", "synthetic"):
        assert wanted in names


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_topology_loads_and_plans(path: Path):
    scenario = load_scenario(path)
    assert len(scenario.description.split()) >= 15, "the description should tell the story"
    plan = plan_scenario(scenario)
    assert [s.step for s in plan.steps] == list(range(1, len(scenario.steps) + 1))
    assert [s.op for s in plan.steps] == [s.op for s in scenario.steps]


def loaded(path: Path) -> Scenario:
    """The scenario, or a skip: test_topology_loads_and_plans reports a file that does not load."""
    try:
        return load_scenario(path)
    except ScenarioError as err:
        pytest.skip(f"does not load (see test_topology_loads_and_plans): {err}")


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_topology_keeps_runs_quick(path: Path):
    for host in loaded(path).hosts.values():
        if host.role is Role.CLIENT and host.data.path is None:
            assert host.data.files <= 20 and host.data.size <= 8 << 20, host.name


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_every_job_step_has_an_expect(path: Path):
    missing = [f"step {s.index} ({s.op})" for s in loaded(path).steps if s.op not in NO_EXPECT and s.expect is None]
    assert not missing, f"{path.name}: job steps without expect: {', '.join(missing)}"


def disagreements(expect: Expect, decision: Decision | None, status: int) -> list[str]:
    out = []
    failed = decision is Decision.FAIL
    if expect.status is not None and status != expect.status:
        out.append(f"status {status}, expected {expect.status}")
    if expect.fails is not None and failed != expect.fails:
        out.append(f"decision {decision.value if decision else None}, expected fails: {expect.fails}")
    if expect.dte is not None:
        wanted = Decision.ENCRYPT if expect.dte.is_on else Decision.PLAINTEXT
        if decision is not wanted:
            out.append(f"decision {decision.value if decision else None}, expected dte: {expect.dte.value}")
    return out


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_topology_expectations_match_the_plan(path: Path):
    scenario = loaded(path)
    plan = plan_scenario(scenario)
    wrong = []
    for step, planned in zip(scenario.steps, plan.steps):
        if step.expect is None:
            continue
        for problem in disagreements(step.expect, planned.decision, planned.status):
            wrong.append(f"step {step.index} {step.op} (line {step.location.line}): {problem} [{planned.reason}]")
    assert not wrong, f"{path.name}:\n" + "\n".join(wrong)


def test_disagreements_can_fail():
    """The comparison used above is not vacuous."""
    from fabric.dte import DteMode

    assert disagreements(Expect(status=0, dte=DteMode.ON), Decision.PLAINTEXT, 0)
    assert disagreements(Expect(fails=True), Decision.ENCRYPT, 0)
    assert disagreements(Expect(status=8309), Decision.FAIL, 8301)
    assert disagreements(Expect(dte=DteMode.OFF), Decision.FAIL, 8301)
    assert not disagreements(Expect(fails=True, status=8309), Decision.FAIL, 8309)


def test_quickstart_profile_and_overrides():
    scenario = load_scenario(QUICKSTART)
    legacy = scenario.hosts["legacy"]
    assert (legacy.role, legacy.version) == (Role.CLIENT, Version.parse("8.3"))  # from hosts/legacy-8.3.yaml
    assert (legacy.data.files, legacy.data.size) == (4, 1 << 20)  # the topology's own data
    assert scenario.hosts["media1"].dte_mode is MediaMode.ON
    assert scenario.hosts["web1"].data.size == 4 << 20


# ======================================================================================
# Values: bare on/off, sizes, enums
# ======================================================================================

HOSTS_WITH = """\
name: t
hosts:
  p1: {{role: primary}}
  m1: {{role: media, version: "10.5"{media}}}
  c1: {{role: client, version: "10.5"{client}}}
steps:
  - backup: {{client: c1, media: m1, as: i1}}
"""


@pytest.mark.parametrize(
    "written, media_mode, client_mode",
    [
        ("on", MediaMode.ON, ClientMode.ON),
        ('"on"', MediaMode.ON, ClientMode.ON),
        ("'on'", MediaMode.ON, ClientMode.ON),
        ("On", MediaMode.ON, ClientMode.ON),
        ("ON", MediaMode.ON, ClientMode.ON),
        ("off", MediaMode.OFF, ClientMode.OFF),
        ('"off"', MediaMode.OFF, ClientMode.OFF),
        ("Off", MediaMode.OFF, ClientMode.OFF),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bare_on_off_are_the_dte_words(written, media_mode, client_mode):
    scenario = parse(HOSTS_WITH.format(media=f", dte_mode: {written}", client=f", dte_mode: {written}"))
    assert scenario.hosts["m1"].dte_mode is media_mode
    assert scenario.hosts["c1"].dte_mode is client_mode


def test_bare_on_equals_quoted_on_everywhere():
    template = """\
    name: t
    hosts:
      p1: {{role: primary}}
      m1: {{role: media, dte_mode: {v}}}
      c1: {{role: client, dte_mode: {v}}}
    steps:
      - backup: {{client: c1, media: m1, as: i1}}
        expect: {{dte: {v}, fails: {f}}}
      - image_dte_mode: {{image: i1, mode: {v}}}
    """
    bare = parse(template.format(v="on", f="off"))
    quoted = parse(template.format(v='"on"', f='"off"'))
    assert bare.hosts == quoted.hosts
    assert bare.steps[0].expect == quoted.steps[0].expect
    assert bare.steps[0].expect.fails is False
    assert bare.steps[1].mode == quoted.steps[1].mode
    assert bare.steps[1].mode.is_on


@pytest.mark.parametrize("word", ["yes", "true", "1", "enabled"])
def test_other_truthy_words_are_not_a_dte_mode(word):
    err = error_of(HOSTS_WITH.format(media=f", dte_mode: {word}", client=""))
    assert (err.location.line, err.key) == (4, "hosts.m1.dte_mode")
    assert "use one of: on, off" in err.message


@pytest.mark.parametrize(
    "written, size",
    [("4096", 4096), ("512KiB", 512 << 10), ("64KiB", 64 << 10), ("8MiB", 8 << 20), ("2 MiB", 2 << 20),
     ("1.5MiB", 3 << 19), ("1GiB", 1 << 30), ("3mib", 3 << 20)],
)
def test_sizes(written, size):
    scenario = parse(HOSTS_WITH.format(media="", client=f", data: {{files: 3, size: {written}}}"))
    assert scenario.hosts["c1"].data.size == size
    assert scenario.hosts["c1"].data.files == 3


@pytest.mark.parametrize("written", ["8 MB/s", "MiB", "-1MiB", "1TiB", "65GiB", "'  '", "[1]"])
def test_bad_sizes(written):
    err = error_of(HOSTS_WITH.format(media="", client=f", data: {{size: {written}}}"))
    assert (err.location.line, err.key) == (5, "hosts.c1.data.size")
    assert "size" in err.message or "range" in err.message or "single value" in err.message


def test_step_options_are_typed():
    scenario = parse("""\
    name: t
    hosts:
      p1: {role: primary}
      m1: {role: media}
      c1: {role: client}
    steps:
      - backup: {client: c1, media: m1, as: full}
      - backup: {client: c1, media: m1, as: inc, kind: incremental, policy_type: universal_share}
      - fault: {kind: cut, link: [c1, m1], after: 1MiB}
      - heal: {link: [c1, m1]}
    """)
    inc = scenario.steps[1]
    assert (inc.kind, inc.policy_type) == (BackupKind.INCREMENTAL, PolicyType.UNIVERSAL_SHARE)
    assert scenario.steps[2].after_bytes == 1 << 20
    assert scenario.steps[2].link == ("c1", "m1")


def test_a_version_set_in_a_step_enables_the_media_mode_later():
    scenario = parse("""\
    name: t
    hosts:
      p1: {role: primary}
      m91: {role: media, version: "9.1"}
      c1: {role: client}
    steps:
      - set: {host: m91, version: "10.0"}
      - set: {host: m91, dte_mode: off}
    """)
    assert scenario.steps[1].dte_mode is MediaMode.OFF
    assert scenario.hosts["m91"].version == Version.parse("9.1"), "the starting state is kept in hosts"


# ======================================================================================
# Host profiles
# ======================================================================================


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A little project: hosts/ with profiles and topologies/ beside it."""
    (tmp_path / "hosts").mkdir()
    (tmp_path / "topologies").mkdir()
    (tmp_path / "hosts" / "client-9.1.yaml").write_text('role: client\nversion: "9.1"\ndata: {files: 3, size: 2MiB}\n')
    (tmp_path / "hosts" / "media-new.yaml").write_text('# comment\nrole: media\nversion: "10.5"\ndte_mode: off\n')
    (tmp_path / "hosts" / "media-bad.yaml").write_text('role: media\nversion: "9.1"\ndte_mode: on\n')
    (tmp_path / "hosts" / "typo.yaml").write_text('role: media\n\nverion: "10.5"\n')
    (tmp_path / "hosts" / "broken.yaml").write_text('role: media\n  version: "10.5"\n')
    return tmp_path


def write_topology(project: Path, hosts: str) -> Path:
    path = project / "topologies" / "t.yaml"
    path.write_text(
        "name: t\nhosts:\n  p1: {role: primary}\n" + hosts + "steps:\n  - set: {global_dte_mode: enforced}\n"
    )
    return path


def test_profile_values_are_used(project: Path):
    scenario = load_scenario(write_topology(project, "  c1: {profile: client-9.1}\n  m1: {profile: media-new}\n"))
    c1, m1 = scenario.hosts["c1"], scenario.hosts["m1"]
    assert (c1.role, c1.version, c1.dte_mode, c1.data.files, c1.data.size) == (Role.CLIENT, Version.parse("9.1"), None, 3, 2 << 20)
    assert (m1.role, m1.version, m1.dte_mode) == (Role.MEDIA, Version.parse("10.5"), MediaMode.OFF)


def test_topology_keys_override_the_profile(project: Path):
    path = write_topology(project, '  c1: {profile: client-9.1, version: "10.5", dte_mode: on}\n  m1: {profile: media-new, dte_mode: on}\n')
    scenario = load_scenario(path)
    assert (scenario.hosts["c1"].version, scenario.hosts["c1"].dte_mode) == (Version.parse("10.5"), ClientMode.ON)
    assert scenario.hosts["m1"].dte_mode is MediaMode.ON
    assert scenario.hosts["c1"].location.file == str(path)


def test_an_override_can_repair_a_profile(project: Path):
    scenario = load_scenario(write_topology(project, '  m1: {profile: media-bad, version: "10.0"}\n'))
    assert scenario.hosts["m1"].dte_mode is MediaMode.ON


def test_an_error_inside_a_profile_names_the_profile_file(project: Path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(write_topology(project, "  m1: {profile: media-bad}\n"))
    err = info.value
    assert Path(err.location.file) == project / "hosts" / "media-bad.yaml"
    assert (err.location.line, err.key) == (3, "hosts.m1.dte_mode")
    assert "10.0" in err.message


def test_an_unknown_key_inside_a_profile_names_the_profile_file(project: Path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(write_topology(project, "  m1: {profile: typo}\n"))
    err = info.value
    assert Path(err.location.file) == project / "hosts" / "typo.yaml"
    assert err.location.line == 3
    assert err.key.endswith("verion") and "did you mean 'version'" in err.message


def test_invalid_yaml_in_a_profile_names_the_profile(project: Path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(write_topology(project, "  m1: {profile: broken}\n"))
    assert "broken.yaml" in str(info.value)


def test_a_missing_profile_names_where_it_looked(project: Path):
    path = write_topology(project, "  m1: {profile: nope}\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    err = info.value
    assert (err.location.file, err.location.line, err.key) == (str(path), 4, "hosts.m1.profile")
    assert "nope.yaml" in err.message and str(project / "hosts") in err.message


def test_profiles_are_found_on_fabric_hosts_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    elsewhere = tmp_path / "shared-profiles"
    elsewhere.mkdir()
    (elsewhere / "edge.yaml").write_text('role: client\nversion: "9.1"\n')
    monkeypatch.setenv("FABRIC_HOSTS_PATH", str(elsewhere))
    path = tmp_path / "lonely.yaml"
    path.write_text("name: t\nhosts:\n  p1: {role: primary}\n  e1: {profile: edge}\nsteps:\n  - set: {host: e1, dte_mode: on}\n")
    assert elsewhere in default_profile_dirs(path)
    assert load_scenario(path).hosts["e1"].version == Version.parse("9.1")


# ======================================================================================
# Located errors
# ======================================================================================
# Each case marks the line(s) where the error may be reported with "# <-".

BASE = """\
name: t
hosts:
  p1: {role: primary, version: "10.5"}
  m1: {role: media, version: "10.5"}
  c1: {role: client, version: "10.5"}
"""

TWO_DOMAINS = """\
name: t
domains:
  prod: {}
  dr: {%s}
hosts:
  p1: {role: primary, domain: prod}
  m1: {role: media, domain: prod}
  m2: {role: media, domain: prod}
  c1: {role: client, domain: prod}
  p2: {role: primary, domain: dr}
  m3: {role: media, domain: dr}
  c3: {role: client, domain: dr}
steps:
  - backup: {client: c1, media: m1, as: i1}
"""

ERROR_CASES = [
    ("unknown-top-level-key", BASE + "sead: 7  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "sead", "did you mean 'seed'"),
    ("unknown-host-key", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media, verison: '10.5'}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.m1.verison", "did you mean 'version'"),
    ("unknown-host-in-step", BASE + "steps:\n  - backup: {client: c11, media: m1}  # <-\n",
     "steps[1].backup.client", ("unknown host 'c11'", "did you mean 'c1'")),
    ("unknown-host-in-set", BASE + "steps:\n  - set: {global_dte_mode: enforced}\n  - set: {host: m2, dte_mode: off}  # <-\n",
     "steps[2].set.host", "unknown host 'm2'"),
    ("client-where-media-expected", BASE + "steps:\n  - backup: {client: c1, media: c1}  # <-\n",
     "steps[1].backup.media", "not a media"),
    ("image-never-made", BASE + "steps:\n  - backup: {client: c1, media: m1, as: i1}\n  - restore: {image: i2, to: c1}  # <-\n",
     "steps[2].restore.image", "no earlier step made an image called 'i2'"),
    ("image-made-only-later", BASE + "steps:\n  - verify: {image: i1}  # <-\n  - backup: {client: c1, media: m1, as: i1}\n",
     "steps[1].verify.image", "no earlier step made an image called 'i1'"),
    ("image-made-twice", BASE + "steps:\n  - backup: {client: c1, media: m1, as: i1}\n  - backup: {client: c1, media: m1, as: i1}  # <-\n",
     "steps[2].backup.as", "already made"),
    ("media-mode-on-9.0", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media, version: '9.0', dte_mode: on}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.m1.dte_mode", "9.0"),
    ("media-mode-on-9.1", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media, version: '9.1', dte_mode: off}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.m1.dte_mode", "exists from 10.0"),
    ("media-mode-on-9.1-in-a-step", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media, version: '9.1'}\nsteps:\n  - set: {host: m1, dte_mode: off}  # <-\n",
     "steps[1].set.dte_mode", "exists from 10.0"),
    ("client-mode-on-8.3", "name: t\nhosts:\n  p1: {role: primary}\n  c1:\n    role: client\n    version: '8.3'\n    dte_mode: automatic  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.c1.dte_mode", "earlier than 9.1"),
    ("primary-dte-mode", "name: t\nhosts:\n  p1: {role: primary, dte_mode: on}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.p1.dte_mode", "global_dte_mode"),
    ("primary-missing", "name: t\nhosts:  # <-\n  m1: {role: media}  # <-\n  c1: {role: client}\nsteps:\n  - backup: {client: c1, media: m1}\n",
     "hosts", "no primary"),
    ("two-primaries", "name: t\nhosts:\n  m1: {role: media}\n  p1: {role: primary}\n  c1: {role: client}\n  p2: {role: primary}  # <-\nsteps:\n  - backup: {client: c1, media: m1}\n",
     "hosts.p2.role", "more than one primary"),
    ("bad-version", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media, version: 'ten'}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.m1.version", "not a NetBackup version"),
    ("bad-version-in-set", BASE + "steps:\n  - set: {host: m1, version: 10.x}  # <-\n",
     "steps[1].set.version", "not a NetBackup version"),
    ("bad-size", "name: t\nhosts:\n  p1: {role: primary}\n  c1:\n    role: client\n    data:\n      files: 3\n      size: 8 MB/s  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.c1.data.size", "not a size"),
    ("bad-global-mode", "name: t\nglobal_dte_mode: enforce  # <-\nhosts:\n  p1: {role: primary}\nsteps:\n  - set: {host: p1, version: '11.0'}\n",
     "global_dte_mode", "did you mean 'enforced'"),
    ("replicate-within-one-domain", TWO_DOMAINS % "trusts: [prod]" + "  - replicate: {image: i1, to: m2}  # <-\n",
     "steps[2].replicate.to", "another domain"),
    ("replicate-without-trust", TWO_DOMAINS % "" + "  - replicate: {image: i1, to: m3}  # <-\n",
     "steps[2].replicate.to", "does not trust"),
    ("import-without-replicate", TWO_DOMAINS % "trusts: [prod]" + "  - import: {image: i1, media: m3}  # <-\n",
     "steps[2].import.media", "no earlier replicate"),
    ("restore-across-domains-without-replication", TWO_DOMAINS % "trusts: [prod]" + "  - restore: {image: i1, to: c3}  # <-\n",
     "steps[2].restore", "replicate and import"),
    ("host-without-domain", "name: t\ndomains: {a: {}, b: {}}\nhosts:\n  p1: {role: primary, domain: a}\n  p2: {role: primary}  # <-\nsteps:\n  - set: {domain: a, global_dte_mode: enforced}\n",
     "hosts.p2.domain", "missing"),
    ("trusts-unknown-domain", "name: t\ndomains:\n  prod: {}\n  dr:\n    global_dte_mode: enforced\n    trusts: [prd]  # <-\nhosts:\n  p1: {role: primary, domain: prod}\nsteps:\n  - set: {domain: prod, global_dte_mode: enforced}\n",
     "domains.dr.trusts", "unknown domain 'prd'"),
    ("expect-on-set", BASE + "steps:\n  - set: {global_dte_mode: enforced}\n    expect: {status: 0}  # <-\n",
     "steps[1].expect", "nothing to expect"),
    ("expect-on-image-dte-mode", BASE + "steps:\n  - backup: {client: c1, media: m1, as: i1}\n  - image_dte_mode: {image: i1, mode: off}\n    expect: {status: 0}  # <-\n",
     "steps[2].expect", "nothing to expect"),
    ("expect-unknown-key", BASE + "steps:\n  - backup: {client: c1, media: m1}\n    expect: {stauts: 0}  # <-\n",
     "steps[1].expect.stauts", "did you mean 'status'"),
    ("expect-fails-false-with-status", BASE + "steps:\n  - backup: {client: c1, media: m1}\n    expect: {fails: false, status: 8301}  # <-\n",
     "steps[1].expect", "contradicts"),
    ("expect-fails-true-with-status-0", BASE + "steps:\n  - backup: {client: c1, media: m1}\n    expect: {fails: true, status: 0}  # <-\n",
     "steps[1].expect", "contradicts"),
    ("step-with-two-ops", BASE + "steps:\n  - backup: {client: c1, media: m1}\n  - verify: {image: x}  # <-\n    restore: {image: x, to: c1}\n",
     "steps[2]", "exactly one"),
    ("step-unknown-op", BASE + "steps:\n  - backpu: {client: c1, media: m1}  # <-\n",
     "steps[1].backpu", "did you mean 'backup'"),
    ("duplicate-top-level-key", BASE + "steps:\n  - set: {global_dte_mode: enforced}\nname: u  # <-\n",
     "name", "given twice"),
    ("duplicate-host-name", BASE + "  c1: {role: client}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.c1", "given twice"),
    ("duplicate-key-in-host", "name: t\nhosts:\n  p1: {role: primary}\n  m1: {role: media, role: client}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.m1.role", "given twice"),
    ("top-level-not-a-mapping", "- name: t  # <-\n- hosts: {}\n",
     "", "expected a mapping"),
    ("host-not-a-mapping", "name: t\nhosts:\n  p1: [primary, '10.5']  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts.p1", "expected a mapping"),
    ("steps-not-a-list", BASE + "steps:\n  backup: {client: c1, media: m1}  # <-\n",
     "steps", "expected a list"),
    ("step-not-a-mapping", BASE + "steps:\n  - backup  # <-\n",
     "steps[1]", "a step is a mapping"),
    ("name-missing", "hosts:  # <-\n  p1: {role: primary}\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "name", "missing"),
    ("bad-host-name", "name: t\nhosts:\n  p1: {role: primary}\n  'media 1': {role: media}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts", "not a valid name"),
    ("host-name-with-a-newline", "name: t\nhosts:\n  p1: {role: primary}\n  \"c1\\n\": {role: client}  # <-\nsteps:\n  - set: {global_dte_mode: enforced}\n",
     "hosts", "not a valid name"),
    ("cut-fault-without-link", BASE + "steps:\n  - fault: {kind: cut, host: m1}  # <-\n",
     "steps[1].fault", "link"),
    ("empty-file", "", "", "empty"),
    ("comments-only", "# nothing here yet\n", "", "empty"),
    ("invalid-yaml-tab", "name: t\n\thosts: {}  # <-\n", "", "not valid YAML"),
    ("invalid-yaml-mapping-in-scalar", "name: t\nhosts:\n  p1: {role: primary}\nsteps: a: b  # <-\n", "", "not valid YAML"),
    ("invalid-yaml-two-documents", BASE + "---  # <-\nname: u\n", "", "not valid YAML"),
]


def marked_lines(text: str) -> set[int]:
    lines = {n for n, line in enumerate(text.splitlines(), start=1) if "# <-" in line}
    return lines or {1}


@pytest.mark.parametrize("text, key, phrase", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_located_error(text: str, key: str, phrase: str | tuple[str, ...]):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "topologies/t.yaml", (HOSTS_DIR,))
    err = info.value
    assert err.location.file == "topologies/t.yaml"
    assert err.location.line in marked_lines(text), f"reported line {err.location.line}: {err}"
    assert err.key == key, str(err)
    for words in (phrase,) if isinstance(phrase, str) else phrase:
        assert words in err.message, str(err)
    assert str(err).startswith(f"topologies/t.yaml:{err.location.line}:{err.location.column}:")
    assert "\n" not in str(err).rstrip("\n"), "one line"


def test_errors_are_reported_from_a_real_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "steps:\n  - backup: {client: c11, media: m1}\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert (info.value.location.file, info.value.location.line) == (str(path), 7)
    assert "did you mean 'c1'" in info.value.message


def test_a_missing_file_is_a_scenario_error(tmp_path: Path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.message


NON_UTF8 = BASE.encode() + b"steps:\n  - set: {global_dte_mode: enforced}  # caf\xe9\n"


def test_non_utf8_bytes_are_a_clear_error(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(NON_UTF8)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    err = info.value
    assert err.location.file == str(path)
    assert err.key == "" and "UTF-8" in err.message


def test_non_utf8_error_names_the_line_of_the_bad_byte(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(NON_UTF8)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.location.line == 7, str(info.value)


def test_restore_in_the_dr_domain_after_import():
    """Replicate, import at DR, restore to a DR client: the contract's own DR story."""
    text = TWO_DOMAINS % "trusts: [prod]" + (
        "  - replicate: {image: i1, to: m3}\n"
        "  - import: {image: i1, media: m3}\n"
        "  - restore: {image: i1, to: c3}\n"
        "  - verify: {image: i1, media: m3}\n"
    )
    scenario = parse_scenario(text, "t.yaml")
    assert [s.op for s in scenario.steps] == ["backup", "replicate", "import", "restore", "verify"]


# ======================================================================================
# Fuzzing: nothing but Scenario or ScenarioError
# ======================================================================================


def parse_or_error(text: str, path: str = "fuzz.yaml") -> Scenario | ScenarioError:
    try:
        scenario = parse_scenario(text, path, (HOSTS_DIR,))
    except ScenarioError as err:
        assert isinstance(err.location.line, int) and err.location.line >= 0, err
        assert err.location.column >= 0, err
        if err.location.file == path:
            assert err.location.line <= text.count("\n") + 2, err
        assert str(err)
        return err
    plan = plan_scenario(scenario)  # what loads must also plan
    assert len(plan.steps) == len(scenario.steps)
    return scenario


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_any_text(text: str):
    parse_or_error(text)


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_fuzz_any_bytes_decoded(data: bytes):
    parse_or_error(data.decode("utf-8", errors="replace"))
    parse_or_error(data.decode("latin-1"))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzz_any_bytes_through_load_scenario(data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_bytes(data)
        try:
            load_scenario(path, (HOSTS_DIR,))
        except ScenarioError as err:
            assert err.location.line >= 0


# Random YAML built from the loader's own vocabulary reaches much deeper than random text.
WORDS = sorted({*TOP_KEYS, *HOST_KEYS, *STEP_KEYS, *(k for ks in STEP_KEYS.values() for k in ks),
                "expect", "status", "fails", "dte", "p1", "m1", "c1", "i1", "prod", "dr"})
VALUES = ["on", "off", "primary", "media", "client", "10.5", "9.0", "9.1", "8.3", "enforced", "preferred_on",
          "never", "always", "where_unsupported", "automatic", "8MiB", "0", "8309", "true", "p1", "m1", "c1", "i1",
          "legacy-8.3", "media-9.0", "crash", "cut", "incremental", "universal_share", "", "-1", "1e400"]
scalars = st.sampled_from(VALUES) | st.integers(-5, 10**6) | st.booleans() | st.none() | st.text(max_size=6)
yaml_trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(WORDS), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=250, deadline=None)
@given(st.dictionaries(st.sampled_from(WORDS), yaml_trees, max_size=6))
def test_fuzz_vocabulary_yaml(tree):
    parse_or_error(yaml.safe_dump(tree, default_flow_style=None, sort_keys=False))


QUICKSTART_LINES = QUICKSTART.read_text().splitlines()
TOKENS = st.sampled_from([*VALUES, *WORDS, "~", "[]", "{}", "[a, b]", "{x: 1}", "0x10", "99999999999999999999",
                          "'", '"', ":", "- ", "&a", "*a", "!!str", "!!binary", "|", ">", "#", "\t", "é", "null",
                          "1_000", "1.5", ".inf", "<<"]) | st.text(max_size=8)
_WORD = re.compile(r"[A-Za-z0-9_.\"'-]+")


@st.composite
def mutated_quickstart(draw) -> str:
    lines = list(QUICKSTART_LINES)
    for _ in range(draw(st.integers(1, 5))):
        if not lines:
            lines.append(draw(TOKENS))
            continue
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "indent", "insert"]))
        if edit == "delete":
            del lines[i]
        elif edit == "duplicate":
            lines.insert(i, lines[i])
        elif edit == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif edit == "replace":
            words = list(_WORD.finditer(lines[i]))
            if words:
                m = words[draw(st.integers(0, len(words) - 1))]
                lines[i] = lines[i][: m.start()] + draw(TOKENS) + lines[i][m.end():]
        elif edit == "indent":
            delta = draw(st.integers(-4, 4))
            stripped = lines[i].lstrip(" ")
            lines[i] = " " * max(0, len(lines[i]) - len(stripped) + delta) + stripped
        else:
            indent = " " * draw(st.sampled_from([0, 2, 4, 6, 13]))
            key = draw(st.sampled_from(WORDS) | st.text(min_size=1, max_size=6))
            lines.insert(i, f"{indent}{key}: {draw(TOKENS)}")
    return "\n".join(lines) + "\n"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_quickstart())
def test_fuzz_mutated_quickstart(text: str):
    parse_or_error(text, str(QUICKSTART))


def test_the_unmutated_quickstart_parses():
    """The mutation fuzzer starts from a valid scenario (otherwise it proves little)."""
    assert isinstance(parse_or_error("\n".join(QUICKSTART_LINES) + "\n", str(QUICKSTART)), Scenario)
