"""The catalog: the primary server's SQLite record of images, copies, files, jobs and settings.

One SQLite file in WAL mode; every change is one IMMEDIATE transaction with its audit row,
so a process killed mid-write leaves the file as it was before or after that change.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import structlog

from fabric.dte import ClientMode, DomainSettings, DteMode, GlobalMode, IgnoreImageMode, MediaMode, Version

log = structlog.get_logger("fabric.catalog")

# Bump when the schema changes; kept in `PRAGMA user_version` so an old binary refuses a
# newer file instead of misreading it.
SCHEMA_VERSION = 1

# The same name as fabric.model.DEFAULT_DOMAIN (the catalog may import only fabric.dte).
DEFAULT_DOMAIN = "default"

SCHEDULE_TYPES = ("full", "incremental")
# "policy" is the parent job of a policy run (its children are the backup and the SLP operations).
JOB_TYPES = ("backup", "restore", "duplicate", "verify", "replicate", "import", "synthetic", "policy")
# Reference §11.5; "suspended" is not simulated.
JOB_STATES = ("queued", "active", "waiting_for_retry", "incomplete", "done")
# A host's DTE setting: DTE_CLIENT_MODE on a client (§4), MEDIA_DTE_MODE on a media server (§5).
HOST_DTE_MODES = tuple(dict.fromkeys([m.value for m in ClientMode] + [m.value for m in MediaMode]))


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class CatalogError(Exception):
    """Anything the catalog refuses to do."""


class UnknownImage(CatalogError):
    def __init__(self, backup_id: str) -> None:
        super().__init__(f"no image {backup_id!r} in the catalog")
        self.backup_id = backup_id


class UnknownJob(CatalogError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job {job_id} in the catalog")
        self.job_id = job_id


class RevisionMismatch(CatalogError):
    """The image changed since the caller read it (HTTP 412 for a PATCH with If-Match)."""

    def __init__(self, backup_id: str, expected: int, actual: int) -> None:
        super().__init__(f"image {backup_id!r} is at revision {actual}, not {expected}: it changed since it was read")
        self.backup_id = backup_id
        self.expected = expected
        self.actual = actual


class DuplicateBackupId(CatalogError):
    def __init__(self, backup_id: str) -> None:
        super().__init__(f"an image with backup id {backup_id!r} is already in the catalog")
        self.backup_id = backup_id


class InvalidRecord(CatalogError):
    """A record the schema rejects (a file path listed twice, an unknown parent copy, ...)."""


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainSettingsRecord:
    """One domain's DTE settings as stored (reference §3 global mode, §7.4 ignore-image mode)."""

    domain: str
    global_mode: GlobalMode
    ignore_image_mode: IgnoreImageMode

    def as_dte(self) -> DomainSettings:
        return DomainSettings(self.global_mode, self.ignore_image_mode)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One change: who made it, when (UTC ISO 8601), to what, and the values either side."""

    audit_id: int
    when: str
    actor: str
    what: str
    before: str | None
    after: str | None


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One backup image, the `IMAGE` line of `bpimagelist -l` (reference §7.3) cut to what we use.

    `backup_id` is `<client>_<10-digit ctime>` (§11.2); pass "" to `commit_backup` to have it
    allocated there. `image_dte_mode` is the §7.1 image attribute (`image_dteMode`).
    `revision` counts changes to the image; the catalog sets it, callers never do.
    """

    backup_id: str
    client: str
    policy_type: str
    schedule_type: str  # "full" | "incremental" (sched_type, §11.2)
    backup_time: int  # epoch seconds
    image_dte_mode: DteMode
    bytes: int
    num_files: int
    job_id: int | None = None
    base_backup_id: str | None = None  # what an incremental or synthetic image builds on
    origin_domain: str | None = None  # set only on an imported image (origin_master_server)
    expiration: int | None = None  # epoch seconds
    revision: int = 1

    @property
    def kbytes(self) -> int:
        """The `kbytes` field of `bpimagelist` (§7.3), rounded up."""
        return -(-self.bytes // 1024)

    @property
    def etag(self) -> str:
        return format_etag(self.revision)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One file of an image, with the checksum a restore or verify compares against."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """One copy of an image: the `FRAG` lines of `bpimagelist -l` (§7.3) folded into one record.

    `copy_dte_mode` and `hierarchical_dte_mode` are the §7.1 copy attributes, stored as the
    caller computed them (fabric.dte.copy_attributes). `parent_copy` is the copy this one
    was duplicated from (None for copy 1).
    """

    backup_id: str
    copy_number: int
    media_server: str
    path: str  # storage location on the media server
    copy_dte_mode: DteMode
    hierarchical_dte_mode: DteMode
    parent_copy: int | None = None
    created: int = 0  # epoch seconds
    primary: bool = False  # copy 1 is the primary copy (§11.2)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as the Activity Monitor / `bpdbjobs` shows it (reference §8.4, §11.5).

    `dte_mode` is None for a parent job and set on child jobs (§8.1, D-CATALOG).
    """

    job_id: int
    job_type: str  # one of JOB_TYPES
    state: str = "queued"  # one of JOB_STATES
    status: int | None = None
    client: str | None = None
    media_server: str | None = None
    target: str | None = None  # destination media server or domain, for copies and replicas
    backup_id: str | None = None
    copy_number: int | None = None
    dte_mode: DteMode | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    bytes: int = 0
    files: int = 0
    attempt: int = 1
    parent_job_id: int | None = None
    started: float = 0.0  # epoch seconds
    ended: float | None = None
    reason: str = ""
    step: int | None = None  # the scenario step that started it


_JOB_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRecord))
_JOB_FIELDS = frozenset(_JOB_COLUMNS) - {"job_id"}
_IMAGE_COLUMNS = tuple(f.name for f in dataclasses.fields(ImageRecord))
_COPY_COLUMNS = tuple(f.name for f in dataclasses.fields(CopyRecord))


