"""Tests for the NetBackup-style commands (fabric.admin) on a state folder a real run left.

Each command against `--state DIR` (the catalog file), against `--primary URL` (a served
API in another process), and through `fabric run --serve`; exit codes and one-line errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fabric import cli
from fabric.admin import FRAG_FIELDS, IMAGE_FIELDS
from fabric.catalog import Catalog
from fabric.dte import DteMode, GlobalMode, IgnoreImageMode
from fabric.scenario.loader import parse_scenario
from fabric.scenario.run import run_scenario

SCENARIO = """
name: admin-tests
seed: 11
global_dte_mode: preferred_on
hosts:
  primary1: {role: primary, version: "10.5"}
  media1:   {role: media,   version: "10.5"}
  media2:   {role: media,   version: "10.5"}
  web1:     {role: client,  version: "10.5", data: {files: 4, size: 1MiB}}
  legacy:   {role: client,  version: "8.3",  data: {files: 2, size: 256KiB}}
steps:
  - backup:    {client: web1, media: media1, as: web1-full}
    expect:    {dte: on}
  - backup:    {client: legacy, media: media1, as: legacy-full}
    expect:    {dte: off}
  - duplicate: {image: web1-full, to: media2}
    expect:    {dte: on}
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Path:
    """One real run for the module: daemons, MQTT, TLS legs, the catalog file."""
    state = tmp_path_factory.mktemp("ran")
    report = asyncio.run(run_scenario(parse_scenario(SCENARIO, "<admin-tests>"), state))
    assert report.ok, [(s.step, s.status, s.reason) for s in report.steps]
    return state


