"""Tests for fabric.catalog against real SQLite files (no mocks).

Covers backup ids, atomic commits, copies, image DTE mode changes with audit and
revisions, keyset pagination against a Python model, reopening, WAL readers and crashes.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.catalog import (
    SCHEMA_VERSION,
    Catalog,
    CatalogError,
    CopyRecord,
    DuplicateBackupId,
    FileRecord,
    ImageRecord,
    InvalidRecord,
    RevisionMismatch,
    UnknownImage,
    UnknownJob,
    format_backup_id,
    parse_backup_id,
    parse_etag,
)
from fabric.dte import DteMode, GlobalMode, IgnoreImageMode

T0 = 1_700_000_000
REPO = Path(__file__).resolve().parents[1]


def make_image(client: str = "web1", backup_time: int = T0, mode: DteMode = DteMode.ON, backup_id: str = "", **kw) -> ImageRecord:
    return ImageRecord(
        backup_id=backup_id,
        client=client,
        policy_type="standard",
        schedule_type=kw.pop("schedule_type", "full"),
        backup_time=backup_time,
        image_dte_mode=mode,
        bytes=kw.pop("bytes", 3000),
        num_files=kw.pop("num_files", 2),
        **kw,
    )


FILES = [FileRecord("/data/a", 1000, "aa" * 32), FileRecord("/data/b", 2000, "bb" * 32)]


def first_copy(media: str = "media1", mode: DteMode = DteMode.ON) -> CopyRecord:
    return CopyRecord("", 1, media, f"/storage/{media}/img", mode, mode, created=T0)


def row_counts(path: Path) -> dict[str, int]:
    """What is really in the file, read by an independent connection."""
    with sqlite3.connect(path) as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("images", "files", "copies")}


@pytest.fixture
def cat(tmp_path: Path):
    catalog = Catalog.open(tmp_path / "catalog.db")
    yield catalog
    catalog.close()


# ---- backup ids ------------------------------------------------------------------------


def test_backup_id_format_is_client_and_ten_digit_ctime():
    assert format_backup_id("client1", 1273057676) == "client1_1273057676"
    assert format_backup_id("c", 42) == "c_0000000042"
    assert parse_backup_id("my_client_1273057676") == ("my_client", 1273057676)
    with pytest.raises(ValueError):
        format_backup_id("c", 10**10)
    with pytest.raises(ValueError):
        format_backup_id("", T0)
    with pytest.raises(ValueError):
        parse_backup_id("web1-full")


def test_allocate_same_client_same_second_many_times(cat: Catalog):
    ids = [cat.allocate_backup_id("web1", T0) for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(re.fullmatch(r"web1_\d{10}", i) for i in ids)
    assert [parse_backup_id(i)[1] for i in ids] == list(range(T0, T0 + 200))
    # Another client's clock is its own.
    assert cat.allocate_backup_id("db1", T0) == f"db1_{T0}"


def test_allocate_skips_committed_images_and_released_ids_come_back(cat: Catalog):
    cat.commit_backup(make_image(backup_id=f"web1_{T0}"), FILES, first_copy())
    reserved = cat.allocate_backup_id("web1", T0)
    assert reserved == f"web1_{T0 + 1}"
    cat.release_backup_id(reserved)
    assert cat.allocate_backup_id("web1", T0) == f"web1_{T0 + 1}"


def test_allocate_is_race_free_across_connections(tmp_path: Path):
    path = tmp_path / "catalog.db"
    Catalog.open(path).close()
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with Catalog.open(path) as mine:
                for _ in range(25):
                    results.append(mine.allocate_backup_id("web1", T0))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 150 and len(set(results)) == 150


def test_commit_backup_allocates_an_id_when_none_given(cat: Catalog):
    a = cat.commit_backup(make_image(), FILES, first_copy())
    b = cat.commit_backup(make_image(), FILES, first_copy())
    assert (a.backup_id, b.backup_id) == (f"web1_{T0}", f"web1_{T0 + 1}")
    assert cat.get_image(b.backup_id) == b


def test_commit_backup_refuses_an_id_of_another_client(cat: Catalog):
    with pytest.raises(ValueError):
        cat.commit_backup(make_image(client="web1", backup_id=f"db1_{T0}"), FILES, first_copy())


# ---- commit atomicity ------------------------------------------------------------------


def test_commit_backup_stores_image_files_and_primary_copy_1(cat: Catalog):
    image = cat.commit_backup(make_image(), FILES, CopyRecord("ignored", 7, "media1", "/s/1", DteMode.ON, DteMode.ON, parent_copy=3))
    assert cat.get_image(image.backup_id) == image
    assert image.revision == 1 and image.kbytes == 3
    assert cat.files(image.backup_id) == FILES
    [copy] = cat.copies(image.backup_id)
    assert (copy.backup_id, copy.copy_number, copy.parent_copy, copy.primary) == (image.backup_id, 1, None, True)


def test_commit_backup_with_a_duplicate_file_path_leaves_nothing(cat: Catalog):
    bad_files = [FILES[0], FileRecord("/data/a", 5, "cc" * 32)]
    with pytest.raises(InvalidRecord):
        cat.commit_backup(make_image(backup_id=f"web1_{T0}"), bad_files, first_copy())
    assert row_counts(cat.path) == {"images": 0, "files": 0, "copies": 0}
    assert cat.get_image(f"web1_{T0}") is None
    # The catalog is still usable and the id still free.
    assert cat.commit_backup(make_image(backup_id=f"web1_{T0}"), FILES, first_copy()).backup_id == f"web1_{T0}"


def test_commit_backup_failing_after_image_and_files_leaves_nothing(cat: Catalog):
    # The copy is written last; a bad copy mode fails after the image and files rows.
    broken_copy = CopyRecord("", 1, "media1", "/s", "bogus", DteMode.ON)  # type: ignore[arg-type]
    with pytest.raises(Exception):
        cat.commit_backup(make_image(), FILES, broken_copy)
    assert row_counts(cat.path) == {"images": 0, "files": 0, "copies": 0}


def test_commit_backup_with_a_taken_id_raises_and_keeps_the_first(cat: Catalog):
    first = cat.commit_backup(make_image(backup_id=f"web1_{T0}"), FILES, first_copy())
    with pytest.raises(DuplicateBackupId):
        cat.commit_backup(make_image(backup_id=f"web1_{T0}", mode=DteMode.OFF), FILES[:1], first_copy("media2"))
    assert cat.get_image(first.backup_id) == first
    assert cat.files(first.backup_id) == FILES
    assert [c.media_server for c in cat.copies(first.backup_id)] == ["media1"]


def test_import_image_keeps_its_id_and_origin(cat: Catalog):
    image = make_image(backup_id=f"web1_{T0}", origin_domain="prod")
    stored = cat.import_image(image, FILES, first_copy("dr-media"))
    assert stored.origin_domain == "prod" and stored.backup_id == f"web1_{T0}"
    assert cat.copies(stored.backup_id)[0].media_server == "dr-media"
    with pytest.raises(ValueError):
        cat.import_image(make_image(backup_id=f"web1_{T0 + 1}"), FILES, first_copy())
    with pytest.raises(DuplicateBackupId):
        cat.import_image(image, FILES, first_copy())


# ---- copies ----------------------------------------------------------------------------


def test_copy_numbers_follow_on_and_hierarchical_is_stored_as_given(cat: Catalog):
    image = cat.commit_backup(make_image(), FILES, first_copy(mode=DteMode.OFF))
    c2 = cat.add_copy(image.backup_id, "media2", "/s/2", DteMode.ON, DteMode.OFF, parent_copy=1)
    # Stored exactly as given, even a pair no rule would produce: the catalog records, fabric.dte decides.
    c3 = cat.add_copy(image.backup_id, "media3", "/s/3", DteMode.OFF, DteMode.ON, parent_copy=2)
    assert (c2.copy_number, c3.copy_number) == (2, 3)
    stored = cat.copies(image.backup_id)
    assert stored[1:] == [c2, c3]
    assert [(c.copy_dte_mode, c.hierarchical_dte_mode, c.parent_copy, c.primary) for c in stored] == [
        (DteMode.OFF, DteMode.OFF, None, True),
        (DteMode.ON, DteMode.OFF, 1, False),
        (DteMode.OFF, DteMode.ON, 2, False),
    ]
    assert cat.get_image(image.backup_id).revision == 3  # each copy changes the image


def test_add_copy_refuses_unknown_image_and_unknown_parent(cat: Catalog):
    image = cat.commit_backup(make_image(), FILES, first_copy())
    with pytest.raises(UnknownImage):
        cat.add_copy("nobody_0000000001", "media2", "/s", DteMode.ON, DteMode.ON, 1)
    with pytest.raises(InvalidRecord):
        cat.add_copy(image.backup_id, "media2", "/s", DteMode.ON, DteMode.ON, parent_copy=9)
    assert len(cat.copies(image.backup_id)) == 1
    assert cat.get_image(image.backup_id).revision == 1


# ---- image DTE mode, audit, revisions -------------------------------------------------------


def test_set_image_dte_mode_writes_audit_and_moves_revision(tmp_path: Path):
    ticks = iter(range(T0, T0 + 100))
    cat = Catalog.open(tmp_path / "c.db", clock=lambda: next(ticks))
    image = cat.commit_backup(make_image(mode=DteMode.ON), FILES, first_copy())
    etag = cat.image_etag(image.backup_id)
    assert parse_etag(etag) == 1

    assert cat.set_image_dte_mode(image.backup_id, DteMode.OFF, "bpimage", if_revision=1) == (DteMode.ON, DteMode.OFF)
    after = cat.get_image(image.backup_id)
    assert after.image_dte_mode is DteMode.OFF and after.revision == 2
    assert cat.image_etag(image.backup_id) == after.etag != etag

    [audit] = cat.list_audit()
    assert (audit.actor, audit.what, audit.before, audit.after) == ("bpimage", f"image {image.backup_id} image_dte_mode", "on", "off")
    assert audit.when.endswith("+00:00") and audit.when.startswith("2023-11-14T")

    # A PATCH holding the old ETag loses, and changes nothing.
    with pytest.raises(RevisionMismatch) as info:
        cat.set_image_dte_mode(image.backup_id, DteMode.ON, "REST PATCH /catalog/images/x", if_revision=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert cat.get_image(image.backup_id).image_dte_mode is DteMode.OFF
    assert len(cat.list_audit()) == 1

    # Setting the mode it has is a no-op: no revision, no audit.
    assert cat.set_image_dte_mode(image.backup_id, DteMode.OFF, "bpimage") == (DteMode.OFF, DteMode.OFF)
    assert cat.get_image(image.backup_id).revision == 2 and len(cat.list_audit()) == 1

    with pytest.raises(UnknownImage):
        cat.set_image_dte_mode("ghost_0000000001", DteMode.ON, "bpimage")
    with pytest.raises(UnknownImage):
        cat.image_etag("ghost_0000000001")
    assert issubclass(UnknownImage, CatalogError) and issubclass(RevisionMismatch, CatalogError)
    cat.close()


def test_parse_etag():
    assert parse_etag('"12"') == 12
    assert parse_etag('W/"12"') is None
    assert parse_etag("*") is None


def test_settings_and_hosts_with_audit(cat: Catalog):
    assert cat.get_settings().global_mode is GlobalMode.PREFERRED_ON
    assert cat.get_settings().ignore_image_mode is IgnoreImageMode.NEVER
    assert cat.set_global_mode(GlobalMode.ENFORCED, "nbseccmd") == (GlobalMode.PREFERRED_ON, GlobalMode.ENFORCED)
    assert cat.set_ignore_image_mode(IgnoreImageMode.ALWAYS, "scenario step 4") == (IgnoreImageMode.NEVER, IgnoreImageMode.ALWAYS)
    settings_ = cat.get_settings()
    assert (settings_.global_mode, settings_.ignore_image_mode) == (GlobalMode.ENFORCED, IgnoreImageMode.ALWAYS)
    assert settings_.as_dte().global_mode is GlobalMode.ENFORCED
    # Domains are independent.
    cat.set_global_mode(GlobalMode.PREFERRED_OFF, "nbseccmd", domain="dr")
    assert cat.get_settings("dr").global_mode is GlobalMode.PREFERRED_OFF
    assert cat.get_settings().global_mode is GlobalMode.ENFORCED

    assert cat.set_host_dte_mode("web1", "OFF", "scenario step 2") == (None, "off")
    assert cat.set_host_dte_mode("media1", "on", "nbseccmd") == (None, "on")
    assert cat.set_host_dte_mode("web1", "automatic", "scenario step 3") == ("off", "automatic")
    assert cat.host_dte_modes() == {"media1": "on", "web1": "automatic"}
    with pytest.raises(ValueError):
        cat.set_host_dte_mode("web1", "sometimes", "x")
    assert cat.set_host_version("media-90", "9", "scenario") == (None, "9.0")
    with pytest.raises(ValueError):
        cat.set_host_version("media-90", "nine", "scenario")
    assert cat.host_versions() == {"media-90": "9.0"}

    audit = cat.list_audit()
    assert [a.what for a in audit] == [
        "domain default global_dte_mode",
        "domain default dte_ignore_image_mode",
        "domain dr global_dte_mode",
        "host web1 dte_mode",
        "host media1 dte_mode",
        "host web1 dte_mode",
        "host media-90 version",
    ]
    assert [a.audit_id for a in cat.list_audit(limit=2, after_id=audit[2].audit_id)] == [audit[3].audit_id, audit[4].audit_id]


# ---- listing -----------------------------------------------------------------------------

CLIENTS = ["a", "b", "c"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    images=st.lists(
        st.tuples(st.sampled_from(CLIENTS), st.integers(0, 5), st.sampled_from(list(DteMode))),
        max_size=40,
    ),
    client=st.sampled_from([None, *CLIENTS]),
    dte_mode=st.sampled_from([None, *DteMode]),
    page=st.integers(1, 7),
)
def test_list_images_pages_match_a_model(images, client, dte_mode, page):
    with tempfile.TemporaryDirectory() as tmp, Catalog.open(Path(tmp) / "c.db") as cat:
        model = []
        for who, offset, mode in images:
            # Few distinct times: many ties on backup_time, broken by backup_id.
            stored = cat.commit_backup(make_image(who, T0 + offset, mode), [], first_copy())
            model.append(stored)
        expected = sorted(
            (i for i in model if (client is None or i.client == client) and (dte_mode is None or i.image_dte_mode is dte_mode)),
            key=lambda i: (i.backup_time, i.backup_id),
            reverse=True,
        )
        seen: list[ImageRecord] = []
        after = None
        # Bounded: a cursor that does not move on must fail the test, not hang it.
        for _ in range(len(expected) + 2):
            batch = cat.list_images(client=client, dte_mode=dte_mode, limit=page, after=after)
            assert len(batch) <= page
            if not batch:
                break
            seen.extend(batch)
            after = batch[-1].backup_id
        else:
            pytest.fail("pagination did not end")
        assert seen == expected
        assert cat.count_images(client=client, dte_mode=dte_mode) == len(expected)


def test_list_images_unknown_cursor(cat: Catalog):
    with pytest.raises(UnknownImage):
        cat.list_images(after="ghost_0000000001")


def test_list_images_queries_use_an_index_without_sorting(cat: Catalog):
    for i in range(5):
        cat.commit_backup(make_image("web1", T0 + i, DteMode.ON if i % 2 else DteMode.OFF), [], first_copy())
    statements: list[str] = []
    cat._conn.set_trace_callback(statements.append)
    cursor = cat.list_images(limit=2)[-1].backup_id
    for client in (None, "web1"):
        for mode in (None, DteMode.ON):
            cat.list_images(client=client, dte_mode=mode, limit=2, after=cursor)
    cat._conn.set_trace_callback(None)
    listing = [s for s in statements if "ORDER BY backup_time DESC" in s]
    assert len(listing) == 5
    with sqlite3.connect(cat.path) as conn:
        for sql in listing:
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            # Walking an index in order for the first page is fine; a table scan or a sort is not.
            assert all("USING INDEX" in step or "USING COVERING INDEX" in step for step in plan), (sql, plan)
            assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)


# ---- jobs --------------------------------------------------------------------------------


def test_jobs_create_update_list(cat: Catalog):
    parent = cat.create_job("backup", client="web1", step=1, started=100.0)
    child = cat.create_job("backup", client="web1", media_server="media1", parent_job_id=parent.job_id, dte_mode=DteMode.ON)
    assert parent.dte_mode is None and parent.state == "queued" and parent.started == 100.0
    assert child.job_id > parent.job_id and child.dte_mode is DteMode.ON
    done = cat.update_job(child.job_id, state="done", status=0, bytes=4096, files=2, tls_version="TLSv1.3", ended=200.0)
    assert cat.get_job(child.job_id) == done and done.status == 0 and done.tls_version == "TLSv1.3"
    for _ in range(3):
        cat.create_job("verify")
    first_page = cat.list_jobs(limit=3)
    second_page = cat.list_jobs(limit=3, after=first_page[-1].job_id)
    assert [j.job_id for j in first_page + second_page] == list(range(5, 0, -1))
    with pytest.raises(TypeError):
        cat.update_job(child.job_id, colour="blue")
    with pytest.raises(ValueError):
        cat.update_job(child.job_id, state="exploded")
    with pytest.raises(ValueError):
        cat.create_job("teleport")
    with pytest.raises(UnknownJob):
        cat.update_job(999, state="done")
    with pytest.raises(InvalidRecord):
        cat.create_job("restore", parent_job_id=999)
    assert cat.get_job(999) is None


# ---- the file ------------------------------------------------------------------------------


def test_reopening_preserves_everything(tmp_path: Path):
    path = tmp_path / "catalog.db"
    with Catalog.open(path) as cat:
        image = cat.commit_backup(make_image(), FILES, first_copy())
        cat.add_copy(image.backup_id, "media2", "/s/2", DteMode.ON, DteMode.ON, 1)
        cat.set_image_dte_mode(image.backup_id, DteMode.OFF, "bpimage")
        cat.set_global_mode(GlobalMode.ENFORCED, "nbseccmd")
        cat.set_host_dte_mode("web1", "on", "x")
        job = cat.create_job("backup", client="web1", backup_id=image.backup_id)
        before = (cat.get_image(image.backup_id), cat.copies(image.backup_id), cat.files(image.backup_id), cat.list_audit(), cat.get_settings(), cat.host_dte_modes(), cat.list_jobs())
    with Catalog.open(path) as cat:
        after = (cat.get_image(image.backup_id), cat.copies(image.backup_id), cat.files(image.backup_id), cat.list_audit(), cat.get_settings(), cat.host_dte_modes(), cat.list_jobs())
        assert after == before
        # Job ids are never reused, even after a reopen.
        assert cat.create_job("verify").job_id == job.job_id + 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "catalog.db"
    Catalog.open(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(CatalogError):
        Catalog.open(path)


def test_a_second_connection_sees_only_committed_data(tmp_path: Path):
    path = tmp_path / "catalog.db"
    writer, reader = Catalog.open(path), Catalog.open(path)
    try:
        image = writer.commit_backup(make_image(), FILES, first_copy())
        assert reader.get_image(image.backup_id) == image
        # While the writer holds an open transaction, the reader is not blocked (WAL)
        # and does not see the uncommitted change.
        with writer._transaction() as conn:
            conn.execute("UPDATE images SET image_dte_mode = 'off' WHERE backup_id = ?", (image.backup_id,))
            assert reader.get_image(image.backup_id).image_dte_mode is DteMode.ON
        assert reader.get_image(image.backup_id).image_dte_mode is DteMode.OFF
        writer.set_global_mode(GlobalMode.PREFERRED_OFF, "nbseccmd")
        assert reader.get_settings().global_mode is GlobalMode.PREFERRED_OFF
    finally:
        writer.close()
        reader.close()


CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from fabric.catalog import Catalog, CopyRecord, FileRecord, ImageRecord
    from fabric.dte import DteMode
    cat = Catalog.open(Path(sys.argv[1]))
    i = 0
    while True:
        files = [FileRecord(f"/f{n}", n, "00" * 32) for n in range(50)]
        image = ImageRecord("", "web1", "standard", "full", 1700000000, DteMode.ON, 1225, 50)
        image = cat.commit_backup(image, files, CopyRecord("", 1, "m", "/s", DteMode.ON, DteMode.ON))
        cat.add_copy(image.backup_id, "m2", "/s2", DteMode.ON, DteMode.ON, 1)
        cat.set_image_dte_mode(image.backup_id, DteMode.OFF if i % 2 else DteMode.ON, "crash test")
        i += 1
    """
)


def test_a_writer_killed_mid_write_leaves_a_consistent_file(tmp_path: Path):
    path = tmp_path / "catalog.db"
    Catalog.open(path).close()
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(path)], cwd=REPO)
    try:
        with Catalog.open(path) as watcher:
            deadline = time.monotonic() + 30
            while watcher.count_images() < 30 and time.monotonic() < deadline:
                assert proc.poll() is None, "the writer died on its own"
                time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    with Catalog.open(path) as cat:
        images = cat.list_images(limit=10_000)
        assert len(images) >= 30
        for image in images:
            # Every committed image is whole: all its files and its copy 1.
            assert len(cat.files(image.backup_id)) == 50
            assert cat.copies(image.backup_id)[0].copy_number == 1
        # The file is writable again.
        cat.commit_backup(make_image(), FILES, first_copy())