# --------------------------------------------------------------------------------------
# Backup ids and ETags
# --------------------------------------------------------------------------------------

_BACKUP_ID_RE = re.compile(r"^(?P<client>.+)_(?P<ctime>\d{10})$")


def format_backup_id(client: str, ctime: int) -> str:
    """NetBackup's backup id, `<client>_<10-digit ctime>` (reference §11.2, KB-BPFLIST)."""
    if not client or any(c.isspace() for c in client):
        raise ValueError(f"not a client name: {client!r}")
    if not 0 <= ctime < 10**10:
        raise ValueError(f"ctime {ctime} does not fit the 10 digits of a backup id")
    return f"{client}_{ctime:010d}"


def parse_backup_id(backup_id: str) -> tuple[str, int]:
    """(client, ctime) of a backup id; raises ValueError for anything else."""
    match = _BACKUP_ID_RE.match(backup_id)
    if not match:
        raise ValueError(f"not a backup id: {backup_id!r} (expected <client>_<10-digit ctime>)")
    return match["client"], int(match["ctime"])


def format_etag(revision: int) -> str:
    """A strong HTTP entity tag for an image revision (RFC 9110 wants the quotes)."""
    return f'"{revision}"'


def parse_etag(etag: str) -> int | None:
    """The revision an `If-Match` value names, or None if it is not one of our tags."""
    text = etag.strip()
    if text.startswith("W/"):
        return None  # If-Match uses strong comparison
    text = text.strip('"')
    return int(text) if text.isdigit() else None


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


def _one_of(column: str, values: Iterable[str]) -> str:
    listed = ", ".join(f"'{v}'" for v in values)
    return f"CHECK ({column} IN ({listed}))"


_DTE = [m.value for m in DteMode]

