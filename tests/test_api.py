"""Tests for fabric.api: the primary's REST API over real sockets and a real SQLite catalog.

Every endpoint, the If-Match race between two administrators, 401s, a table of bad input
that must leave the catalog unchanged, hypothesis fuzzing (never a 5xx), and an end-to-end
run where the next job on an image follows a mode changed through PATCH and `bpimage`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from fabric import cli
from fabric.api import (
    API_BASE,
    AUDIT_REASON_HEADER,
    NB_CONTENT_TYPE,
    ApiServer,
    CatalogBackend,
    PrimaryBackend,
    openapi_document,
    write_token,
)
from fabric.catalog import Catalog, CopyRecord, FileRecord, ImageRecord
from fabric.dte import ClientMode, DteMode, GlobalMode, IgnoreImageMode, Role
from fabric.scenario.loader import parse_scenario
from fabric.scenario.run import Fabric

TOKEN = "t0ken-for-tests"
T0 = 1_700_000_000
ROLES = {"primary1": Role.PRIMARY, "media1": Role.MEDIA, "media2": Role.MEDIA, "media-90": Role.MEDIA,
         "web1": Role.CLIENT, "legacy": Role.CLIENT, "db1": Role.CLIENT}
JSON_TYPES = (NB_CONTENT_TYPE, "application/json")


def make_catalog(path: Path) -> tuple[Catalog, list[str]]:
    """A small real catalog: four images (two On), a second copy, jobs with and without DTE."""
    path.parent.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.open(path)
    ids = []
    for i, (client, mode) in enumerate([("web1", DteMode.ON), ("web1", DteMode.OFF), ("legacy", DteMode.OFF), ("db1", DteMode.ON)]):
        image = catalog.commit_backup(
            ImageRecord("", client, "standard", "full", T0 + i, mode, 4096 * (i + 1), 1, job_id=i + 1),
            [FileRecord("/data/a", 4096 * (i + 1), "aa" * 32)],
            CopyRecord("", 1, "media1", f"/storage/media1/{client}{i}", mode, mode, created=T0 + i),
        )
        ids.append(image.backup_id)
    catalog.add_copy(ids[0], "media2", "/storage/media2/web1-0.dup", DteMode.ON, DteMode.ON, 1, created=T0 + 10)
    parent = catalog.create_job("policy", state="done", status=0, client="web1", started=T0, ended=T0 + 5)
    catalog.create_job("backup", state="done", status=0, client="web1", media_server="media1", dte_mode=DteMode.ON,
                       tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384", bytes=4096, parent_job_id=parent.job_id,
                       backup_id=ids[0], started=T0, ended=T0 + 1)
    catalog.create_job("backup", state="done", status=0, client="legacy", media_server="media1", dte_mode=DteMode.OFF,
                       bytes=12288, backup_id=ids[2], started=T0 + 2, ended=T0 + 3)
    catalog.set_host_version("media-90", "9.0", "topology")
    return catalog, ids


def snapshot(catalog: Catalog) -> tuple:
    """Everything a bad request must leave alone."""
    images = [(i.backup_id, i.image_dte_mode, i.revision) for i in catalog.list_images(limit=1000)]
    return images, len(catalog.list_audit(limit=10_000)), catalog.get_settings("default"), catalog.host_dte_modes(), catalog.host_versions()


class Api:
    """A test client: real HTTP to the real server; paths taken as already encoded."""

    def __init__(self, url: str, session: aiohttp.ClientSession, catalog: Catalog, ids: list[str]) -> None:
        self.url, self.session, self.catalog, self.ids = url, session, catalog, ids

    async def call(self, method: str, path: str, body: object = None, *, token: str | None = TOKEN, raw: bytes | None = None,
                   content_type: str = NB_CONTENT_TYPE, headers: dict | None = None) -> tuple[int, dict, object]:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent["Content-Type"] = content_type
        async with self.session.request(method, URL(self.url + path, encoded=True), data=data, headers=sent) as response:
            text = await response.text()
            return response.status, response.headers.copy(), (json.loads(text) if text else None)

    def patch_body(self, backup_id: str, mode: object = "OFF") -> dict:
        return {"data": {"type": "image", "id": backup_id, "attributes": {"dteMode": mode}}}


@pytest.fixture
async def api(tmp_path):
    catalog, ids = make_catalog(tmp_path / "hosts" / "primary1" / "catalog.sqlite")
    server = ApiServer(CatalogBackend(catalog, "primary1", "default", ROLES), TOKEN)
    await server.start()
    async with aiohttp.ClientSession() as session:
        yield Api(server.url, session, catalog, ids)
    await server.stop()
    catalog.close()


# ---- reads -------------------------------------------------------------------------------


async def test_list_images_filters_by_dte_mode_and_client(api):
    status, headers, body = await api.call("GET", "/catalog/images?dteMode=ON")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [d["id"] for d in body["data"]] == [api.ids[3], api.ids[0]]  # newest first
    first = body["data"][1]
    assert first["type"] == "image" and first["attributes"]["imageDteMode"] == "ON"
    assert [(c["copyNumber"], c["mediaServer"], c["copyDteMode"], c["hierarchicalDteMode"]) for c in first["attributes"]["copies"]] == \
        [(1, "media1", "ON", "ON"), (2, "media2", "ON", "ON")]
    assert first["meta"]["etag"] == '"2"'  # the added copy moved the revision on

    status, _, body = await api.call("GET", "/catalog/images?" + "filter=" + quote("clientName eq 'web1' and imageDteMode eq 'OFF'"))
    assert status == 200 and [d["id"] for d in body["data"]] == [api.ids[1]]
    status, _, body = await api.call("GET", "/catalog/images?clientName=legacy")
    assert [d["attributes"]["clientName"] for d in body["data"]] == ["legacy"]


async def test_list_images_pages_by_keyset_cursor(api):
    seen, path = [], "/catalog/images?page%5Blimit%5D=3"
    while path:
        status, _, body = await api.call("GET", path)
        assert status == 200 and len(body["data"]) <= 3
        seen += [d["id"] for d in body["data"]]
        assert body["meta"]["pagination"]["count"] == len(body["data"])
        following = body["links"]["next"]
        path = following[len(API_BASE):] if following else None
    assert seen == list(reversed(api.ids))


async def test_vendor_media_type_is_answered_when_asked_for(api):
    status, headers, _ = await api.call("GET", "/security/properties", headers={"Accept": NB_CONTENT_TYPE})
    assert status == 200 and headers["Content-Type"] == NB_CONTENT_TYPE


async def test_get_image_has_an_etag(api):
    status, headers, body = await api.call("GET", f"/catalog/images/{api.ids[2]}")
    assert status == 200 and headers["ETag"] == '"1"' and body["data"]["attributes"]["imageDteMode"] == "OFF"
    status, _, body = await api.call("GET", "/catalog/images/nosuch_1700000000")
    assert status == 404 and body["errorCode"] == 404 and "nosuch_1700000000" in body["errorMessage"]


async def test_jobs_show_dte_mode_tls_and_cipher(api):
    status, _, body = await api.call("GET", "/admin/jobs")
    assert status == 200
    jobs = {d["attributes"]["jobId"]: d["attributes"] for d in body["data"]}
    assert [j["dteMode"] for j in jobs.values()] == ["Off", "On", ""]  # newest first; the parent job has none
    assert jobs[2]["tlsVersion"] == "TLSv1.3" and jobs[2]["tlsCipher"] == "TLS_AES_256_GCM_SHA384" and jobs[2]["parentJobId"] == 1
    assert jobs[3]["kilobytesTransferred"] == 12
    status, _, body = await api.call("GET", "/admin/jobs?page%5Blimit%5D=1&page%5Bafter%5D=3")
    assert [d["id"] for d in body["data"]] == ["2"] and body["meta"]["pagination"]["next"] == 2
    status, _, body = await api.call("GET", "/admin/jobs/2")
    assert status == 200 and body["data"]["attributes"]["dteMode"] == "On"
    assert (await api.call("GET", "/admin/jobs/99"))[0] == 404
    assert (await api.call("GET", "/admin/jobs/x1"))[0] == 400


async def test_openapi_document_is_public_and_describes_every_route(api):
    async with api.session.get(api.url + "/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document == json.loads(json.dumps(openapi_document()))
    assert {"/catalog/images", "/catalog/images/{backupId}", "/security/properties", "/admin/jobs", "/config/hosts/{name}",
            "/security/auditlogs"} <= set(document["paths"])
    assert "patch" in document["paths"]["/catalog/images/{backupId}"]


# ---- PATCH and the audit -------------------------------------------------------------------


async def test_patch_sets_the_mode_returns_the_image_and_is_audited(api):
    backup_id = api.ids[0]
    status, headers, body = await api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, "OFF"),
                                           headers={AUDIT_REASON_HEADER: "ticket 42"})
    assert status == 200 and headers["ETag"] == '"3"'
    assert body["data"]["attributes"]["imageDteMode"] == "OFF" and body["data"]["meta"]["revision"] == 3
    assert api.catalog.get_image(backup_id).image_dte_mode is DteMode.OFF
    last = api.catalog.list_audit(limit=100)[-1]
    assert (last.actor, last.before, last.after) == (f"REST PATCH /catalog/images/{backup_id} (ticket 42)", "on", "off")
    assert backup_id in last.what

    # Plain application/json works as well, and setting the mode it has changes nothing.
    before = snapshot(api.catalog)
    status, _, body = await api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, "off"),
                                     content_type="application/json")
    assert status == 200 and snapshot(api.catalog) == before

    status, _, body = await api.call("GET", "/security/auditlogs")
    assert status == 200 and body["data"][-1]["attributes"]["actor"].startswith("REST PATCH")


async def test_if_match_stops_the_second_of_two_admins(api):
    backup_id = api.ids[3]
    _, first_read, _ = await api.call("GET", f"/catalog/images/{backup_id}")
    _, second_read, _ = await api.call("GET", f"/catalog/images/{backup_id}")
    assert first_read["ETag"] == second_read["ETag"] == '"1"'

    status, headers, _ = await api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, "OFF"),
                                        headers={"If-Match": first_read["ETag"]})
    assert status == 200 and headers["ETag"] == '"2"'
    before = snapshot(api.catalog)
    status, _, body = await api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, "ON"),
                                     headers={"If-Match": second_read["ETag"]})
    assert status == 412 and "changed since it was read" in body["errorMessage"]
    assert snapshot(api.catalog) == before and api.catalog.get_image(backup_id).image_dte_mode is DteMode.OFF

    # The second admin re-reads and tries again; a list naming the current tag, and `*`, match.
    status, _, _ = await api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, "ON"),
                                  headers={"If-Match": '"1", "2"'})
    assert status == 200
    assert (await api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, "OFF"), headers={"If-Match": "*"}))[0] == 200
    # A weak tag never matches (strong comparison), nor does garbage.
    for tag in ('W/"4"', "garbage"):
        assert (await api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, "ON"), headers={"If-Match": tag}))[0] == 412


async def test_concurrent_patches_with_the_same_etag_let_exactly_one_through(api):
    backup_id = api.ids[1]
    modes = ["ON", "OFF"] * 4
    results = await asyncio.gather(*(api.call("PATCH", f"/catalog/images/{backup_id}", api.patch_body(backup_id, m),
                                              headers={"If-Match": '"1"'}) for m in modes))
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 1 and statuses.count(412) == len(modes) - 1


# ---- security properties and hosts ---------------------------------------------------------------


async def test_security_properties_get_and_post(api):
    status, _, body = await api.call("GET", "/security/properties")
    assert status == 200 and body == {"dteGlobalMode": "PREFERRED_ON", "dteIgnoreImageMode": "NEVER"}
    status, _, body = await api.call("POST", "/security/properties", {"dteGlobalMode": "ENFORCED"})
    assert status == 200 and body == {"dteGlobalMode": "ENFORCED", "dteIgnoreImageMode": "NEVER"}
    status, _, body = await api.call("POST", "/security/properties", {"dteGlobalMode": "PREFERRED_OFF", "dteIgnoreImageMode": "ALWAYS"},
                                     content_type="application/json")
    assert status == 200 and api.catalog.get_settings("default").global_mode is GlobalMode.PREFERRED_OFF
    assert api.catalog.get_settings("default").ignore_image_mode is IgnoreImageMode.ALWAYS
    audit = api.catalog.list_audit(limit=100)
    assert [(a.before, a.after) for a in audit[-3:]] == [("preferred_on", "enforced"), ("enforced", "preferred_off"), ("never", "always")]
    assert all(a.actor == "REST POST /security/properties" for a in audit[-3:])

    before = snapshot(api.catalog)
    for bad in ({"dteGlobalMode": "PREFERRED_OFF", "dteIgnoreImageMode": "SOMETIMES"},  # one bad value: neither is written
                {"dteGlobalMode": 2}, {"dteGlobalMode": None}, {}, {"allowInsecureBackLevelHost": 1}, [], "ENFORCED"):
        status, _, body = await api.call("POST", "/security/properties", bad)
        assert status == 400 and body["errorCode"] == 400, bad
    assert snapshot(api.catalog) == before


async def test_hosts_settings(api):
    status, _, body = await api.call("GET", "/config/hosts")
    assert status == 200 and {d["id"]: d["attributes"]["role"] for d in body["data"]}["media1"] == "MEDIA"
    status, _, body = await api.call("POST", "/config/hosts/web1", {"dteMode": "OFF"})
    assert status == 200 and body["data"]["attributes"]["dteMode"] == "OFF"
    status, _, body = await api.call("POST", "/config/hosts/media1", {"dteMode": "off"})
    assert status == 200 and api.catalog.host_dte_modes() == {"media1": "off", "web1": "off"}
    assert api.catalog.list_audit(limit=100)[-1].actor == "REST POST /config/hosts/media1"

    before = snapshot(api.catalog)
    cases = [("media1", {"dteMode": "AUTOMATIC"}, 400),  # no Automatic on a media server
             ("media-90", {"dteMode": "ON"}, 400),  # the setting exists from 10.0
             ("primary1", {"dteMode": "ON"}, 400), ("web1", {"dteMode": "MAYBE"}, 400), ("web1", {"version": "ten"}, 400),
             ("web1", {"dteMode": "ON", "version": "x"}, 400), ("web1", {"colour": "red"}, 400), ("web1", {}, 400),
             ("nosuch", {"dteMode": "ON"}, 404), ("bad%20name", {"dteMode": "ON"}, 400)]
    for name, body_, expected in cases:
        status, _, body = await api.call("POST", f"/config/hosts/{name}", body_)
        assert status == expected, (name, body_, body)
    assert snapshot(api.catalog) == before
    status, _, body = await api.call("GET", "/config/hosts/web1")
    assert body["data"]["attributes"]["dteMode"] == "OFF"


# ---- 401 and bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}, {"Authorization": "Basic dDp0"},
                                     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                                     {"Authorization": "Bearer t\u00f6ken"}])
async def test_missing_or_wrong_token_is_401_and_changes_nothing(api, headers):
    before = snapshot(api.catalog)
    for method, path, body in [("GET", "/catalog/images", None), ("GET", "/security/properties", None),
                               ("PATCH", f"/catalog/images/{api.ids[0]}", api.patch_body(api.ids[0])),
                               ("POST", "/security/properties", {"dteGlobalMode": "ENFORCED"}), ("GET", "/no/such/path", None)]:
        status, response_headers, answer = await api.call(method, path, body, token=None, headers=headers)
        assert status == 401 and answer["errorCode"] == 401, (method, path)
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
    assert snapshot(api.catalog) == before


async def test_the_bare_token_is_accepted_as_netbackup_sends_it(api):
    assert (await api.call("GET", "/security/properties", token=None, headers={"Authorization": TOKEN}))[0] == 200


BAD_PATCHES = [
    # (name, path id (encoded), body or raw bytes, content type, status)
    ("unknown id", "nosuch_1700000000", "ok", NB_CONTENT_TYPE, 404),
    ("dot-dot", quote("../x", safe=""), "ok", NB_CONTENT_TYPE, 400),
    ("dot-dot with ctime", quote("../etc_1700000000", safe=""), "ok", NB_CONTENT_TYPE, 400),
    ("empty id", "", "ok", NB_CONTENT_TYPE, 400),
    ("10 kB id", "a" * 10_000 + "_1700000000", "ok", NB_CONTENT_TYPE, 400),
    ("space in id", quote("web 1_1700000000", safe=""), "ok", NB_CONTENT_TYPE, 400),
    ("unknown mode", "ID", {"dteMode": "MAYBE"}, NB_CONTENT_TYPE, 400),
    ("mode is a number", "ID", {"dteMode": 1}, NB_CONTENT_TYPE, 400),
    ("mode is a bool", "ID", {"dteMode": True}, NB_CONTENT_TYPE, 400),
    ("mode is null", "ID", {"dteMode": None}, NB_CONTENT_TYPE, 400),
    ("no attributes", "ID", {}, NB_CONTENT_TYPE, 400),
    ("read-only attribute", "ID", {"dteMode": "OFF", "clientName": "x"}, NB_CONTENT_TYPE, 400),
    ("data is a list", "ID", b'{"data": []}', NB_CONTENT_TYPE, 400),
    ("body is a list", "ID", b"[]", NB_CONTENT_TYPE, 400),
    ("body is null", "ID", b"null", NB_CONTENT_TYPE, 400),
    ("not JSON", "ID", b"{not json", NB_CONTENT_TYPE, 400),
    ("not UTF-8", "ID", b"\xff\xfe", NB_CONTENT_TYPE, 400),
    ("deeply nested", "ID", b"[" * 60_000, NB_CONTENT_TYPE, 400),
    ("type is not image", "ID", b'{"data": {"type": "job", "attributes": {"dteMode": "OFF"}}}', NB_CONTENT_TYPE, 409),
    ("id mismatch", "ID", b'{"data": {"type": "image", "id": "db1_1700000003", "attributes": {"dteMode": "OFF"}}}', NB_CONTENT_TYPE, 409),
    ("text/plain", "ID", "ok", "text/plain", 415),
    ("form", "ID", "ok", "application/x-www-form-urlencoded", 415),
    ("huge body", "ID", b'{"data": "' + b"x" * 100_000 + b'"}', NB_CONTENT_TYPE, 413),
]


@pytest.mark.parametrize("name,path_id,body,content_type,expected", BAD_PATCHES, ids=[c[0] for c in BAD_PATCHES])
async def test_bad_patch_gets_a_clear_4xx_and_changes_nothing(api, name, path_id, body, content_type, expected):
    good_id = api.ids[0]
    path_id = good_id if path_id == "ID" else path_id
    before = snapshot(api.catalog)
    if body == "ok":
        raw = json.dumps(api.patch_body(good_id if path_id == good_id else path_id)).encode()
    elif isinstance(body, dict):
        raw = json.dumps({"data": {"type": "image", "id": good_id, "attributes": body}}).encode()
    else:
        raw = body
    status, headers, answer = await api.call("PATCH", f"/catalog/images/{path_id}", raw=raw, content_type=content_type)
    assert status == expected, answer
    assert answer["errorCode"] == expected and answer["errorMessage"] and "\n" not in answer["errorMessage"]
    assert len(answer["errorMessage"]) < 300  # a 10 kB id is not echoed back whole
    assert snapshot(api.catalog) == before


@pytest.mark.parametrize("query", ["page%5Blimit%5D=0", "page%5Blimit%5D=100000", "page%5Blimit%5D=-1", "page%5Blimit%5D=x",
                                   "page%5Boffset%5D=10", "dteMode=MAYBE", "filter=" + quote("policyName eq 'x'"),
                                   "filter=garbage", "page%5Bafter%5D=..%2Fx", "page%5Bafter%5D=nosuch_1700000000",
                                   "clientName=" + quote("../x")])
async def test_bad_list_queries_are_400(api, query):
    status, _, answer = await api.call("GET", f"/catalog/images?{query}")
    assert status == 400 and answer["errorCode"] == 400


async def test_unknown_routes_and_methods_are_json_4xx(api):
    status, _, answer = await api.call("GET", "/no/such/path")
    assert status == 404 and answer["errorCode"] == 404
    status, headers, answer = await api.call("DELETE", f"/catalog/images/{api.ids[0]}")
    assert status == 405 and answer["errorCode"] == 405 and "PATCH" in headers["Allow"]


# ---- fuzzing: never a 5xx, and a refused request changes nothing -----------------------------------


class ServerThread:
    """The API in its own thread and event loop, so a synchronous hypothesis test can call it."""

    def __init__(self, backend: CatalogBackend) -> None:
        self.server = ApiServer(backend, TOKEN)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        parts = urlsplit(self.server.url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        return self

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, object]:
        self.conn.request(method, API_BASE + path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = self.conn.getresponse()
        data = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return response.status, (json.loads(data) if data else None)

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
modes = st.sampled_from(["ON", "OFF", "on", "Off", "", "MAYBE", "ON ", "0", "1"]) | json_values
patch_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"data": st.fixed_dictionaries(
        {"type": st.sampled_from(["image", "job", ""]) | json_values, "attributes": st.dictionaries(
            st.sampled_from(["dteMode", "imageDteMode", "clientName", "x"]), modes, max_size=3)},
        optional={"id": st.sampled_from(["ID", "other_1700000000"]) | json_values})}),
)
backup_ids = st.one_of(
    st.sampled_from(["ID", "nosuch_1700000000", "", "..", ".", "../x", "%", "a/b_1700000000", "web1_170000000", "web1_17000000000"]),
    st.text(max_size=300),
    st.builds(lambda c, t: f"{c}_{t}", st.text(min_size=1, max_size=20), st.integers(0, 10**11)),
)


def test_fuzz_patch_never_5xx(tmp_path):
    catalog, ids = make_catalog(tmp_path / "catalog.sqlite")
    reader = Catalog.open(tmp_path / "catalog.sqlite")
    with ServerThread(CatalogBackend(catalog, "primary1", "default", ROLES)) as server:

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(backup_id=backup_ids, body=patch_bodies, content_type=st.sampled_from([NB_CONTENT_TYPE, "application/json", "text/plain"]),
               if_match=st.none() | st.sampled_from(['"1"', '"2"', "*", 'W/"1"', "x"]))
        def check(backup_id, body, content_type, if_match):
            backup_id = ids[0] if backup_id == "ID" else backup_id
            if isinstance(body, dict) and isinstance(body.get("data"), dict) and body["data"].get("id") == "ID":
                body["data"]["id"] = ids[0]
            before = snapshot(reader)
            headers = {"Content-Type": content_type, **({"If-Match": if_match} if if_match else {})}
            status, answer = server.request("PATCH", f"/catalog/images/{quote(backup_id, safe='')}", json.dumps(body).encode(), headers)
            assert status < 500, (status, answer)
            assert answer["errorCode"] == status if status >= 400 else answer["data"]["id"] == backup_id
            if status != 200:
                assert snapshot(reader) == before

        check()
    reader.close()
    catalog.close()


def test_fuzz_queries_never_5xx(tmp_path):
    catalog, _ = make_catalog(tmp_path / "catalog.sqlite")
    with ServerThread(CatalogBackend(catalog, "primary1", "default", ROLES)) as server:
        names = st.sampled_from(["page[limit]", "page[after]", "filter", "clientName", "dteMode", "x"])

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(path=st.sampled_from(["/catalog/images", "/admin/jobs", "/security/auditlogs"]),
               query=st.lists(st.tuples(names, st.text(max_size=40)), max_size=3))
        def check(path, query):
            encoded = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query)
            status, answer = server.request("GET", f"{path}?{encoded}")
            assert status < 500 and (status == 200 or answer["errorCode"] == status), (status, answer)

        check()
    catalog.close()


# ---- end to end: the next job on the image follows the new mode ------------------------------------

E2E = """
name: api-e2e
seed: 5
global_dte_mode: preferred_on
hosts:
  primary1: {role: primary, version: "10.5"}
  media1:   {role: media,   version: "10.5"}
  media2:   {role: media,   version: "10.5"}
  web1:     {role: client,  version: "10.5", data: {files: 8, size: 8MiB}}