@pytest.fixture
def state(ran, tmp_path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(ran, copy)
    return copy


def catalog_of(state: Path) -> Catalog:
    return Catalog.open(state / "hosts" / "primary1" / "catalog.sqlite")


def ids_of(state: Path) -> dict[str, str]:
    with catalog_of(state) as catalog:
        return {i.client: i.backup_id for i in catalog.list_images(limit=100)}


def snapshot(state: Path) -> tuple:
    with catalog_of(state) as catalog:
        images = [(i.backup_id, i.image_dte_mode, i.revision) for i in catalog.list_images(limit=100)]
        return images, len(catalog.list_audit(limit=10_000)), catalog.get_settings("default"), catalog.host_dte_modes()


def fabric(capsys, *argv: str) -> tuple[int, str, str]:
    """`fabric ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---- --state: the catalog file --------------------------------------------------------------------


def test_bpimagelist_table_json_and_long(state, capsys):
    ids = ids_of(state)
    code, out, err = fabric(capsys, "bpimagelist", "--state", str(state))
    assert code == 0 and err == ""
    assert "Image DTE" in out and ids["web1"] in out and ids["legacy"] in out
    assert "1 media1 On/On, 2 media2 On/On" in out and "1 media1 Off/Off" in out

    code, out, _ = fabric(capsys, "bpimagelist", "--state", str(state), "-json")
    listed = {i["backupid"]: i for i in json.loads(out)}
    assert listed[ids["web1"]]["image_dteMode"] == 1 and listed[ids["legacy"]]["image_dteMode"] == 0
    assert [(f["copy_num"], f["copy_dtemode"], f["hierarchical_dtemode"]) for f in listed[ids["web1"]]["frags"]] == [(1, 1, 1), (2, 1, 1)]

    code, out, _ = fabric(capsys, "bpimagelist", "--state", str(state), "-l", "-backupid", ids["web1"])
    lines = out.splitlines()
    image = lines[0].split()[1:]
    assert lines[0].startswith("IMAGE ") and len(image) == len(IMAGE_FIELDS)
    # Reference §7.3: image_dteMode is the 62nd of 66 fields of the IMAGE line, after kilobytes_data_transferred.
    assert len(IMAGE_FIELDS) == 66 and IMAGE_FIELDS.index("image_dteMode") == 61 and image[61] == "1" and image[4] == ids["web1"]
    assert lines[1].startswith("HISTO -1")
    frags = [line.split()[1:] for line in lines if line.startswith("FRAG ")]
    assert len(frags) == 2 and all(len(f) == len(FRAG_FIELDS) for f in frags)
    at = FRAG_FIELDS.index("copy_dtemode")
    assert (len(FRAG_FIELDS), at) == (35, 30) and FRAG_FIELDS[at + 1] == "hierarchical_dtemode" and [f[at:at + 2] for f in frags] == [["1", "1"], ["1", "1"]]

    code, out, _ = fabric(capsys, "bpimagelist", "--state", str(state), "-client", "legacy", "-l")
    assert code == 0 and out.split()[1] == "legacy" and out.splitlines()[0].split()[62] == "0"


def test_bpimage_changes_the_mode_and_is_audited(state, capsys):
    backup_id = ids_of(state)["web1"]
    code, out, err = fabric(capsys, "bpimage", "-update", "-backupid", backup_id, "-image_dtemode", "Off", "--state", str(state))
    assert code == 0 and out.strip() == f"{backup_id}: image_dteMode Off"
    with catalog_of(state) as catalog:
        assert catalog.get_image(backup_id).image_dte_mode is DteMode.OFF
        last = catalog.list_audit()[-1]
    assert (last.actor, last.before, last.after) == (f"bpimage -update -backupid {backup_id} -image_dtemode Off", "on", "off")

    code, out, _ = fabric(capsys, "audit", "--state", str(state))
    assert code == 0 and f"image {backup_id} image_dte_mode" in out and "bpimage -update" in out
    code, out, _ = fabric(capsys, "audit", "--state", str(state), "-json")
    assert json.loads(out)[-1]["after"] == "off"


@pytest.mark.parametrize("args,code", [
    (["-backupid", "ID", "-image_dtemode", "Off"], 2),  # no -update
    (["-update", "-image_dtemode", "Off"], 2),  # no -backupid
    (["-update", "-backupid", "../x", "-image_dtemode", "Off"], 2),
    (["-update", "-backupid", "", "-image_dtemode", "Off"], 2),
    (["-update", "-backupid", "a" * 10_000 + "_1700000000", "-image_dtemode", "Off"], 2),
    (["-update", "-backupid", "../../etc_1700000000", "-image_dtemode", "Off"], 2),
    (["-update", "-backupid", "nosuch_1700000000", "-image_dtemode", "Off"], 227),
    (["-update", "-backupid", "ID", "-image_dtemode", "Maybe"], 2),
    (["-update", "-backupid", "ID"], 2),
    (["-update", "-backupid", "ID", "-client", "legacy", "-image_dtemode", "Off"], 2),
    (["-update", "-backupid", "ID", "-image_dtemode", "Off", "-bogus"], 2),
])
def test_bpimage_bad_input_is_one_line_and_changes_nothing(state, capsys, args, code):
    backup_id = ids_of(state)["web1"]
    before = snapshot(state)
    got, out, err = fabric(capsys, "bpimage", *[backup_id if a == "ID" else a for a in args], "--state", str(state))
    assert got == code and out == ""
    assert len(one_line(err)) < 300
    assert snapshot(state) == before


def test_bpimagelist_not_found_and_bad_ids(state, capsys):
    code, _, err = fabric(capsys, "bpimagelist", "--state", str(state), "-backupid", "nosuch_1700000000")
    assert code == 227 and "no image nosuch_1700000000" in one_line(err)
    code, _, err = fabric(capsys, "bpimagelist", "--state", str(state), "-client", "nosuch")
    assert code == 227 and one_line(err).endswith("no entity was found")
    code, _, err = fabric(capsys, "bpimagelist", "--state", str(state), "-backupid", "../x")
    assert code == 2 and "not a backup id" in one_line(err)


def test_bpdbjobs_shows_dte_mode_tls_and_cipher(state, capsys):
    code, out, err = fabric(capsys, "bpdbjobs", "-report", "--state", str(state))
    assert code == 0 and err == ""
    header, _, *rows = out.splitlines()
    assert header.split("  ")[0] == "JobID"
    for column in ("Type", "State", "Status", "Client", "Media Server", "DTE Mode", "TLS", "Cipher", "KB"):
        assert column in header
    assert any("Backup" in r and " On " in r and "TLSv1.3" in r and "TLS_" in r for r in rows)
    assert any("Backup" in r and "legacy" in r and " Off " in r for r in rows)

    code, out, _ = fabric(capsys, "bpdbjobs", "-json", "--state", str(state))
    jobs = json.loads(out)
    assert {j["dteMode"] for j in jobs} == {"On", "Off"} and all("tlsVersion" in j for j in jobs)
    code, out, _ = fabric(capsys, "bpdbjobs", "-jobid", "1", "-json", "--state", str(state))
    assert [j["jobId"] for j in json.loads(out)] == [1]
    assert fabric(capsys, "bpdbjobs", "-jobid", "x", "--state", str(state))[0] == 2
    assert fabric(capsys, "bpdbjobs", "-jobid", "999", "--state", str(state))[0] == 227


def test_nbseccmd_global_and_media_modes(state, capsys):
    code, out, _ = fabric(capsys, "nbseccmd", "-getsecurityconfig", "-dteglobalmode", "--state", str(state))
    assert code == 0 and out.strip() == "DTE Global Mode: PREFERRED_ON"
    code, out, _ = fabric(capsys, "nbseccmd", "-setsecurityconfig", "-dteglobalmode", "2", "--state", str(state))
    assert code == 0 and out.strip() == "DTE Global Mode: ENFORCED"
    for number, name in (("0", "PREFERRED_OFF"), ("1", "PREFERRED_ON")):
        fabric(capsys, "nbseccmd", "-setsecurityconfig", "-dteglobalmode", number, "--state", str(state))
        assert fabric(capsys, "nbseccmd", "-getsecurityconfig", "-dteglobalmode", "--state", str(state))[1].strip() == f"DTE Global Mode: {name}"
    code, out, _ = fabric(capsys, "nbseccmd", "-setsecurityconfig", "-dtemediamode", "off", "-mediaserver", "media2", "--state", str(state))
    assert code == 0 and out.strip() == "DTE Media Mode (media2): OFF"
    code, out, _ = fabric(capsys, "nbseccmd", "-getsecurityconfig", "-dtemediamode", "-mediaserver", "media2", "--state", str(state))
    assert code == 0 and out.strip() == "DTE Media Mode (media2): OFF"
    assert fabric(capsys, "nbseccmd", "-getsecurityconfig", "-dtemediamode", "-mediaserver", "web1", "--state", str(state))[0] == 2
    with catalog_of(state) as catalog:
        assert catalog.host_dte_modes() == {"media2": "off"}
        actors = [a.actor for a in catalog.list_audit()]
    assert actors == ["nbseccmd -setsecurityconfig -dteglobalmode 2", "nbseccmd -setsecurityconfig -dteglobalmode 0",
                      "nbseccmd -setsecurityconfig -dteglobalmode 1", "nbseccmd -setsecurityconfig -dtemediamode off -mediaserver media2"]

    before = snapshot(state)
    for args, code in [(["-setsecurityconfig", "-dteglobalmode", "3"], 2), (["-setsecurityconfig", "-dteglobalmode", "ENFORCED"], 2),
                       (["-setsecurityconfig"], 2), (["-setsecurityconfig", "-dtemediamode", "maybe", "-mediaserver", "media1"], 2),
                       (["-setsecurityconfig", "-dtemediamode", "on"], 2),
                       (["-setsecurityconfig", "-dtemediamode", "on", "-mediaserver", "web1"], 2),
                       (["-setsecurityconfig", "-dtemediamode", "on", "-mediaserver", "nosuch"], 227),
                       (["-getsecurityconfig", "-setsecurityconfig"], 2), ([], 2)]:
        got, out, err = fabric(capsys, "nbseccmd", *args, "--state", str(state))
        assert got == code, (args, err)
        one_line(err)
    assert snapshot(state) == before


def test_setconfig_client_mode_ignore_image_mode_and_media_mode(state, capsys, monkeypatch):
    code, out, _ = fabric(capsys, "bpsetconfig", "-h", "web1", "DTE_CLIENT_MODE = OFF", "--state", str(state))
    assert code == 0 and out.strip() == "web1: DTE_CLIENT_MODE = OFF"
    code, out, _ = fabric(capsys, "nbsetconfig", "DTE_IGNORE_IMAGE_MODE", "=", "WHERE_UNSUPPORTED", "--state", str(state))
    assert code == 0 and "DTE_IGNORE_IMAGE_MODE = WHERE_UNSUPPORTED" in out
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("MEDIA_DTE_MODE = OFF\n"))
    code, out, _ = fabric(capsys, "nbsetconfig", "-h", "media1", "--state", str(state))
    assert code == 0 and out.strip() == "media1: MEDIA_DTE_MODE = OFF"
    with catalog_of(state) as catalog:
        assert catalog.host_dte_modes() == {"media1": "off", "web1": "off"}
        assert catalog.get_settings("default").ignore_image_mode is IgnoreImageMode.WHERE_UNSUPPORTED
        assert catalog.list_audit()[0].actor == "bpsetconfig -h web1 DTE_CLIENT_MODE = OFF"
    code, out, _ = fabric(capsys, "bpgetconfig", "-h", "web1", "--state", str(state))
    assert code == 0 and "DTE_CLIENT_MODE = OFF" in out
    code, out, _ = fabric(capsys, "bpgetconfig", "--state", str(state))
    assert code == 0 and out.strip() == "DTE_IGNORE_IMAGE_MODE = WHERE_UNSUPPORTED"

    before = snapshot(state)
    for args, code in [(["-h", "media1", "DTE_CLIENT_MODE = ON"], 2), (["-h", "web1", "DTE_CLIENT_MODE = SOMETIMES"], 2),
                       (["-h", "media1", "MEDIA_DTE_MODE = AUTOMATIC"], 2), (["FOO = 1"], 2), (["garbage"], 2),
                       (["DTE_CLIENT_MODE = ON"], 2), (["-h", "web1", "DTE_IGNORE_IMAGE_MODE = ALWAYS"], 2),
                       (["-h", "nosuch", "DTE_CLIENT_MODE = ON"], 227), (["DTE_IGNORE_IMAGE_MODE = SOMETIMES"], 2)]:
        got, _, err = fabric(capsys, "bpsetconfig", *args, "--state", str(state))
        assert got == code, (args, err)
        one_line(err)
    assert snapshot(state) == before


def test_where_errors_are_one_line(state, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FABRIC_STATE", raising=False)
    monkeypatch.delenv("FABRIC_API_TOKEN", raising=False)
    for argv in (["bpimagelist"], ["bpimagelist", "--state", str(tmp_path / "nowhere")], ["audit", "--state", str(tmp_path)],
                 ["bpimagelist", "--primary", "ftp://x"], ["bpimagelist", "--primary", "http://127.0.0.1:9/netbackup"]):
        code, out, err = fabric(capsys, *argv)
        assert code == 2 and out == "", argv
        one_line(err)
    # Nothing listens there: one line, exit 1.
    code, _, err = fabric(capsys, "bpimagelist", "--primary", "http://127.0.0.1:9/netbackup", "--token-file", str(state / "nope"))
    assert code == 2 and "cannot read the API token" in one_line(err)
    (tmp_path / "tok").write_text("x")
    code, _, err = fabric(capsys, "bpimagelist", "--primary", "http://127.0.0.1:9", "--token-file", str(tmp_path / "tok"))
    assert code == 1 and "cannot reach the primary" in one_line(err)


# ---- --primary URL: a served API in another process -------------------------------------------------


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def stop(process: subprocess.Popen) -> tuple[int, str, str]:
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    return process.returncode, out, err


def test_commands_against_fabric_serve(state, capsys):
    server = subprocess.Popen([sys.executable, "-m", "fabric.cli", "serve", "--state", str(state)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_for(state / "hosts" / "primary1" / "api-url", server)
        token_file = state / "api-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        remote = ["--primary", url, "--token-file", str(token_file)]
        backup_id = ids_of(state)["web1"]

        code, out, _ = fabric(capsys, "bpimagelist", *remote, "-l")
        assert code == 0 and sum(line.startswith("IMAGE ") for line in out.splitlines()) == 2
        code, out, _ = fabric(capsys, "bpimage", "-update", "-backupid", backup_id, "-image_dtemode", "Off", *remote)
        assert code == 0
        code, out, _ = fabric(capsys, "nbseccmd", "-setsecurityconfig", "-dteglobalmode", "0", *remote)
        assert code == 0 and out.strip() == "DTE Global Mode: PREFERRED_OFF"
        code, out, _ = fabric(capsys, "bpsetconfig", "-h", "web1", "DTE_CLIENT_MODE = ON", *remote)
        assert code == 0 and out.strip() == "web1: DTE_CLIENT_MODE = ON"
        code, out, _ = fabric(capsys, "bpdbjobs", "-report", *remote)
        assert code == 0 and "TLSv1.3" in out
        # --state finds the running server and goes through it, not around it.
        code, out, _ = fabric(capsys, "bpimage", "-update", "-backupid", backup_id, "-image_dtemode", "On", "--state", str(state))
        assert code == 0
        code, out, _ = fabric(capsys, "audit", *remote, "-json")
        actors = [r["actor"] for r in json.loads(out)]
        assert actors == [f"REST PATCH /catalog/images/{backup_id} (bpimage -update -backupid {backup_id} -image_dtemode Off)",
                          "REST POST /security/properties (nbseccmd -setsecurityconfig -dteglobalmode 0)",
                          "REST POST /config/hosts/web1 (bpsetconfig -h web1 DTE_CLIENT_MODE = ON)",
                          f"REST PATCH /catalog/images/{backup_id} (bpimage -update -backupid {backup_id} -image_dtemode On)"]

        before = snapshot(state)
        for argv, code in [(["bpimage", "-update", "-backupid", "../x", "-image_dtemode", "On"], 2),
                           (["bpimage", "-update", "-backupid", "nosuch_1700000000", "-image_dtemode", "On"], 227),
                           (["nbseccmd", "-setsecurityconfig", "-dtemediamode", "on", "-mediaserver", "web1"], 2),
                           (["bpsetconfig", "-h", "media1", "MEDIA_DTE_MODE = AUTOMATIC"], 2)]:
            got, _, err = fabric(capsys, *argv, *remote)
            assert got == code, (argv, err)
            one_line(err)
        (state / "wrong-token").write_text("nope\n")
        code, _, err = fabric(capsys, "bpimage", "-update", "-backupid", backup_id, "-image_dtemode", "Off",
                              "--primary", url, "--token-file", str(state / "wrong-token"))
        assert code == 1 and "wrong token (HTTP 401)" in one_line(err)
        assert snapshot(state) == before
    finally:
        code, out, err = stop(server)
    assert code == 0, err
    assert "API of primary1 (domain default): http://127.0.0.1:" in out and "api-token" in out
    assert not (state / "hosts" / "primary1" / "api-url").exists()
    with catalog_of(state) as catalog:
        assert catalog.get_settings("default").global_mode is GlobalMode.PREFERRED_OFF


def test_run_serve_keeps_the_fabric_up_and_the_commands_reach_the_live_primary(tmp_path, capsys):
    scenario = tmp_path / "serve.yaml"
    scenario.write_text(SCENARIO.replace("name: admin-tests", "name: serve-tests"))
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-m", "fabric.cli", "run", str(scenario), "--state", str(state), "--serve"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(state / "hosts" / "primary1" / "api-url", run, 60)
        backup_id = ids_of(state)["web1"]
        code, _, err = fabric(capsys, "bpimage", "-update", "-backupid", backup_id, "-image_dtemode", "Off", "--state", str(state))
        assert code == 0, err
        # A host setting reaches the live primary, which pushes it to the client daemon.
        code, out, err = fabric(capsys, "bpsetconfig", "-h", "web1", "DTE_CLIENT_MODE = OFF", "--state", str(state))
        assert code == 0 and out.strip() == "web1: DTE_CLIENT_MODE = OFF", err
        code, out, _ = fabric(capsys, "bpgetconfig", "-h", "legacy", "--state", str(state))
        assert code == 0 and "VERSION = 8.3" in out  # only the live registry knows versions
        code, out, _ = fabric(capsys, "audit", "--state", str(state), "-json")
        assert [r["actor"].split(" (")[0] for r in json.loads(out)] == [f"REST PATCH /catalog/images/{backup_id}",
                                                                        "REST POST /config/hosts/web1"]
    finally:
        code, out, err = stop(run)
    assert code == 0, err
    assert "run: serve-tests (all expectations met" in out and "/netbackup" in out and "Ctrl-C to stop" in out


def test_up_brings_a_topology_up_for_the_commands(tmp_path, capsys):
    """`fabric up`: the topology without its steps, its primary's API up until Ctrl-C."""
    scenario = tmp_path / "up.yaml"
    scenario.write_text(SCENARIO.replace("name: admin-tests", "name: up-tests"))
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen([sys.executable, "-m", "fabric.cli", "up", str(scenario), "--state", str(state)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(state / "hosts" / "primary1" / "api-url", up, 60)
        code, out, err = fabric(capsys, "nbseccmd", "-setsecurityconfig", "-dteglobalmode", "2", "--state", str(state))
        assert code == 0, err
        code, out, _ = fabric(capsys, "nbseccmd", "-getsecurityconfig", "-dteglobalmode", "--state", str(state))
        assert code == 0 and "ENFORCED" in out
        code, _, _ = fabric(capsys, "bpimagelist", "--state", str(state))
        assert code == 227  # no steps ran, so no images: NetBackup's "no entity was found"
    finally:
        code, out, err = stop(up)
    assert code == 0, err
    assert "hosts up; broker mqtt://127.0.0.1:" in out