_SCHEMA = [
    f"""
    CREATE TABLE domain_settings (
        domain            TEXT PRIMARY KEY,
        global_mode       TEXT NOT NULL {_one_of("global_mode", [m.value for m in GlobalMode])},
        ignore_image_mode TEXT NOT NULL {_one_of("ignore_image_mode", [m.value for m in IgnoreImageMode])}
    )""",
    f"""
    CREATE TABLE hosts (
        name     TEXT PRIMARY KEY,
        dte_mode TEXT {_one_of("dte_mode", HOST_DTE_MODES)},
        version  TEXT
    )""",
    """
    CREATE TABLE audit (
        audit_id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_utc   TEXT NOT NULL,
        actor    TEXT NOT NULL,
        what     TEXT NOT NULL,
        before   TEXT,
        after    TEXT
    )""",
    # Backup ids handed out but not yet committed: makes allocation race-free across
    # connections (two jobs of one client in the same second get different ids).
    """
    CREATE TABLE backup_id_reservations (
        backup_id   TEXT PRIMARY KEY,
        reserved_at REAL NOT NULL
    )""",
    f"""
    CREATE TABLE images (
        backup_id      TEXT PRIMARY KEY,
        client         TEXT NOT NULL,
        policy_type    TEXT NOT NULL,
        schedule_type  TEXT NOT NULL {_one_of("schedule_type", SCHEDULE_TYPES)},
        backup_time    INTEGER NOT NULL,
        image_dte_mode TEXT NOT NULL {_one_of("image_dte_mode", _DTE)},
        bytes          INTEGER NOT NULL CHECK (bytes >= 0),
        num_files      INTEGER NOT NULL CHECK (num_files >= 0),
        job_id         INTEGER,
        base_backup_id TEXT,
        origin_domain  TEXT,
        expiration     INTEGER,
        revision       INTEGER NOT NULL DEFAULT 1
    )""",
    # The Catalog view lists newest first by DTE mode and/or client over millions of
    # images: each filter gets an index ending in the keyset (backup_time, backup_id).
    "CREATE INDEX images_by_time ON images (backup_time, backup_id)",
    "CREATE INDEX images_by_dte_mode ON images (image_dte_mode, backup_time, backup_id)",
    "CREATE INDEX images_by_client ON images (client, backup_time, backup_id)",
    "CREATE INDEX images_by_client_dte_mode ON images (client, image_dte_mode, backup_time, backup_id)",
    """
    CREATE TABLE files (
        backup_id TEXT NOT NULL REFERENCES images (backup_id) ON DELETE CASCADE,
        path      TEXT NOT NULL,
        size      INTEGER NOT NULL CHECK (size >= 0),
        sha256    TEXT NOT NULL,
        PRIMARY KEY (backup_id, path)
    ) WITHOUT ROWID""",
    f"""
    CREATE TABLE copies (
        backup_id             TEXT NOT NULL REFERENCES images (backup_id) ON DELETE CASCADE,
        copy_number           INTEGER NOT NULL CHECK (copy_number >= 1),
        media_server          TEXT NOT NULL,
        path                  TEXT NOT NULL,
        copy_dte_mode         TEXT NOT NULL {_one_of("copy_dte_mode", _DTE)},
        hierarchical_dte_mode TEXT NOT NULL {_one_of("hierarchical_dte_mode", _DTE)},
        parent_copy           INTEGER,
        created               INTEGER NOT NULL,
        is_primary            INTEGER NOT NULL CHECK (is_primary IN (0, 1)),
        PRIMARY KEY (backup_id, copy_number),
        FOREIGN KEY (backup_id, parent_copy) REFERENCES copies (backup_id, copy_number)
    ) WITHOUT ROWID""",
    f"""
    CREATE TABLE jobs (
        job_id        INTEGER PRIMARY KEY AUTOINCREMENT,
        job_type      TEXT NOT NULL {_one_of("job_type", JOB_TYPES)},
        state         TEXT NOT NULL {_one_of("state", JOB_STATES)},
        status        INTEGER,
        client        TEXT,
        media_server  TEXT,
        target        TEXT,
        backup_id     TEXT,
        copy_number   INTEGER,
        dte_mode      TEXT {_one_of("dte_mode", _DTE)},
        tls_version   TEXT,
        tls_cipher    TEXT,
        bytes         INTEGER NOT NULL DEFAULT 0,
        files         INTEGER NOT NULL DEFAULT 0,
        attempt       INTEGER NOT NULL DEFAULT 1,
        parent_job_id INTEGER REFERENCES jobs (job_id),
        started       REAL NOT NULL,
        ended         REAL,
        reason        TEXT NOT NULL DEFAULT '',
        step          INTEGER
    )""",
]


# --------------------------------------------------------------------------------------
# Row <-> record
# --------------------------------------------------------------------------------------


def _image_from_row(row: tuple[Any, ...]) -> ImageRecord:
    values = dict(zip(_IMAGE_COLUMNS, row))
    values["image_dte_mode"] = DteMode(values["image_dte_mode"])
    return ImageRecord(**values)