steps:
  - backup:    {client: web1, media: media1, as: img}
    expect:    {dte: on}
  - set:       {global_dte_mode: preferred_off}
  - verify:    {image: img}
  - verify:    {image: img}
  - verify:    {image: img}
  - duplicate: {image: img, to: media2}
  - verify:    {image: img}
  - backup:    {client: web1, media: media1}
"""


@pytest.mark.e2e
async def test_next_operation_follows_a_mode_changed_through_the_api_and_bpimage(tmp_path):
    scenario = parse_scenario(E2E, "<api-e2e>")
    backup, set_off, verify1, verify2, verify3, duplicate, verify4, backup2 = scenario.steps
    fabric = Fabric(scenario, tmp_path)
    await fabric.start()
    primary = fabric.daemons["primary1"]
    token = write_token(tmp_path)
    server = ApiServer(PrimaryBackend(primary), token)
    try:
        await server.start()
        assert (await fabric.run_step(backup)).dte_mode == "on"
        await fabric.run_step(set_off)
        backup_id = fabric.aliases["img"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": NB_CONTENT_TYPE}

        # Image On under Preferred Off: the image mode is honored, the verify encrypts.
        first = await fabric.run_step(verify1)
        assert (first.status, first.dte_mode, first.tls is not None) == (0, "on", True)

        async with aiohttp.ClientSession(headers=headers) as http_:
            async with http_.get(f"{server.url}/catalog/images/{backup_id}") as response:
                etag = response.headers["ETag"]
            body = {"data": {"type": "image", "id": backup_id, "attributes": {"dteMode": "OFF"}}}
            async with http_.patch(f"{server.url}/catalog/images/{backup_id}", json=body, headers={"If-Match": etag}) as response:
                assert response.status == 200
            second = await fabric.run_step(verify2)
            assert (second.status, second.dte_mode, second.tls, second.verified) == (0, "off", None, True)

            # bpimage through the same API (the CLI blocks: it runs in a thread while this loop serves).
            token_file = tmp_path / "api-token"
            code = await asyncio.to_thread(cli.main, ["bpimage", "-update", "-backupid", backup_id, "-image_dtemode", "On",
                                                       "--primary", server.url, "--token-file", str(token_file)])
            assert code == 0
            third = await fabric.run_step(verify3)
            assert (third.status, third.dte_mode, third.tls["version"]) == (0, "on", "TLSv1.3")

            # A running job keeps the mode it was decided with; the change governs the next one.
            running = asyncio.ensure_future(fabric.run_step(duplicate))
            while not [j for j in primary.catalog.list_jobs(limit=5) if j.job_type == "duplicate" and j.state == "active"]:
                await asyncio.sleep(0.001)
            body["data"]["attributes"]["dteMode"] = "OFF"
            async with http_.patch(f"{server.url}/catalog/images/{backup_id}", json=body) as response:
                assert response.status == 200
            assert not running.done()
            duplicated = await running
            assert (duplicated.status, duplicated.dte_mode) == (0, "on")
            assert [c["copy_dte_mode"] for c in duplicated.copies] == ["on", "on"]
            fourth = await fabric.run_step(verify4)
            assert (fourth.status, fourth.dte_mode) == (0, "off")

            # A client's DTE_CLIENT_MODE through the API reaches the primary's registry and the client.
            async with http_.post(f"{server.url}/config/hosts/web1", json={"dteMode": "ON"}) as response:
                assert response.status == 200 and (await response.json())["data"]["attributes"]["dteMode"] == "ON"
            assert primary.hosts["web1"].dte_mode is ClientMode.ON
            assert fabric.daemons["web1"].config.dte_mode is ClientMode.ON
            assert (await fabric.run_step(backup2)).dte_mode == "on"  # client On beats Preferred Off

            async with http_.get(f"{server.url}/admin/jobs") as response:
                jobs = (await response.json())["data"]
            assert [j["attributes"]["dteMode"] for j in jobs][:3] == ["On", "Off", "On"]
        audit = primary.catalog.list_audit(limit=100)
        actors = [a.actor for a in audit if "image_dte_mode" in a.what]
        assert actors[0] == f"REST PATCH /catalog/images/{backup_id}"
        assert "bpimage -update" in actors[1]
    finally:
        await server.stop()
        await fabric.stop()
