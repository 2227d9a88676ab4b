"""fabric.dte reproduces the DTE decision tables of the reference, cell by cell.

Each table of /work/shared/reference/netbackup-dte.md §6 is transcribed below as literal
E/N/F data, in the reference's own row and column order, so it can be compared with the
document side by side (E = encrypted, N = not encrypted, F = the job fails). Every cell
the reference tags [S] is checked against the matching `fabric.dte.decide_*` function;
cells that are inferred ([I] in the reference, or an `INFERRED_*` choice in dte.py) are
checked too and marked "[I]" where they appear.

Every cell is run with one or more concrete host line-ups ("variants") that fit its
column, e.g. "client 9.1+" is tried with a 9.1 and a 10.5 client, "media server 9.1+ DTE
On" with a 9.1 server (no DTE setting yet, so On) and a 10.x server set On. For every
cell that fails, the test also checks that the cause maps to a DTE status (83xx) through
`fabric.status.for_dte_failure` and that the reason names the host that blocks the job.

The rest of the file covers the facts around the tables: client DTE mode defaults (§2,
§4), media server default (§5), domain defaults (§2, §7.4), `image_dte_mode` and
`copy_attributes` (§7.1), `negotiated_tls_version` (§9.3), the §8.3 candidate status
codes, and `Version.parse` ordering and bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from fabric.dte import (
    ClientMode,
    Decision,
    DomainSettings,
    DteMode,
    FailCause,
    GlobalMode,
    Host,
    IgnoreImageMode,
    MediaMode,
    Outcome,
    Role,
    Version,
    copy_attributes,
    decide_backup,
    decide_duplication,
    decide_import,
    decide_replication,
    decide_restore,
    decide_synthetic,
    decide_universal_share_backup,
    decide_verify,
    image_dte_mode,
    negotiated_tls_version,
)
from fabric.status import Status, for_dte_failure

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

CELL = {"E": Decision.ENCRYPT, "N": Decision.PLAINTEXT, "F": Decision.FAIL}
GLOBAL = {
    "PreferredOff": GlobalMode.PREFERRED_OFF,
    "PreferredOn": GlobalMode.PREFERRED_ON,
    "Enforced": GlobalMode.ENFORCED,
}
IGNORE = {
    "NEVER": IgnoreImageMode.NEVER,
    "WHERE_UNSUPPORTED": IgnoreImageMode.WHERE_UNSUPPORTED,
    "ALWAYS": IgnoreImageMode.ALWAYS,
}
IGNORE_COLUMNS = ("NEVER", "WHERE_UNSUPPORTED", "ALWAYS")

# Host names are chosen so that none is a substring of another (reason checks).
CLIENT, MEDIA, SOURCE, TARGET, THIRD = "client-x", "media-a", "media-src", "media-dst", "media-3rd"


def client(version: str, mode: ClientMode | None = None, name: str = CLIENT) -> Host:
    return Host(name, Role.CLIENT, Version.parse(version), mode)


def media(version: str, mode: MediaMode | None = None, name: str = MEDIA) -> Host:
    return Host(name, Role.MEDIA, Version.parse(version), mode)


def label(host: Host) -> str:
    mode = "" if host.dte_mode is None else host.dte_mode.name.capitalize()
    return f"{host.role.value[0]}{host.version}{mode}"


@dataclass(frozen=True)
class Variant:
    """One concrete host line-up for a table column."""

    hosts: tuple[Host, ...]
    blockers: frozenset[str]  # hosts a failure's reason may name as the cause

    @property
    def id(self) -> str:
        return "-".join(label(h) for h in self.hosts)


def variant(*hosts: Host, blockers: tuple[str, ...] = ()) -> Variant:
    return Variant(tuple(hosts), frozenset(blockers))


@dataclass(frozen=True)
class Cell:
    global_mode: GlobalMode
    ignore: IgnoreImageMode
    expected: Decision
    run: Callable[[DomainSettings], Outcome]
    blockers: frozenset[str]


def check(cell: Cell) -> None:
    outcome = cell.run(DomainSettings(cell.global_mode, cell.ignore))
    assert isinstance(outcome, Outcome)
    assert outcome.decision is cell.expected, (
        f"expected {cell.expected.value}, got {outcome.decision.value}: {outcome.reason}"
    )
    if outcome.decision is Decision.FAIL:
        assert outcome.cause is not None, outcome.reason
        status = for_dte_failure(outcome.cause.name)
        assert 8300 <= int(status) <= 8399, status
        assert any(name in outcome.reason for name in cell.blockers), (
            f"reason names none of {sorted(cell.blockers)}: {outcome.reason}"
        )
    else:
        assert outcome.cause is None, outcome
    assert outcome.reason.strip(), "every decision carries a readable reason"


def expand_columns(
    section: str,
    table: dict[str, tuple[str, ...]],
    columns: tuple[tuple[str, tuple[Variant, ...]], ...],
    run: Callable[[Variant], Callable[[DomainSettings], Outcome]],
    ignore: IgnoreImageMode = IgnoreImageMode.NEVER,
    marks: dict[tuple[str, str], str] | None = None,
):
    """A table with global-mode rows and host columns -> one pytest.param per cell x variant."""
    params = []
    for row, cells in table.items():
        assert len(cells) == len(columns), (section, row)
        for (column, variants), code in zip(columns, cells):
            for v in variants:
                params.append(
                    pytest.param(
                        Cell(GLOBAL[row], ignore, CELL[code], run(v), v.blockers),
                        id=f"{section}-{row}-{column}-{v.id}",
                    )
                )
    return params


def expand_ignore(
    section: str,
    table: dict[tuple[str, str], tuple[str, str, str]],
    rows: dict[str, tuple[Variant, ...]],
    run: Callable[[Variant], Callable[[DomainSettings], Outcome]],
):
    """An image-On table: rows (global mode, host class), columns DTE_IGNORE_IMAGE_MODE."""
    params = []
    for (row, hosts), cells in table.items():
        for ignore, code in zip(IGNORE_COLUMNS, cells):
            for v in rows[hosts]:
                params.append(
                    pytest.param(
                        Cell(GLOBAL[row], IGNORE[ignore], CELL[code], run(v), v.blockers),
                        id=f"{section}-{row}-{hosts}-{ignore}-{v.id}",
                    )
                )
    return params


def expand_global_ignore(
    section: str,
    table: dict[str, tuple[str, str, str]],
    variants: tuple[Variant, ...],
    run: Callable[[Variant], Callable[[DomainSettings], Outcome]],
):
    """An image-On / media-Off table: rows global mode, columns DTE_IGNORE_IMAGE_MODE."""
    params = []
    for row, cells in table.items():
        for ignore, code in zip(IGNORE_COLUMNS, cells):
            for v in variants:
                params.append(
                    pytest.param(
                        Cell(GLOBAL[row], IGNORE[ignore], CELL[code], run(v), v.blockers),
                        id=f"{section}-{row}-{ignore}-{v.id}",
                    )
                )
    return params


# ======================================================================================
# §6.1 Backup (client <-> media server) [S] D-BACKUP
# ======================================================================================

# Media server DTE mode On (default).
#                 client 9.1+ On | client 9.1+ Off | client 9.1+ Automatic | any host < 9.1
BACKUP_MEDIA_ON = {
    "PreferredOff": ("E", "N", "N", "N"),
    "PreferredOn":  ("E", "N", "E", "N"),
    "Enforced":     ("E", "F", "E", "F"),
}  # fmt: skip

# Media server DTE mode Off.
#                 client On | client Off | client Automatic | host < 9.1
BACKUP_MEDIA_OFF = {
    "PreferredOff": ("F", "N", "N", "N"),
    "PreferredOn":  ("F", "N", "N", "N"),
    "Enforced":     ("F", "F", "F", "F"),
}  # fmt: skip

ON, OFF, AUTO = ClientMode.ON, ClientMode.OFF, ClientMode.AUTOMATIC
M_ON, M_OFF = MediaMode.ON, MediaMode.OFF

BACKUP_MEDIA_ON_COLUMNS = (
    ("clientOn", (
        variant(client("9.1", ON), media("10.5", M_ON)),
        variant(client("10.5", ON), media("9.1")),  # 9.1 media server: no DTE setting, acts On
    )),
    ("clientOff", (
        variant(client("9.1", OFF), media("10.5", M_ON), blockers=(CLIENT,)),
        variant(client("11.0", OFF), media("10.0"), blockers=(CLIENT,)),  # 10.0 media default On
    )),
    ("clientAutomatic", (
        variant(client("9.1", AUTO), media("10.0.0.1", M_ON)),
        variant(client("10.5", AUTO), media("9.1")),
    )),
    ("anyHostBefore9.1", (
        variant(client("8.3"), media("10.5", M_ON), blockers=(CLIENT,)),
        variant(client("10.5", ON), media("9.0"), blockers=(MEDIA,)),
        variant(client("10.5", AUTO), media("9.0"), blockers=(MEDIA,)),
        variant(client("8.3"), media("9.0"), blockers=(CLIENT, MEDIA)),
    )),
)  # fmt: skip

BACKUP_MEDIA_OFF_COLUMNS = (
    ("clientOn", (
        variant(client("9.1", ON), media("10.0", M_OFF), blockers=(MEDIA,)),
        variant(client("10.5", ON), media("10.5", M_OFF), blockers=(MEDIA,)),
    )),
    ("clientOff", (
        variant(client("9.1", OFF), media("10.5", M_OFF), blockers=(MEDIA, CLIENT)),
        variant(client("10.5", OFF), media("11.0", M_OFF), blockers=(MEDIA, CLIENT)),
    )),
    ("clientAutomatic", (
        variant(client("9.1", AUTO), media("10.5", M_OFF), blockers=(MEDIA,)),
        variant(client("10.0", AUTO), media("10.0.0.1", M_OFF), blockers=(MEDIA,)),
    )),
    # A media server whose DTE mode can be Off is 10.0+, so the host < 9.1 is the client.
    ("hostBefore9.1", (
        variant(client("8.3"), media("10.5", M_OFF), blockers=(CLIENT, MEDIA)),
        variant(client("9.0"), media("10.0", M_OFF), blockers=(CLIENT, MEDIA)),
    )),
)  # fmt: skip


def run_backup(v: Variant):
    c, m = v.hosts
    return lambda s: decide_backup(s, c, m)


BACKUP_CASES = [
    *expand_columns("6.1-mediaOn", BACKUP_MEDIA_ON, BACKUP_MEDIA_ON_COLUMNS, run_backup),
    *expand_columns("6.1-mediaOff", BACKUP_MEDIA_OFF, BACKUP_MEDIA_OFF_COLUMNS, run_backup),
]


@pytest.mark.parametrize("cell", BACKUP_CASES)
def test_6_1_backup(cell: Cell) -> None:
    check(cell)


@pytest.mark.parametrize("ignore", list(IgnoreImageMode), ids=lambda i: i.name)
def test_6_1_backup_ignores_dte_ignore_image_mode(ignore: IgnoreImageMode) -> None:
    """A backup makes a new image: DTE_IGNORE_IMAGE_MODE plays no part (§6.12 step 1)."""
    for row, cells in BACKUP_MEDIA_ON.items():
        for (column, variants), code in zip(BACKUP_MEDIA_ON_COLUMNS, cells):
            c, m = variants[0].hosts
            assert decide_backup(DomainSettings(GLOBAL[row], ignore), c, m).decision is CELL[code], (row, column)


# ======================================================================================
# §6.2 Restore [S] D-RESTORE: image DTE mode Off is "identical to the two backup tables".
# Image DTE mode On is [I] in the reference (page truncated).
# ======================================================================================


def run_restore_image_off(v: Variant):
    c, m = v.hosts
    return lambda s: decide_restore(s, False, c, [m])


def run_restore_image_off_two_media(v: Variant):
    # "one or more media servers involved (if multiple images are selected)"
    c, m = v.hosts
    second = Host(THIRD, m.role, m.version, m.dte_mode)
    return lambda s: decide_restore(s, False, c, [m, second])


RESTORE_IMAGE_OFF_CASES = [
    *expand_columns("6.2-imageOff-mediaOn", BACKUP_MEDIA_ON, BACKUP_MEDIA_ON_COLUMNS, run_restore_image_off),
    *expand_columns("6.2-imageOff-mediaOff", BACKUP_MEDIA_OFF, BACKUP_MEDIA_OFF_COLUMNS, run_restore_image_off),
    *expand_columns(
        "6.2-imageOff-mediaOn-twoMedia", BACKUP_MEDIA_ON, BACKUP_MEDIA_ON_COLUMNS, run_restore_image_off_two_media
    ),
    *expand_columns(
        "6.2-imageOff-mediaOff-twoMedia", BACKUP_MEDIA_OFF, BACKUP_MEDIA_OFF_COLUMNS, run_restore_image_off_two_media
    ),
]


@pytest.mark.parametrize("cell", RESTORE_IMAGE_OFF_CASES)
def test_6_2_restore_image_off(cell: Cell) -> None:
    check(cell)


# [I] §6.2 image On, media server On. "=off" means "use the image-Off table" (§6.1),
# which depends on the client mode; the NEVER/WHERE_UNSUPPORTED cells for 9.1+ hosts do
# not (image wins, including client Off: INFERRED_RESTORE_IMAGE_ON_CLIENT_OFF_ENCRYPTS).
#                                      NEVER | WHERE_UNSUPPORTED | ALWAYS
RESTORE_IMAGE_ON_MEDIA_ON = {  # [I]
    ("PreferredOff", "all9.1+"):       ("E", "E", "=off"),
    ("PreferredOff", "anyBefore9.1"):  ("F", "N", "N"),
    ("PreferredOn", "all9.1+"):        ("E", "E", "=off"),
    ("PreferredOn", "anyBefore9.1"):   ("F", "N", "N"),
    ("Enforced", "all9.1+"):           ("E", "E", "=off"),
    ("Enforced", "anyBefore9.1"):      ("F", "F", "F"),
}  # fmt: skip

# [I] §6.2 image On, media server (10.0+) Off.
#                  NEVER | WHERE_UNSUPPORTED | ALWAYS
RESTORE_IMAGE_ON_MEDIA_OFF = {  # [I]
    "PreferredOff": ("F", "F", "=off"),
    "PreferredOn":  ("F", "F", "=off"),
    "Enforced":     ("F", "F", "F"),
}  # fmt: skip

CLIENT_COLUMNS = ("clientOn", "clientOff", "clientAutomatic")


def _restore_image_on_cases():
    params = []
    on_columns = dict(BACKUP_MEDIA_ON_COLUMNS)
    for (row, hosts), cells in RESTORE_IMAGE_ON_MEDIA_ON.items():
        columns = CLIENT_COLUMNS if hosts == "all9.1+" else ("anyHostBefore9.1",)
        for column in columns:
            for ignore, code in zip(IGNORE_COLUMNS, cells):
                if code == "=off":
                    code = BACKUP_MEDIA_ON[row][CLIENT_COLUMNS.index(column)]
                for v in on_columns[column]:
                    c, m = v.hosts
                    params.append(pytest.param(
                        Cell(GLOBAL[row], IGNORE[ignore], CELL[code],
                             (lambda c, m: lambda s: decide_restore(s, True, c, [m]))(c, m),
                             v.blockers | {c.name, m.name}),
                        id=f"6.2-imageOn-mediaOn-{row}-{hosts}-{column}-{ignore}-{v.id}",
                    ))  # fmt: skip
    off_columns = dict(BACKUP_MEDIA_OFF_COLUMNS)
    for row, cells in RESTORE_IMAGE_ON_MEDIA_OFF.items():
        for column in CLIENT_COLUMNS:
            for ignore, code in zip(IGNORE_COLUMNS, cells):
                if code == "=off":
                    code = BACKUP_MEDIA_OFF[row][CLIENT_COLUMNS.index(column)]
                for v in off_columns[column]:
                    c, m = v.hosts
                    params.append(pytest.param(
                        Cell(GLOBAL[row], IGNORE[ignore], CELL[code],
                             (lambda c, m: lambda s: decide_restore(s, True, c, [m]))(c, m),
                             frozenset({m.name})),
                        id=f"6.2-imageOn-mediaOff-{row}-{column}-{ignore}-{v.id}",
                    ))  # fmt: skip
    return params


@pytest.mark.parametrize("cell", _restore_image_on_cases())
def test_6_2_restore_image_on_inferred(cell: Cell) -> None:  # [I]
    check(cell)


# ======================================================================================
# §6.3 Duplication (source media server -> target media server, no client) [S] D-DUP
# ======================================================================================

# Image DTE mode Off.
#                 both 9.1+ DTE On | both 9.1+ DTE Off | one earlier than 9.1
DUP_IMAGE_OFF = {
    "PreferredOff": ("N", "N", "N"),
    "PreferredOn":  ("E", "N", "N"),
    "Enforced":     ("E", "F", "F"),
}  # fmt: skip

# Image DTE mode On, media server DTE setting On.
#                                      NEVER | WHERE_UNSUPPORTED | ALWAYS
DUP_IMAGE_ON_MEDIA_ON = {
    ("PreferredOff", "both9.1+"):      ("E", "E", "N"),
    ("PreferredOff", "anyBefore9.1"):  ("F", "N", "N"),
    ("PreferredOn", "both9.1+"):       ("E", "E", "E"),
    ("PreferredOn", "anyBefore9.1"):   ("F", "N", "N"),
    ("Enforced", "both9.1+"):          ("E", "E", "E"),
    ("Enforced", "anyBefore9.1"):      ("F", "F", "F"),
}  # fmt: skip

# Image DTE mode On, media server DTE setting (10.0+) Off. The Preferred Off NEVER and
# WHERE_UNSUPPORTED cells are [S]; the rest is [S] from the identical Verify table / [I]
# for duplication, as the reference says.
#                  NEVER | WHERE_UNSUPPORTED | ALWAYS
DUP_IMAGE_ON_MEDIA_OFF = {
    "PreferredOff": ("F", "F", "N"),
    "PreferredOn":  ("F", "F", "N"),
    "Enforced":     ("F", "F", "F"),
}  # fmt: skip


def src(version: str, mode: MediaMode | None = None) -> Host:
    return media(version, mode, SOURCE)


def dst(version: str, mode: MediaMode | None = None) -> Host:
    return media(version, mode, TARGET)


PAIR_BOTH_ON = (
    variant(src("10.5", M_ON), dst("9.1")),
    variant(src("9.1"), dst("11.0", M_ON)),
    variant(src("10.0.0.1"), dst("10.4")),  # 10.x with no mode set: default On
)
PAIR_BOTH_OFF = (
    variant(src("10.5", M_OFF), dst("10.0", M_OFF), blockers=(SOURCE, TARGET)),
    variant(src("11.0", M_OFF), dst("10.4", M_OFF), blockers=(SOURCE, TARGET)),
)
PAIR_ONE_OLD = (
    variant(src("9.0"), dst("10.5", M_ON), blockers=(SOURCE,)),
    variant(src("10.5", M_ON), dst("8.3"), blockers=(TARGET,)),
    variant(src("9.0"), dst("9.1"), blockers=(SOURCE,)),
    variant(src("8.3"), dst("9.0"), blockers=(SOURCE, TARGET)),
)
# [I] one On and one Off is not documented; INFERRED_ANY_MEDIA_OFF_MEANS_OFF.
PAIR_ONE_OFF = (
    variant(src("10.5", M_ON), dst("10.5", M_OFF), blockers=(TARGET,)),
    variant(src("10.0", M_OFF), dst("9.1"), blockers=(SOURCE,)),
)

PAIR_COLUMNS = (("bothOn", PAIR_BOTH_ON), ("bothOff", PAIR_BOTH_OFF), ("oneBefore9.1", PAIR_ONE_OLD))
PAIR_IMAGE_ON_ROWS = {"both9.1+": PAIR_BOTH_ON, "anyBefore9.1": PAIR_ONE_OLD}


def run_dup(image_on: bool):
    def make(v: Variant):
        a, b = v.hosts
        return lambda s: decide_duplication(s, image_on, a, b)

    return make


DUP_CASES = [
    *expand_columns("6.3-imageOff", DUP_IMAGE_OFF, PAIR_COLUMNS, run_dup(False)),
    *expand_ignore("6.3-imageOn-mediaOn", DUP_IMAGE_ON_MEDIA_ON, PAIR_IMAGE_ON_ROWS, run_dup(True)),
    *expand_global_ignore("6.3-imageOn-mediaOff", DUP_IMAGE_ON_MEDIA_OFF, PAIR_BOTH_OFF, run_dup(True)),
]

# [I] one media server On and the other Off behaves as "both Off".
DUP_INFERRED_CASES = [
    *expand_columns("6.3-imageOff", {r: (c[1],) for r, c in DUP_IMAGE_OFF.items()},
                    (("oneOff", PAIR_ONE_OFF),), run_dup(False)),
    *expand_global_ignore("6.3-imageOn-mediaOff-oneOff", DUP_IMAGE_ON_MEDIA_OFF, PAIR_ONE_OFF, run_dup(True)),
]  # fmt: skip


@pytest.mark.parametrize("cell", DUP_CASES)
def test_6_3_duplication(cell: Cell) -> None:
    check(cell)


@pytest.mark.parametrize("cell", DUP_INFERRED_CASES)
def test_6_3_duplication_one_media_off_inferred(cell: Cell) -> None:  # [I]
    check(cell)


# ======================================================================================
# §6.4 Replication (AIR, MSDP; decided by the source domain's settings) [S] D-REPL
# ======================================================================================

# Image DTE mode Off. Note the documented E for media servers earlier than 9.1 (MSDP's
# OPTDUP_ENCRYPTION carries it), unlike every other table.
#                 media 9.1+ DTE On | media 9.1+ DTE Off | media earlier than 9.1
REPL_IMAGE_OFF = {
    "PreferredOff": ("N", "N", "N"),
    "PreferredOn":  ("E", "N", "E"),
    "Enforced":     ("E", "F", "E"),
}  # fmt: skip

# Image DTE mode On, media server DTE On.
#                                      NEVER | WHERE_UNSUPPORTED | ALWAYS
REPL_IMAGE_ON_MEDIA_ON = {
    ("PreferredOff", "9.1+"):          ("E", "E", "N"),
    ("PreferredOff", "before9.1"):     ("E", "E", "N"),
    ("PreferredOn", "9.1+"):           ("E", "E", "E"),
    ("PreferredOn", "before9.1"):      ("E", "E", "E"),
    ("Enforced", "9.1+"):              ("E", "E", "E"),
    ("Enforced", "before9.1"):         ("E", "E", "E"),
}  # fmt: skip

# [I] Image On, media server Off: not in the available copy; treated like §6.3.
#                  NEVER | WHERE_UNSUPPORTED | ALWAYS
REPL_IMAGE_ON_MEDIA_OFF = {  # [I]
    "PreferredOff": ("F", "F", "N"),
    "PreferredOn":  ("F", "F", "N"),
    "Enforced":     ("F", "F", "F"),
}  # fmt: skip

REPL_OLD = (
    variant(src("9.0"), dst("9.0")),
    variant(src("8.3"), dst("10.5", M_ON)),
    variant(src("10.5", M_ON), dst("9.0")),
)
REPL_COLUMNS = (("mediaOn", PAIR_BOTH_ON), ("mediaOff", PAIR_BOTH_OFF), ("mediaBefore9.1", REPL_OLD))
REPL_IMAGE_ON_ROWS = {"9.1+": PAIR_BOTH_ON, "before9.1": REPL_OLD}


def run_repl(image_on: bool):
    def make(v: Variant):
        a, b = v.hosts
        return lambda s: decide_replication(s, image_on, a, b)

    return make


REPL_CASES = [
    *expand_columns("6.4-imageOff", REPL_IMAGE_OFF, REPL_COLUMNS, run_repl(False)),
    *expand_ignore("6.4-imageOn-mediaOn", REPL_IMAGE_ON_MEDIA_ON, REPL_IMAGE_ON_ROWS, run_repl(True)),
]
REPL_INFERRED_CASES = expand_global_ignore(
    "6.4-imageOn-mediaOff", REPL_IMAGE_ON_MEDIA_OFF, PAIR_BOTH_OFF, run_repl(True)
)  # [I]


@pytest.mark.parametrize("cell", REPL_CASES)
def test_6_4_replication(cell: Cell) -> None:
    check(cell)


@pytest.mark.parametrize("cell", REPL_INFERRED_CASES)
def test_6_4_replication_image_on_media_off_inferred(cell: Cell) -> None:  # [I]
    check(cell)


# ======================================================================================
# §6.5 Verify (one media server, no client) [S] D-VERIFY; §6.7 Import follows it [I]
# ======================================================================================

# Image DTE mode Off.
#                 media 9.1+ DTE On | media 9.1+ DTE Off | media earlier than 9.1
VERIFY_IMAGE_OFF = {
    "PreferredOff": ("N", "N", "N"),
    "PreferredOn":  ("E", "N", "N"),
    "Enforced":     ("E", "F", "F"),
}  # fmt: skip

# Image On, media server DTE On.
#                                      NEVER | WHERE_UNSUPPORTED | ALWAYS
VERIFY_IMAGE_ON_MEDIA_ON = {
    ("PreferredOff", "9.1+"):          ("E", "E", "N"),
    ("PreferredOff", "before9.1"):     ("F", "N", "N"),
    ("PreferredOn", "9.1+"):           ("E", "E", "E"),
    ("PreferredOn", "before9.1"):      ("F", "N", "N"),
    ("Enforced", "9.1+"):              ("E", "E", "E"),
    ("Enforced", "before9.1"):         ("F", "F", "F"),
}  # fmt: skip

# Image On, media server DTE (10.0+) Off.
#                  NEVER | WHERE_UNSUPPORTED | ALWAYS
VERIFY_IMAGE_ON_MEDIA_OFF = {
    "PreferredOff": ("F", "F", "N"),
    "PreferredOn":  ("F", "F", "N"),
    "Enforced":     ("F", "F", "F"),
}  # fmt: skip

ONE_ON = (variant(media("10.5", M_ON)), variant(media("9.1")), variant(media("10.0")))
ONE_OFF = (variant(media("10.5", M_OFF), blockers=(MEDIA,)), variant(media("10.0", M_OFF), blockers=(MEDIA,)))
ONE_OLD = (variant(media("9.0"), blockers=(MEDIA,)), variant(media("8.3"), blockers=(MEDIA,)))
ONE_COLUMNS = (("mediaOn", ONE_ON), ("mediaOff", ONE_OFF), ("mediaBefore9.1", ONE_OLD))
ONE_IMAGE_ON_ROWS = {"9.1+": ONE_ON, "before9.1": ONE_OLD}


def run_single(decide, image_on: bool):
    def make(v: Variant):
        (m,) = v.hosts
        return lambda s: decide(s, image_on, m)

    return make


VERIFY_CASES = [
    *expand_columns("6.5-imageOff", VERIFY_IMAGE_OFF, ONE_COLUMNS, run_single(decide_verify, False)),
    *expand_ignore("6.5-imageOn-mediaOn", VERIFY_IMAGE_ON_MEDIA_ON, ONE_IMAGE_ON_ROWS, run_single(decide_verify, True)),
    *expand_global_ignore("6.5-imageOn-mediaOff", VERIFY_IMAGE_ON_MEDIA_OFF, ONE_OFF, run_single(decide_verify, True)),
]

# [I] §6.7: no import table exists; import follows Verify (INFERRED_IMPORT_FOLLOWS).
IMPORT_CASES = [
    *expand_columns("6.7-imageOff", VERIFY_IMAGE_OFF, ONE_COLUMNS, run_single(decide_import, False)),
    *expand_ignore("6.7-imageOn-mediaOn", VERIFY_IMAGE_ON_MEDIA_ON, ONE_IMAGE_ON_ROWS, run_single(decide_import, True)),
    *expand_global_ignore("6.7-imageOn-mediaOff", VERIFY_IMAGE_ON_MEDIA_OFF, ONE_OFF, run_single(decide_import, True)),
]


@pytest.mark.parametrize("cell", VERIFY_CASES)
def test_6_5_verify(cell: Cell) -> None:
    check(cell)


@pytest.mark.parametrize("cell", IMPORT_CASES)
def test_6_7_import_follows_verify_inferred(cell: Cell) -> None:  # [I]
    check(cell)


# ======================================================================================
# §6.6 Synthetic backup (component images -> synthesized image, no client) [S] D-SYNTH
# ======================================================================================

# "DTE mode is OFF in the image" (every component image Off).
#                 all media 9.1+ DTE On | all 9.1+ DTE Off | any media earlier than 9.1
SYNTH_IMAGE_OFF = {
    "PreferredOff": ("N", "N", "N"),
    "PreferredOn":  ("E", "N", "N"),
    "Enforced":     ("E", "F", "F"),
}  # fmt: skip

# "DTE mode is On for any one of the images and media server DTE setting is On".
#                                      NEVER | WHERE_UNSUPPORTED | ALWAYS
SYNTH_IMAGE_ON_MEDIA_ON = {
    ("PreferredOff", "all9.1+"):       ("E", "E", "N"),
    ("PreferredOff", "anyBefore9.1"):  ("F", "N", "N"),
    ("PreferredOn", "all9.1+"):        ("E", "E", "E"),
    ("PreferredOn", "anyBefore9.1"):   ("F", "N", "N"),
    ("Enforced", "all9.1+"):           ("E", "E", "E"),  # [I] row truncated in the reference
    ("Enforced", "anyBefore9.1"):      ("F", "F", "F"),  # [I] row truncated in the reference
}  # fmt: skip

SYNTH_ALL_ON = (
    variant(src("10.5", M_ON), dst("9.1")),
    variant(src("9.1"), media("10.0.0.1", M_ON, THIRD), dst("11.0")),
    variant(dst("10.5", M_ON)),
)
SYNTH_ALL_OFF = (
    variant(src("10.5", M_OFF), dst("10.0", M_OFF), blockers=(SOURCE, TARGET)),
    variant(dst("11.0", M_OFF), blockers=(TARGET,)),
)
SYNTH_ANY_OLD = (
    variant(src("9.0"), dst("10.5", M_ON), blockers=(SOURCE,)),
    variant(src("10.5", M_ON), media("9.1", None, THIRD), dst("8.3"), blockers=(TARGET,)),
    variant(dst("9.0"), blockers=(TARGET,)),
)
SYNTH_COLUMNS = (("allOn", SYNTH_ALL_ON), ("allOff", SYNTH_ALL_OFF), ("anyBefore9.1", SYNTH_ANY_OLD))
SYNTH_IMAGE_ON_ROWS = {"all9.1+": SYNTH_ALL_ON, "anyBefore9.1": SYNTH_ANY_OLD}

SYNTH_COMPONENTS_OFF = ((False,), (False, False, False))
SYNTH_COMPONENTS_ANY_ON = ((True,), (False, True), (True, False, False), (True, True))


def run_synth(components: tuple[bool, ...]):
    def make(v: Variant):
        return lambda s: decide_synthetic(s, list(components), list(v.hosts))

    return make


def _components_id(components: tuple[bool, ...]) -> str:
    return "images" + "".join("1" if c else "0" for c in components)


SYNTH_CASES = [
    *(
        case
        for comp in SYNTH_COMPONENTS_OFF
        for case in expand_columns(f"6.6-{_components_id(comp)}", SYNTH_IMAGE_OFF, SYNTH_COLUMNS, run_synth(comp))
    ),
    *(
        case
        for comp in SYNTH_COMPONENTS_ANY_ON
        for case in expand_ignore(
            f"6.6-{_components_id(comp)}", SYNTH_IMAGE_ON_MEDIA_ON, SYNTH_IMAGE_ON_ROWS, run_synth(comp)
        )
    ),
]


@pytest.mark.parametrize("cell", SYNTH_CASES)
def test_6_6_synthetic(cell: Cell) -> None:
    check(cell)


# ======================================================================================
# §6.8 Universal-Share policy backup (client DTE mode not checked) [S] D-USHARE
# ======================================================================================

#                 media 9.1+ DTE On | media 9.1+ DTE Off | media earlier than 9.1
USHARE = {
    "PreferredOff": ("N", "N", "N"),
    "PreferredOn":  ("E", "N", "N"),
    "Enforced":     ("E", "F", "F"),
}  # fmt: skip


def run_ushare(v: Variant):
    (m,) = v.hosts
    return lambda s: decide_universal_share_backup(s, m)


USHARE_CASES = expand_columns("6.8", USHARE, ONE_COLUMNS, run_ushare)


@pytest.mark.parametrize("cell", USHARE_CASES)
def test_6_8_universal_share(cell: Cell) -> None:
    check(cell)


# ======================================================================================
# Failure causes and their status codes (§8.3, [S3] candidates; other codes [I])
# ======================================================================================


def test_every_fail_cause_has_its_own_83xx_status() -> None:
    codes = {cause: for_dte_failure(cause.name) for cause in FailCause}
    assert all(isinstance(s, Status) and 8300 <= int(s) <= 8399 for s in codes.values()), codes
    assert len(set(codes.values())) == len(codes), "two causes share a status code"


def test_unknown_cause_name_is_rejected() -> None:
    with pytest.raises(KeyError):
        for_dte_failure("NOT_A_CAUSE")


ENF = DomainSettings(GlobalMode.ENFORCED)
PON = DomainSettings(GlobalMode.PREFERRED_ON)


@pytest.mark.parametrize(
    "outcome, code, prefix",
    [
        pytest.param(
            decide_backup(ENF, client("10.5"), media("9.0")), 8301,
            "The global data-in-transit encryption is enforced in the NetBackup domain, but it cannot be enabled as the media server",
            id="8301-enforced-media-before9.1",
        ),
        pytest.param(
            decide_backup(PON, client("10.5", ON), media("10.5", M_OFF)), 8310,
            "DTE_CLIENT_MODE = ON", id="8310-client-on-media-off",
        ),
        pytest.param(
            decide_backup(ENF, client("10.5", AUTO), media("10.5", M_OFF)), 8311,
            "The global data-in-transit encryption (DTE) is enforced in the NetBackup domain, but the DTE setting is disabled on the media server",
            id="8311-enforced-media-off",
        ),
        pytest.param(
            decide_verify(ENF, False, media("10.5", M_OFF)), 8311, "The global data-in-transit encryption (DTE)",
            id="8311-enforced-media-off-verify",
        ),
        pytest.param(  # restore image On is [I]; the code is the §8.3 candidate
            decide_restore(PON, True, client("8.3"), [media("10.5")]), 8308, "The image DTE mode is On",
            id="8308-image-on-client-before9.1",
        ),
    ],
)  # fmt: skip
def test_section_8_3_candidate_codes(outcome: Outcome, code: int, prefix: str) -> None:
    """The causes §8.3 lists map to the codes it lists ([S3]); §8.2 message wording ([S3])."""
    assert outcome.fails, outcome
    assert int(for_dte_failure(outcome.cause.name)) == code, outcome
    assert outcome.reason.startswith(prefix), outcome.reason


def test_8314_is_a_client_on_media_off_code() -> None:
    """§8.3: 8314 = "DTE_CLIENT_MODE=On but media server Off" ([S3])."""
    assert "CLIENT_ON_MEDIA_OFF" in Status(8314).name


# ======================================================================================
# Defaults: client DTE mode (§2, §4), media server DTE mode (§5), domain settings
# ======================================================================================


@pytest.mark.parametrize(
    "version, expected",
    [
        ("9.1", ClientMode.OFF),
        ("9.1.0.1", ClientMode.OFF),
        ("10.0", ClientMode.AUTOMATIC),
        ("10.0.0.1", ClientMode.AUTOMATIC),
        ("10.5", ClientMode.AUTOMATIC),
        ("11.0", ClientMode.AUTOMATIC),
    ],
    ids=lambda x: str(x.name if isinstance(x, ClientMode) else x),
)
def test_client_dte_mode_default(version: str, expected: ClientMode) -> None:
    """9.1 clients default to Off, 10.0+ clients to Automatic [S] D-GLOBAL."""
    assert client(version).client_mode is expected


@pytest.mark.parametrize("mode", list(ClientMode), ids=lambda m: m.name)
@pytest.mark.parametrize("version", ["9.1", "10.5"])
def test_explicit_client_mode_wins_over_default(version: str, mode: ClientMode) -> None:
    assert client(version, mode).client_mode is mode


@pytest.mark.parametrize(
    "global_mode, version, expected",
    [
        ("PreferredOff", "9.1", "N"),
        ("PreferredOn", "9.1", "N"),  # default Off
        ("Enforced", "9.1", "F"),  # default Off fails under Enforced
        ("PreferredOff", "10.0", "N"),
        ("PreferredOn", "10.0", "E"),  # default Automatic
        ("Enforced", "10.0", "E"),
    ],
)
def test_client_default_drives_backup(global_mode: str, version: str, expected: str) -> None:
    outcome = decide_backup(DomainSettings(GLOBAL[global_mode]), client(version), media("10.5"))
    assert outcome.decision is CELL[expected], outcome.reason


@pytest.mark.parametrize("version", ["10.0", "10.5", "11.0"])
def test_media_server_dte_mode_defaults_on(version: str) -> None:
    """Media server DTE mode On (default) [S] D-BACKUP."""
    m = media(version)
    assert not m.media_off
    assert decide_verify(DomainSettings(GlobalMode.ENFORCED), False, m).decision is Decision.ENCRYPT


def test_domain_defaults() -> None:
    """Fresh install: Preferred On [S] D-GLOBAL; DTE_IGNORE_IMAGE_MODE default NEVER [S]."""
    settings = DomainSettings()
    assert settings.global_mode is GlobalMode.PREFERRED_ON
    assert settings.ignore_image_mode is IgnoreImageMode.NEVER


# ======================================================================================
# Image and copy DTE attributes (§7.1) and TLS (§9.3)
# ======================================================================================


@pytest.mark.parametrize(
    "encrypted, version, expected",
    [
        (True, "10.5", DteMode.ON),
        (True, "9.1", DteMode.ON),
        (False, "10.5", DteMode.OFF),
        (True, "9.0", DteMode.OFF),  # media server earlier than 9.1: always shown Off [S]
        (True, "8.3", DteMode.OFF),
        (False, "9.0", DteMode.OFF),
    ],
)
def test_image_dte_mode(encrypted: bool, version: str, expected: DteMode) -> None:
    assert image_dte_mode(encrypted, media(version)) is expected


# (encrypted, media server versions involved, parent hierarchical) -> (copy, hierarchical)
COPY_ATTRIBUTES = [
    ("first-copy-encrypted", True, ("10.5",), None, ("On", "On")),
    ("first-copy-plain", False, ("10.5",), None, ("Off", "Off")),
    ("first-copy-media9.1", True, ("9.1",), None, ("Off", "Off")),  # < 10.0: always Off [S]
    ("first-copy-media10.0", True, ("10.0",), None, ("On", "On")),
    ("dup-secure-parent-secure", True, ("10.5", "10.0"), True, ("On", "On")),
    ("dup-secure-parent-insecure", True, ("10.5", "10.0"), False, ("On", "Off")),  # [S] D-IMGVIEW
    ("dup-plain-parent-secure", False, ("10.5", "10.5"), True, ("Off", "Off")),
    ("dup-plain-parent-insecure", False, ("10.5", "10.5"), False, ("Off", "Off")),
    ("dup-reader9.1-writer10.5", True, ("9.1", "10.5"), True, ("Off", "Off")),  # [I] reader counts
    ("dup-reader10.5-writer9.0", True, ("10.5", "9.0"), True, ("Off", "Off")),
]


@pytest.mark.parametrize(
    "encrypted, versions, parent, expected", [pytest.param(*c[1:], id=c[0]) for c in COPY_ATTRIBUTES]
)
def test_copy_attributes(encrypted: bool, versions: tuple[str, ...], parent: bool | None, expected) -> None:
    servers = [media(v, name=f"media-{i}") for i, v in enumerate(versions)]
    copy, hierarchical = copy_attributes(encrypted, servers, parent)
    assert (copy, hierarchical) == (DteMode(expected[0].lower()), DteMode(expected[1].lower()))


def test_copy_hierarchical_chain() -> None:
    """Copying from a compromised copy is not secure even if the copy is made securely [S]."""
    chain = [True, True, False, True, True]  # was each generation's transfer encrypted?
    parent = None
    seen = []
    for encrypted in chain:
        own, parent_mode = copy_attributes(encrypted, [media("10.5")], parent)
        parent = parent_mode.is_on
        seen.append((own.is_on, parent))
    assert seen == [(True, True), (True, True), (False, False), (True, False), (True, False)]


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("10.5", "10.5", "TLSv1.3"),
        ("11.0", "10.5", "TLSv1.3"),
        ("10.4", "11.0", "TLSv1.2"),  # [I] a 10.4 peer forces TLS 1.2
        ("11.0", "10.4", "TLSv1.2"),
        ("10.0", "9.1", "TLSv1.2"),
        ("10.0.0.1", "10.5", "TLSv1.2"),
    ],
    ids=lambda x: str(x),
)
def test_negotiated_tls_version(a: str, b: str, expected: str) -> None:
    """TLS 1.3 is the DTE default from 10.5 [S] KB-TLS13; negotiation [I]."""
    assert negotiated_tls_version(media(a), client(b)) == expected


# ======================================================================================
# Version.parse
# ======================================================================================

ASCENDING = ["8.3", "9.0", "9.1", "9.1.0.1", "10.0", "10.0.0.1", "10.4", "10.5", "11.0"]


def test_version_order() -> None:
    parsed = [Version.parse(v) for v in ASCENDING]
    assert parsed == sorted(parsed)
    assert all(a < b for a, b in zip(parsed, parsed[1:]))
    assert Version.parse("10.0.0.1").at_least(Version.parse("10.0"))
    assert not Version.parse("9.0").at_least(Version.parse("9.1"))
    assert Version.parse("10.10") > Version.parse("10.9")  # numeric, not lexical


@pytest.mark.parametrize("a, b", [("10", "10.0"), ("10.0", "10.0.0.0"), ("9.1", "9.1.0"), (" 10.5 ", "10.5")])
def test_version_equal_spellings(a: str, b: str) -> None:
    assert Version.parse(a) == Version.parse(b)


@pytest.mark.parametrize("text, shown", [("10", "10.0"), ("9.1", "9.1"), ("10.0.0.1", "10.0.0.1"), ("11.0", "11.0")])
def test_version_str(text: str, shown: str) -> None:
    assert str(Version.parse(text)) == shown
    assert Version.parse(str(Version.parse(text))) == Version.parse(text)


@pytest.mark.parametrize(
    "text",
    ["", " ", "abc", "10.", ".5", "10..5", "10.5a", "v10.5", "-1", "10.-1", "1.2.3.4.5", "10,5", "10 5", "10.x"],
    ids=repr,
)
def test_version_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError):
        Version.parse(text)