def _image_params(image: ImageRecord, backup_id: str) -> tuple[Any, ...]:
    return (
        backup_id,
        image.client,
        image.policy_type,
        image.schedule_type,
        int(image.backup_time),
        image.image_dte_mode.value,
        image.bytes,
        image.num_files,
        image.job_id,
        image.base_backup_id,
        image.origin_domain,
        image.expiration,
        1,
    )


def _copy_from_row(row: tuple[Any, ...]) -> CopyRecord:
    values = dict(zip(_COPY_COLUMNS, row))
    values["copy_dte_mode"] = DteMode(values["copy_dte_mode"])
    values["hierarchical_dte_mode"] = DteMode(values["hierarchical_dte_mode"])
    values["primary"] = bool(values["primary"])
    return CopyRecord(**values)


def _job_from_row(row: tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS, row))
    if values["dte_mode"] is not None:
        values["dte_mode"] = DteMode(values["dte_mode"])
    return JobRecord(**values)


def _job_value(name: str, value: Any) -> Any:
    if name == "dte_mode" and value is not None:
        return DteMode(value).value
    if name == "job_type" and value not in JOB_TYPES:
        raise ValueError(f"unknown job type {value!r} (one of {', '.join(JOB_TYPES)})")
    if name == "state" and value not in JOB_STATES:
        raise ValueError(f"unknown job state {value!r} (one of {', '.join(JOB_STATES)})")
    return value


_IMAGE_SELECT = f"SELECT {', '.join(_IMAGE_COLUMNS)} FROM images"
_COPY_SELECT = (
    "SELECT backup_id, copy_number, media_server, path, copy_dte_mode, hierarchical_dte_mode, "
    "parent_copy, created, is_primary FROM copies"
)
_JOB_SELECT = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"


def _utc_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------
# The catalog
# --------------------------------------------------------------------------------------


class Catalog:
    """One connection to the catalog file. Every method is one short statement or one
    transaction, so asyncio callers may call it directly. Nothing is cached in memory:
    the file is the only state."""

    def __init__(self, path: Path, conn: sqlite3.Connection, clock: Callable[[], float]) -> None:
        self.path = path
        self._conn = conn
        self._clock = clock
        # One connection may be shared by threads (check_same_thread=False); a transaction
        # must not interleave with another thread's statements on it.
        self._lock = threading.RLock()

    # ---- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, *, clock: Callable[[], float] = time.time, busy_timeout_ms: int = 10_000) -> "Catalog":
        """Open (creating if needed) the catalog file at `path`."""
        path = Path(path)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction
        # takes the lock before it reads what it will change.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise CatalogError(f"{path}: cannot switch the catalog to WAL mode (got {mode!r})")
            # NORMAL is durable across a process crash in WAL mode; only power loss may
            # lose the last commits, never corrupt the file.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            catalog = cls(path, conn, clock)
            catalog._create_schema()
        except BaseException:
            conn.close()
            raise
        log.debug("catalog.opened", path=str(path))
        return catalog

    def _create_schema(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version != 0:
                raise CatalogError(f"{self.path}: catalog schema version {version}, this fabric reads version {SCHEMA_VERSION}")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def _audit(self, conn: sqlite3.Connection, actor: str, what: str, before: str | None, after: str | None) -> None:
        conn.execute(
            "INSERT INTO audit (at_utc, actor, what, before, after) VALUES (?, ?, ?, ?, ?)",
            (_utc_iso(self._clock()), actor, what, before, after),
        )

    # ---- settings ----------------------------------------------------------------------

    def get_settings(self, domain: str = DEFAULT_DOMAIN) -> DomainSettingsRecord:
        """A domain's settings; the defaults (Preferred On, NEVER) until one is set."""
        rows = self._read("SELECT global_mode, ignore_image_mode FROM domain_settings WHERE domain = ?", (domain,))
        if not rows:
            defaults = DomainSettings()
            return DomainSettingsRecord(domain, defaults.global_mode, defaults.ignore_image_mode)
        return DomainSettingsRecord(domain, GlobalMode(rows[0][0]), IgnoreImageMode(rows[0][1]))

    def set_global_mode(self, mode: GlobalMode, actor: str, domain: str = DEFAULT_DOMAIN) -> tuple[GlobalMode, GlobalMode]:
        """`nbseccmd -setsecurityconfig -dteglobalmode` (reference §3.2): (before, after)."""
        mode = GlobalMode(mode)
        return self._set_setting(domain, "global_mode", mode, actor, "global_dte_mode", GlobalMode)

    def set_ignore_image_mode(self, mode: IgnoreImageMode, actor: str, domain: str = DEFAULT_DOMAIN) -> tuple[IgnoreImageMode, IgnoreImageMode]:
        """`DTE_IGNORE_IMAGE_MODE` on the domain's servers (reference §7.4): (before, after)."""
        mode = IgnoreImageMode(mode)
        return self._set_setting(domain, "ignore_image_mode", mode, actor, "dte_ignore_image_mode", IgnoreImageMode)

    def _set_setting(self, domain: str, column: str, mode: Any, actor: str, label: str, kind: type) -> Any:
        defaults = DomainSettings()
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {column} FROM domain_settings WHERE domain = ?", (domain,)).fetchone()
            before = kind(row[0]) if row else getattr(defaults, column)
            conn.execute(
                f"INSERT INTO domain_settings (domain, global_mode, ignore_image_mode) VALUES (?, ?, ?) "
                f"ON CONFLICT (domain) DO UPDATE SET {column} = excluded.{column}",
                (
                    domain,
                    (mode if column == "global_mode" else defaults.global_mode).value,
                    (mode if column == "ignore_image_mode" else defaults.ignore_image_mode).value,
                ),
            )
            if before is not mode:
                self._audit(conn, actor, f"domain {domain} {label}", before.value, mode.value)
        if before is not mode:
            log.info("catalog.setting_changed", domain=domain, setting=label, before=before.value, after=mode.value, actor=actor)
        return before, mode

    def set_host_dte_mode(self, host: str, mode_str: str | None, actor: str) -> tuple[str | None, str | None]:
        """A host's DTE_CLIENT_MODE (§4) or media server DTE mode (§5); None goes back to the
        version's default. Returns (before, after)."""
        if mode_str is not None:
            mode_str = str(mode_str).strip().lower()
            if mode_str not in HOST_DTE_MODES:
                raise ValueError(f"host DTE mode {mode_str!r} is not one of {', '.join(HOST_DTE_MODES)}")
        return self._set_host_field(host, "dte_mode", mode_str, actor)

    def set_host_version(self, host: str, version_str: str, actor: str) -> tuple[str | None, str | None]:
        """A host's NetBackup version (what it can do, §2 thresholds). Returns (before, after)."""
        return self._set_host_field(host, "version", str(Version.parse(version_str)), actor)

    def _set_host_field(self, host: str, column: str, value: str | None, actor: str) -> tuple[str | None, str | None]:
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {column} FROM hosts WHERE name = ?", (host,)).fetchone()
            before = row[0] if row else None
            conn.execute(
                f"INSERT INTO hosts (name, {column}) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET {column} = excluded.{column}",
                (host, value),
            )
            if before != value:
                self._audit(conn, actor, f"host {host} {column}", before, value)
        if before != value:
            log.info("catalog.host_changed", host=host, field=column, before=before, after=value, actor=actor)
        return before, value

    def host_dte_modes(self) -> dict[str, str]:
        """Hosts whose DTE mode was set, by name."""
        return dict(self._read("SELECT name, dte_mode FROM hosts WHERE dte_mode IS NOT NULL ORDER BY name"))

    def host_versions(self) -> dict[str, str]:
        return dict(self._read("SELECT name, version FROM hosts WHERE version IS NOT NULL ORDER BY name"))

    def list_audit(self, limit: int = 100, after_id: int | None = None) -> list[AuditRecord]:
        """Audit rows oldest first, after `after_id` (pass the last one seen to tail)."""
        rows = self._read(
            "SELECT audit_id, at_utc, actor, what, before, after FROM audit WHERE audit_id > ? ORDER BY audit_id LIMIT ?",
            (after_id or 0, limit),
        )
        return [AuditRecord(*row) for row in rows]

    # ---- backup ids --------------------------------------------------------------------

    def allocate_backup_id(self, client: str, ctime: int) -> str:
        """Reserve `<client>_<ctime>`, or the next free second after it (reference §11.2).

        The reservation is a row, taken under the write lock, so two jobs of one client in
        the same second get different ids even from different processes. `commit_backup`
        consumes it; `release_backup_id` drops one whose backup failed.
        """
        with self._transaction() as conn:
            backup_id = self._free_backup_id(conn, client, int(ctime))
            conn.execute("INSERT INTO backup_id_reservations (backup_id, reserved_at) VALUES (?, ?)", (backup_id, self._clock()))
        return backup_id

    def release_backup_id(self, backup_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM backup_id_reservations WHERE backup_id = ?", (backup_id,))

    @staticmethod
    def _free_backup_id(conn: sqlite3.Connection, client: str, ctime: int) -> str:
        while True:
            backup_id = format_backup_id(client, ctime)
            taken = conn.execute(
                "SELECT 1 FROM images WHERE backup_id = ?1 UNION ALL SELECT 1 FROM backup_id_reservations WHERE backup_id = ?1",
                (backup_id,),
            ).fetchone()
            if not taken:
                return backup_id
            ctime += 1

    # ---- images: writes ----------------------------------------------------------------

    def commit_backup(self, image: ImageRecord, files: Iterable[FileRecord], first_copy: CopyRecord) -> ImageRecord:
        """Record a finished backup: the image, its files and copy 1, all or nothing.

        With `image.backup_id == ""` the id is allocated here from (client, backup_time).
        `first_copy` is stored as copy 1, the primary copy, of this image whatever
        backup_id, copy_number, parent_copy and primary it carries.
        """
        if image.backup_id:
            client, _ = parse_backup_id(image.backup_id)
            if client != image.client:
                raise ValueError(f"backup id {image.backup_id!r} does not belong to client {image.client!r}")
        return self._insert_image(image, files, first_copy, "commit_backup")

    def import_image(self, image: ImageRecord, files: Iterable[FileRecord], copy: CopyRecord) -> ImageRecord:
        """Record an image arriving from another domain (AIR import, reference §11.4); it
        keeps its backup id and `copy` becomes its copy 1 here."""
        if not image.origin_domain:
            raise ValueError(f"imported image {image.backup_id!r} must name its origin_domain")
        if not image.backup_id:
            raise ValueError("an imported image keeps the backup id of its origin domain")
        return self._insert_image(image, files, copy, "import_image")

    def _insert_image(self, image: ImageRecord, files: Iterable[FileRecord], copy: CopyRecord, action: str) -> ImageRecord:
        file_list = list(files)
        # 0 is CopyRecord's "not given": the copy was written now.
        created = copy.created or int(self._clock())
        try:
            with self._transaction() as conn:
                backup_id = image.backup_id or self._free_backup_id(conn, image.client, int(image.backup_time))
                if conn.execute("SELECT 1 FROM images WHERE backup_id = ?", (backup_id,)).fetchone():
                    raise DuplicateBackupId(backup_id)
                conn.execute(
                    f"INSERT INTO images ({', '.join(_IMAGE_COLUMNS)}) VALUES ({', '.join('?' * len(_IMAGE_COLUMNS))})",
                    _image_params(image, backup_id),
                )
                conn.executemany(
                    "INSERT INTO files (backup_id, path, size, sha256) VALUES (?, ?, ?, ?)",
                    [(backup_id, f.path, f.size, f.sha256) for f in file_list],
                )
                conn.execute(
                    "INSERT INTO copies (backup_id, copy_number, media_server, path, copy_dte_mode, "
                    "hierarchical_dte_mode, parent_copy, created, is_primary) VALUES (?, 1, ?, ?, ?, ?, NULL, ?, 1)",
                    (backup_id, copy.media_server, copy.path, copy.copy_dte_mode.value, copy.hierarchical_dte_mode.value, created),
                )
                conn.execute("DELETE FROM backup_id_reservations WHERE backup_id = ?", (backup_id,))
        except sqlite3.IntegrityError as exc:
            raise InvalidRecord(f"{action} {image.backup_id or image.client!r}: {exc}") from exc
        log.info(
            "catalog.image_committed",
            action=action,
            backup_id=backup_id,
            image_dte_mode=image.image_dte_mode.value,
            files=len(file_list),
            origin_domain=image.origin_domain,
        )
        return dataclasses.replace(image, backup_id=backup_id, revision=1)

    def add_copy(
        self,
        backup_id: str,
        media_server: str,
        path: str,
        copy_dte_mode: DteMode,
        hierarchical_dte_mode: DteMode,
        parent_copy: int | None,
        created: int | None = None,
    ) -> CopyRecord:
        """Record a finished duplication as the image's next copy (numbers follow on, no
        gaps); the image's revision moves on since its copy list changed."""
        created = int(self._clock()) if created is None else created
        try:
            with self._transaction() as conn:
                if not conn.execute("SELECT 1 FROM images WHERE backup_id = ?", (backup_id,)).fetchone():
                    raise UnknownImage(backup_id)
                copy_number = conn.execute(
                    "SELECT COALESCE(MAX(copy_number), 0) + 1 FROM copies WHERE backup_id = ?", (backup_id,)
                ).fetchone()[0]
                conn.execute(
                    "INSERT INTO copies (backup_id, copy_number, media_server, path, copy_dte_mode, "
                    "hierarchical_dte_mode, parent_copy, created, is_primary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                    (backup_id, copy_number, media_server, path, DteMode(copy_dte_mode).value, DteMode(hierarchical_dte_mode).value, parent_copy, created),
                )
                conn.execute("UPDATE images SET revision = revision + 1 WHERE backup_id = ?", (backup_id,))
        except sqlite3.IntegrityError as exc:
            raise InvalidRecord(f"copy of {backup_id!r} from copy {parent_copy}: {exc}") from exc
        log.info("catalog.copy_added", backup_id=backup_id, copy=copy_number, media_server=media_server, copy_dte_mode=DteMode(copy_dte_mode).value)
        return CopyRecord(backup_id, copy_number, media_server, path, DteMode(copy_dte_mode), DteMode(hierarchical_dte_mode), parent_copy, created, False)

    def set_image_dte_mode(
        self,
        backup_id: str,
        mode: DteMode,
        actor: str,
        if_revision: int | None = None,
    ) -> tuple[DteMode, DteMode]:
        """`bpimage -update -image_dtemode` / `PATCH /catalog/images/{id}` (reference §7.2).

        Returns (before, after). With `if_revision`, refuses (RevisionMismatch) unless the
        image is still at that revision. Setting the mode it already has changes nothing.
        """
        mode = DteMode(mode)
        with self._transaction() as conn:
            row = conn.execute("SELECT image_dte_mode, revision FROM images WHERE backup_id = ?", (backup_id,)).fetchone()
            if row is None:
                raise UnknownImage(backup_id)
            before, revision = DteMode(row[0]), row[1]
            if if_revision is not None and if_revision != revision:
                raise RevisionMismatch(backup_id, if_revision, revision)
            if before is not mode:
                conn.execute(
                    "UPDATE images SET image_dte_mode = ?, revision = revision + 1 WHERE backup_id = ?", (mode.value, backup_id)
                )
                self._audit(conn, actor, f"image {backup_id} image_dte_mode", before.value, mode.value)
        if before is not mode:
            log.info("catalog.image_dte_mode_set", backup_id=backup_id, before=before.value, after=mode.value, actor=actor)
        return before, mode

    # ---- images: reads -----------------------------------------------------------------

    def get_image(self, backup_id: str) -> ImageRecord | None:
        rows = self._read(f"{_IMAGE_SELECT} WHERE backup_id = ?", (backup_id,))
        return _image_from_row(rows[0]) if rows else None

    def image_etag(self, backup_id: str) -> str:
        """The image's current entity tag for `If-Match`; raises UnknownImage."""
        rows = self._read("SELECT revision FROM images WHERE backup_id = ?", (backup_id,))
        if not rows:
            raise UnknownImage(backup_id)
        return format_etag(rows[0][0])

    def list_images(
        self,
        client: str | None = None,
        dte_mode: DteMode | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> list[ImageRecord]:
        """Images newest first (backup_time, then backup_id, descending).

        `after` is the backup id of the last image of the previous page: keyset
        pagination, so page 20,000 costs what page 1 does and an image committed
        meanwhile never shifts a page.
        """
        where, params = self._image_filter(client, dte_mode)
        if after is not None:
            cursor = self._read("SELECT backup_time, backup_id FROM images WHERE backup_id = ?", (after,))
            if not cursor:
                raise UnknownImage(after)
            where.append("(backup_time, backup_id) < (?, ?)")
            params.extend(cursor[0])
        sql = f"{_IMAGE_SELECT}{self._where(where)} ORDER BY backup_time DESC, backup_id DESC LIMIT ?"
        return [_image_from_row(row) for row in self._read(sql, [*params, int(limit)])]

    def count_images(self, client: str | None = None, dte_mode: DteMode | None = None) -> int:
        where, params = self._image_filter(client, dte_mode)
        return self._read(f"SELECT COUNT(*) FROM images{self._where(where)}", params)[0][0]

    @staticmethod
    def _image_filter(client: str | None, dte_mode: DteMode | None) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if client is not None:
            where.append("client = ?")
            params.append(client)
        if dte_mode is not None:
            where.append("image_dte_mode = ?")
            params.append(DteMode(dte_mode).value)
        return where, params

    @staticmethod
    def _where(conditions: list[str]) -> str:
        return f" WHERE {' AND '.join(conditions)}" if conditions else ""

    def copies(self, backup_id: str) -> list[CopyRecord]:
        """The image's copies by copy number (empty for an unknown image)."""
        return [_copy_from_row(row) for row in self._read(f"{_COPY_SELECT} WHERE backup_id = ? ORDER BY copy_number", (backup_id,))]

    def files(self, backup_id: str) -> list[FileRecord]:
        """The image's files by path (empty for an unknown image)."""
        rows = self._read("SELECT path, size, sha256 FROM files WHERE backup_id = ? ORDER BY path", (backup_id,))
        return [FileRecord(*row) for row in rows]

    # ---- jobs --------------------------------------------------------------------------

    def create_job(self, job_type: str, **fields: Any) -> JobRecord:
        """A new job (id from the catalog's sequence, never reused); `started` defaults to now."""
        unknown = set(fields) - _JOB_FIELDS
        if unknown:
            raise TypeError(f"create_job: unknown job fields {sorted(unknown)}")
        values = {**fields, "job_type": job_type}
        values.setdefault("state", "queued")
        values.setdefault("started", self._clock())
        columns = list(values)
        try:
            with self._transaction() as conn:
                cursor = conn.execute(
                    f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                    [_job_value(c, values[c]) for c in columns],
                )
                job_id = cursor.lastrowid
                row = conn.execute(f"{_JOB_SELECT} WHERE job_id = ?", (job_id,)).fetchone()
        except sqlite3.IntegrityError as exc:
            raise InvalidRecord(f"create_job {job_type!r}: {exc}") from exc
        return _job_from_row(row)

    def update_job(self, job_id: int, **fields: Any) -> JobRecord:
        unknown = set(fields) - _JOB_FIELDS
        if unknown:
            raise TypeError(f"update_job: unknown job fields {sorted(unknown)}")
        try:
            with self._transaction() as conn:
                if fields:
                    assignments = ", ".join(f"{name} = ?" for name in fields)
                    conn.execute(
                        f"UPDATE jobs SET {assignments} WHERE job_id = ?",
                        [*(_job_value(n, v) for n, v in fields.items()), job_id],
                    )
                row = conn.execute(f"{_JOB_SELECT} WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    raise UnknownJob(job_id)
        except sqlite3.IntegrityError as exc:
            raise InvalidRecord(f"update_job {job_id}: {exc}") from exc
        return _job_from_row(row)

    def get_job(self, job_id: int) -> JobRecord | None:
        rows = self._read(f"{_JOB_SELECT} WHERE job_id = ?", (job_id,))
        return _job_from_row(rows[0]) if rows else None

    def list_jobs(self, limit: int = 50, after: int | None = None) -> list[JobRecord]:
        """Jobs newest first; `after` is the last job id of the previous page."""
        where = " WHERE job_id < ?" if after is not None else ""
        params = [after] if after is not None else []
        rows = self._read(f"{_JOB_SELECT}{where} ORDER BY job_id DESC LIMIT ?", [*params, int(limit)])
        return [_job_from_row(row) for row in rows]
