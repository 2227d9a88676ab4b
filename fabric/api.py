"""The primary's REST API: NetBackup's catalog, security, jobs and host-config endpoints under /netbackup.

An aiohttp application wrapping a live Primary daemon, or a catalog alone (`fabric serve`), guarded by a bearer token.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import urlencode

import structlog
from aiohttp import web

from fabric.catalog import (
    AuditRecord,
    Catalog,
    CopyRecord,
    ImageRecord,
    JobRecord,
    RevisionMismatch,
    UnknownImage,
    format_etag,
    parse_backup_id,
    parse_etag,
)
from fabric.dte import ClientMode, DteMode, GlobalMode, IgnoreImageMode, MediaMode, Role, Version, MEDIA_MODE_MIN_VERSION

if TYPE_CHECKING:
    from fabric.daemons.primary import Primary

log = structlog.get_logger("fabric.api")

API_BASE = "/netbackup"
# Reference §7.2 (GH-APISAMPLES): the image APIs speak version 3.0 of NetBackup's media type.
NB_MEDIA_TYPE = "application/vnd.netbackup+json"
NB_CONTENT_TYPE = f"{NB_MEDIA_TYPE};version=3.0"
ACCEPTED_BODY_TYPES = (NB_MEDIA_TYPE, "application/json")
TOKEN_FILE = "api-token"  # in the state folder, mode 0600
URL_FILE = "api-url"  # in the primary's host folder while its API runs: how `--state` finds it
AUDIT_REASON_HEADER = "X-NetBackup-Audit-Reason"  # NetBackup's header for "why" in the audit log
LOOPBACK = "127.0.0.1"

PAGE_DEFAULT = 10  # NetBackup's default page[limit]
PAGE_MAX = 1000
MAX_BACKUP_ID = 255  # a client name is a host name (255 at most) and the id adds 11
MAX_BODY = 64 * 1024  # a PATCH body is a few hundred bytes; anything near this is not one
# A 10 kB backup id must reach our validator (a JSON 400), not die in the HTTP parser.
MAX_LINE = 32 * 1024
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST_NAME = _CLIENT_NAME
_SCHEDULES = {"full": "FULL", "incremental": "DIFFERENTIAL_INCREMENTAL"}


# --------------------------------------------------------------------------------------
# Errors: one HTTP status each; the CLI turns the same errors into exit codes
# --------------------------------------------------------------------------------------


class AdminError(Exception):
    """Something the administrator asked that cannot be done; `status` is the HTTP status."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(AdminError):
    status = 400


class Unauthorized(AdminError):
    status = 401


class NotFound(AdminError):
    status = 404


class Conflict(AdminError):
    status = 409


class PreconditionFailed(AdminError):
    status = 412


class UnsupportedMediaType(AdminError):
    status = 415


class Unavailable(AdminError):
    status = 503


def shorten(value: object, limit: int = 40) -> str:
    """A value for a one-line message: repr'd (so no raw newlines), cut when long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


# --------------------------------------------------------------------------------------
# Validation shared by the API and the commands
# --------------------------------------------------------------------------------------


def check_backup_id(value: object) -> str:
    """A backup id `<client>_<10-digit ctime>` (reference §11.2) whose client is a host name;
    raises BadRequest for anything else (`../x`, empty, 10 kB long, ...)."""
    if not isinstance(value, str):
        raise BadRequest(f"a backup id must be a string, not {type(value).__name__}")
    if not value:
        raise BadRequest("the backup id is empty (expected <client>_<10-digit ctime>)")
    if len(value) > MAX_BACKUP_ID:
        raise BadRequest(f"the backup id is {len(value)} characters long; at most {MAX_BACKUP_ID}")
    try:
        client, _ = parse_backup_id(value)
    except ValueError:
        raise BadRequest(f"not a backup id: {shorten(value)} (expected <client>_<10-digit ctime>)") from None
    if not _CLIENT_NAME.fullmatch(client):
        raise BadRequest(f"not a backup id: {shorten(value)} (the client part must be a host name)")
    return value


def check_host_name(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 255 or not _HOST_NAME.fullmatch(value):
        raise BadRequest(f"not a host name: {shorten(value)}")
    return value


def parse_dte_mode(value: object, what: str = "dteMode") -> DteMode:
    """"ON" / "OFF" (any case): an image's DTE mode (reference §7.2)."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be the string \"ON\" or \"OFF\", not {type(value).__name__}")
    try:
        return DteMode(value.lower())
    except ValueError:
        raise BadRequest(f"unknown {what} {shorten(value)}: expected \"ON\" or \"OFF\"") from None


def parse_enum(kind: type, value: object, what: str):
    """An enum by its NetBackup spelling (`PREFERRED_ON`, `WHERE_UNSUPPORTED`, ...), any case."""
    names = " | ".join(m.name for m in kind)
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string ({names}), not {type(value).__name__}")
    try:
        return kind[value.strip().upper()]
    except KeyError:
        raise BadRequest(f"unknown {what} {shorten(value)}: expected {names}") from None


def parse_version(value: object) -> Version:
    if not isinstance(value, str):
        raise BadRequest(f"version must be a string like \"10.5\", not {type(value).__name__}")
    try:
        return Version.parse(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def host_mode(role: Role, value: object, host: str) -> ClientMode | MediaMode:
    """DTE_CLIENT_MODE on a client (reference §4), the media server DTE mode on a media server (§5)."""
    if role is Role.CLIENT:
        return parse_enum(ClientMode, value, f"DTE_CLIENT_MODE for client {host}")
    if role is Role.MEDIA:
        return parse_enum(MediaMode, value, f"DTE mode for media server {host}")
    raise BadRequest(f"{host} is the primary server: it has no host DTE mode (set the global mode instead)")


@dataclass(frozen=True)
class IfMatch:
    """An `If-Match` header: `*`, or the revisions it names (weak or foreign tags name none)."""

    any: bool
    revisions: frozenset[int]

    @classmethod
    def parse(cls, header: str | None) -> "IfMatch | None":
        if header is None:
            return None
        if header.strip() == "*":
            return cls(True, frozenset())
        revisions = {parse_etag(tag) for tag in header.split(",")}
        return cls(False, frozenset(r for r in revisions if r is not None))


# --------------------------------------------------------------------------------------
# What the API shows: typed views over the catalog's records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageView:
    image: ImageRecord
    copies: tuple[CopyRecord, ...]


@dataclass(frozen=True)
class ImagePage:
    images: tuple[ImageView, ...]
    next_after: str | None  # the cursor for the next page, None on the last one


@dataclass(frozen=True)
class SecurityProperties:
    global_mode: GlobalMode
    ignore_image_mode: IgnoreImageMode


@dataclass(frozen=True)
class HostView:
    name: str
    role: Role
    version: str | None
    dte_mode: str | None  # None: the version's default
    online: bool | None  # None: unknown (no daemon behind a catalog-only server)


# --------------------------------------------------------------------------------------
# Backends: who carries out a change
# --------------------------------------------------------------------------------------


class AdminBackend:
    """Reads come straight from the catalog; changes go through `set_*`, which subclasses
    route to whoever owns the state (a live Primary, or the catalog file alone)."""

    name: str
    domain: str

    @property
    def catalog(self) -> Catalog:
        raise NotImplementedError

    # -- reads -------------------------------------------------------------------------

    def view(self, image: ImageRecord) -> ImageView:
        return ImageView(image, tuple(self.catalog.copies(image.backup_id)))

    def get_image(self, backup_id: str) -> ImageView:
        image = self.catalog.get_image(backup_id)
        if image is None:
            raise NotFound(f"no image {backup_id} in the catalog of {self.name}")
        return self.view(image)

    def list_images(self, client: str | None, dte_mode: DteMode | None, limit: int, after: str | None) -> ImagePage:
        try:
            found = self.catalog.list_images(client=client, dte_mode=dte_mode, limit=limit + 1, after=after)
        except UnknownImage:
            raise BadRequest(f"page[after] names no image in the catalog: {shorten(after)}") from None
        more = len(found) > limit
        images = tuple(self.view(i) for i in found[:limit])
        return ImagePage(images, images[-1].image.backup_id if more and images else None)

    def security(self) -> SecurityProperties:
        settings = self.catalog.get_settings(self.domain)
        return SecurityProperties(settings.global_mode, settings.ignore_image_mode)

    def jobs(self, limit: int, after: int | None) -> list[JobRecord]:
        return self.catalog.list_jobs(limit=limit, after=after)

    def job(self, job_id: int) -> JobRecord:
        job = self.catalog.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id} in the catalog of {self.name}")
        return job

    def audit(self, limit: int, after: int | None) -> list[AuditRecord]:
        return self.catalog.list_audit(limit=limit, after_id=after)

    def hosts(self) -> list[HostView]:
        raise NotImplementedError

    def host(self, name: str) -> HostView:
        for host in self.hosts():
            if host.name == name:
                return host
        raise NotFound(f"{name} is not a host of domain {self.domain}")

    # -- changes -----------------------------------------------------------------------

    async def set_image_dte_mode(self, backup_id: str, mode: DteMode, actor: str, precondition: IfMatch | None) -> ImageView:
        """`bpimage -update -image_dtemode` / PATCH (reference §7.2), compare-and-set on the revision.

        The image mode lives only in the catalog (the Primary re-reads the image when it
        decides each job, and its `cmd_set_image_dte_mode` is this same catalog call without
        a revision check), so both backends call the catalog: one IMMEDIATE transaction that
        checks the revision and writes, which an If-Match needs and the daemon command lacks.
        """
        catalog = self.catalog
        if_revision = None
        if precondition is not None:
            image = catalog.get_image(backup_id)
            if image is None:
                raise NotFound(f"no image {backup_id} in the catalog of {self.name}")
            if not precondition.any:
                if image.revision not in precondition.revisions:
                    raise PreconditionFailed(f"image {backup_id} is at ETag {image.etag}: it changed since it was read (If-Match)")
                if_revision = image.revision
        try:
            before, after = catalog.set_image_dte_mode(backup_id, mode, actor, if_revision=if_revision)
        except UnknownImage:
            raise NotFound(f"no image {backup_id} in the catalog of {self.name}") from None
        except RevisionMismatch as exc:
            raise PreconditionFailed(f"image {backup_id} is at ETag {format_etag(exc.actual)}: it changed since it was read (If-Match)") from None
        self.log.info("image dte mode set", backup_id=backup_id, before=before.value, after=after.value, actor=actor)
        return self.get_image(backup_id)

    async def set_security(self, global_mode: GlobalMode | None, ignore: IgnoreImageMode | None, actor: str) -> SecurityProperties:
        raise NotImplementedError

    async def set_host(self, name: str, dte_mode: object | None, version: object | None, actor: str) -> HostView:
        raise NotImplementedError

    def _check_host_change(self, host: HostView, dte_mode: object | None, version: object | None) -> tuple[str | None, str | None]:
        """Validate a host change completely before any of it is made: (mode, version) values."""
        if dte_mode is None and version is None:
            raise BadRequest("nothing to change: give dteMode and/or version")
        new_version = parse_version(version) if version is not None else None
        mode = host_mode(host.role, dte_mode, host.name) if dte_mode is not None else None
        effective = new_version or (Version.parse(host.version) if host.version else None)
        if isinstance(mode, MediaMode) and effective is not None and not effective.at_least(MEDIA_MODE_MIN_VERSION):
            raise BadRequest(f"media server {host.name} is version {effective}: the media server DTE mode exists from 10.0")
        if host.role is Role.PRIMARY and new_version is not None:
            raise BadRequest(f"{host.name} is the primary server: fabric does not upgrade it")
        return (mode.value if mode else None), (str(new_version) if new_version else None)

    @property
    def log(self):
        return log.bind(host=self.name, role=Role.PRIMARY.value)


class PrimaryBackend(AdminBackend):
    """The API inside a live Primary daemon: settings go through its commands, so its
    in-memory host registry (EMM) and the hosts themselves follow."""

    def __init__(self, primary: "Primary") -> None:
        self.primary = primary
        self.name = primary.name
        self.domain = primary.config.domain

    @property
    def catalog(self) -> Catalog:
        catalog = self.primary.catalog
        if catalog is None:  # a crashed or stopped primary has closed its catalog
            raise Unavailable(f"the primary {self.name} is down")
        return catalog

    def hosts(self) -> list[HostView]:
        # The registry holds the hosts that registered; the primary itself never does.
        me = HostView(self.name, Role.PRIMARY, str(self.primary.config.version), None, self.primary.running)
        return sorted([me, *(HostView(h.name, h.role, str(h.version), h.dte_mode.value if h.dte_mode else None, h.online)
                             for h in self.primary.hosts.values())], key=lambda h: h.name)

    async def set_security(self, global_mode: GlobalMode | None, ignore: IgnoreImageMode | None, actor: str) -> SecurityProperties:
        self.catalog  # noqa: B018 - refuse before changing anything when the primary is down
        await self.primary.cmd_set_domain({"actor": actor, "global_mode": global_mode.value if global_mode else None,
                                           "ignore_image_mode": ignore.value if ignore else None})
        return self.security()

    async def set_host(self, name: str, dte_mode: object | None, version: object | None, actor: str) -> HostView:
        from fabric.daemons.base import JobFailure  # the daemons' error type; only a live primary raises it

        host = self.host(name)
        mode, new_version = self._check_host_change(host, dte_mode, version)
        if not host.online:
            raise Unavailable(f"{name} is offline: the change cannot be pushed to it")
        try:
            await self.primary.cmd_set_host({"host": name, "actor": actor, "dte_mode": mode, "version": new_version})
        except JobFailure as failure:
            raise Unavailable(f"{name}: {failure.reason} (status {failure.status})") from None
        return self.host(name)


class CatalogBackend(AdminBackend):
    """`fabric serve` and offline commands: the API on a catalog file alone.

    No Primary daemon runs here (so no broker): with no media servers or clients to push a
    host setting to, a Primary would refuse it (the hosts never registered). Changes are
    recorded in the catalog, as EMM would keep them. `roles` names the domain's hosts.
    """

    def __init__(self, catalog: Catalog, name: str, domain: str, roles: dict[str, Role]) -> None:
        self._catalog = catalog
        self.name = name
        self.domain = domain
        self.roles = dict(roles)

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def hosts(self) -> list[HostView]:
        modes, versions = self.catalog.host_dte_modes(), self.catalog.host_versions()
        return [HostView(name, role, versions.get(name), modes.get(name), None) for name, role in sorted(self.roles.items())]

    async def set_security(self, global_mode: GlobalMode | None, ignore: IgnoreImageMode | None, actor: str) -> SecurityProperties:
        if global_mode is not None:
            self.catalog.set_global_mode(global_mode, actor, self.domain)
        if ignore is not None:
            self.catalog.set_ignore_image_mode(ignore, actor, self.domain)
        return self.security()

    async def set_host(self, name: str, dte_mode: object | None, version: object | None, actor: str) -> HostView:
        host = self.host(name)
        mode, new_version = self._check_host_change(host, dte_mode, version)
        if new_version is not None:
            self.catalog.set_host_version(name, new_version, actor)
        if mode is not None:
            self.catalog.set_host_dte_mode(name, mode, actor)
        return self.host(name)


# --------------------------------------------------------------------------------------
# JSON shapes (NetBackup REST style) and back
# --------------------------------------------------------------------------------------


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(text: str | None) -> float | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def dte_json(mode: DteMode) -> str:
    return mode.name  # "ON" | "OFF"


def copy_json(copy: CopyRecord) -> dict:
    return {"copyNumber": copy.copy_number, "mediaServer": copy.media_server, "path": copy.path,
            "copyDteMode": dte_json(copy.copy_dte_mode), "hierarchicalDteMode": dte_json(copy.hierarchical_dte_mode),
            "parentCopy": copy.parent_copy, "isPrimary": copy.primary, "copyTime": iso(copy.created)}


def image_json(view: ImageView) -> dict:
    """A JSON:API resource object for an image (reference §7.3: Catalog view columns)."""
    image = view.image
    return {
        "type": "image",
        "id": image.backup_id,
        "attributes": {
            "backupId": image.backup_id,
            "clientName": image.client,
            "policyType": image.policy_type,
            "scheduleType": _SCHEDULES.get(image.schedule_type, image.schedule_type.upper()),
            "backupTime": iso(image.backup_time),
            "expiration": iso(image.expiration),
            "kilobytes": image.kbytes,
            "bytes": image.bytes,
            "numberOfFiles": image.num_files,
            "jobId": image.job_id,
            "baseBackupId": image.base_backup_id,
            "originMasterServer": image.origin_domain,
            "imageDteMode": dte_json(image.image_dte_mode),
            "copyCount": len(view.copies),
            "copies": [copy_json(c) for c in view.copies],
        },
        "meta": {"etag": image.etag, "revision": image.revision},
    }


def image_from_json(resource: dict) -> ImageView:
    a = resource["attributes"]
    schedules = {v: k for k, v in _SCHEDULES.items()}
    image = ImageRecord(
        backup_id=a["backupId"], client=a["clientName"], policy_type=a["policyType"],
        schedule_type=schedules.get(a["scheduleType"], a["scheduleType"].lower()), backup_time=int(epoch(a["backupTime"])),
        image_dte_mode=DteMode(a["imageDteMode"].lower()), bytes=a["bytes"], num_files=a["numberOfFiles"], job_id=a["jobId"],
        base_backup_id=a["baseBackupId"], origin_domain=a["originMasterServer"],
        expiration=int(epoch(a["expiration"])) if a["expiration"] else None, revision=resource["meta"]["revision"],
    )
    copies = tuple(
        CopyRecord(image.backup_id, c["copyNumber"], c["mediaServer"], c["path"], DteMode(c["copyDteMode"].lower()),
                   DteMode(c["hierarchicalDteMode"].lower()), c["parentCopy"], int(epoch(c["copyTime"]) or 0), c["isPrimary"])
        for c in a["copies"]
    )
    return ImageView(image, copies)


def job_dte_json(mode: DteMode | None) -> str:
    """Reference §8.4 [I]: "On" / "Off", empty when not set (parent jobs)."""
    return mode.name.title() if mode else ""


def job_json(job: JobRecord) -> dict:
    """A job as `GET /admin/jobs` shows it (reference §8.4, GH-JOBSTRUCT names where they exist)."""
    return {
        "type": "job",
        "id": str(job.job_id),
        "attributes": {
            "jobId": job.job_id, "parentJobId": job.parent_job_id or 0, "jobType": job.job_type.upper(),
            "state": job.state.upper(), "status": job.status, "clientName": job.client,
            "mediaServerName": job.media_server, "destinationMediaServerName": job.target or job.media_server,
            "target": job.target, "backupId": job.backup_id, "copyNumber": job.copy_number,
            "dteMode": job_dte_json(job.dte_mode), "tlsVersion": job.tls_version, "tlsCipher": job.tls_cipher,
            "kilobytesTransferred": -(-job.bytes // 1024), "bytesTransferred": job.bytes, "numberOfFiles": job.files,
            "try": job.attempt, "startTime": iso(job.started), "endTime": iso(job.ended),
            "elapsedTime": round(job.ended - job.started, 3) if job.ended else None,
            "statusText": job.reason, "step": job.step,
        },
    }


def job_from_json(resource: dict) -> JobRecord:
    a = resource["attributes"]
    return JobRecord(
        job_id=a["jobId"], job_type=a["jobType"].lower(), state=a["state"].lower(), status=a["status"], client=a["clientName"],
        media_server=a["mediaServerName"], target=a["target"], backup_id=a["backupId"], copy_number=a["copyNumber"],
        dte_mode=DteMode(a["dteMode"].lower()) if a["dteMode"] else None, tls_version=a["tlsVersion"], tls_cipher=a["tlsCipher"],
        bytes=a["bytesTransferred"], files=a["numberOfFiles"], attempt=a["try"], parent_job_id=a["parentJobId"] or None,
        started=epoch(a["startTime"]) or 0.0, ended=epoch(a["endTime"]), reason=a["statusText"], step=a["step"],
    )


def audit_json(record: AuditRecord) -> dict:
    return {"type": "auditRecord", "id": str(record.audit_id),
            "attributes": {"auditId": record.audit_id, "time": record.when, "actor": record.actor, "what": record.what,
                           "before": record.before, "after": record.after}}


def audit_from_json(resource: dict) -> AuditRecord:
    a = resource["attributes"]
    return AuditRecord(a["auditId"], a["time"], a["actor"], a["what"], a["before"], a["after"])


def security_json(props: SecurityProperties) -> dict:
    """Reference §3.2: a flat object, not a JSON:API envelope."""
    return {"dteGlobalMode": props.global_mode.name, "dteIgnoreImageMode": props.ignore_image_mode.name}


def security_from_json(body: dict) -> SecurityProperties:
    return SecurityProperties(GlobalMode[body["dteGlobalMode"]], IgnoreImageMode[body["dteIgnoreImageMode"]])


def host_json(host: HostView) -> dict:
    return {"type": "host", "id": host.name,
            "attributes": {"name": host.name, "role": host.role.name, "version": host.version,
                           "dteMode": host.dte_mode.upper() if host.dte_mode else None, "online": host.online}}


def host_from_json(resource: dict) -> HostView:
    a = resource["attributes"]
    return HostView(a["name"], Role[a["role"]], a["version"], a["dteMode"].lower() if a["dteMode"] else None, a["online"])


# --------------------------------------------------------------------------------------
# Request plumbing
# --------------------------------------------------------------------------------------

BACKEND: web.AppKey[AdminBackend] = web.AppKey("backend", AdminBackend)


def _backend(request: web.Request) -> AdminBackend:
    return request.app[BACKEND]


def _media_type(request: web.Request) -> str:
    return NB_CONTENT_TYPE if NB_MEDIA_TYPE in request.headers.get("Accept", "") else "application/json"


def json_response(request: web.Request, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(payload).encode(), status=status,
                        headers={"Content-Type": _media_type(request), **(headers or {})})


def error_response(request: web.Request, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(request, {"errorCode": status, "errorMessage": message}, status, headers)


async def read_json(request: web.Request) -> Any:
    """The body as JSON, from one of the accepted media types (415 otherwise, 400 if not JSON)."""
    if request.content_type not in ACCEPTED_BODY_TYPES:
        raise UnsupportedMediaType(f"Content-Type must be {NB_CONTENT_TYPE} or application/json, not {shorten(request.content_type)}")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadRequest(f"the body is not JSON: {str(exc).splitlines()[0][:120]}") from None


def _int_param(request: web.Request, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdecimal() or len(text) > 12:
        raise BadRequest(f"{name} must be a whole number, not {shorten(text)}")
    value = int(text)
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{name} must be between {low} and {high}" if high else f"{name} must be at least {low}")
    return value


def _check_params(request: web.Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        hint = " (pages go by page[after], the last id of the previous page)" if "page[offset]" in unknown else ""
        raise BadRequest(f"unknown query parameter {shorten(unknown[0])}; allowed: {', '.join(sorted(allowed))}{hint}")


_FILTER_CLAUSE = re.compile(r"^\s*(\w+)\s+eq\s+'((?:[^']|'')*)'\s*$")


def parse_image_filter(text: str) -> tuple[str | None, DteMode | None]:
    """NetBackup's OData-style `filter`, the subset the Catalog view needs:
    `clientName eq 'web1' and imageDteMode eq 'ON'`."""
    client = mode = None
    for clause in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        match = _FILTER_CLAUSE.match(clause)
        if not match:
            raise BadRequest(f"filter clause {shorten(clause)} is not of the form <field> eq '<value>'")
        field, value = match[1], match[2].replace("''", "'")
        if field == "clientName":
            client = check_host_name(value)
        elif field in ("imageDteMode", "dteMode"):
            mode = parse_dte_mode(value, field)
        else:
            raise BadRequest(f"cannot filter on {shorten(field)}: only clientName and imageDteMode")
    return client, mode


def _actor(request: web.Request, what: str) -> str:
    """Who changed it, for the audit log: the API call, and the reason header when given."""
    reason = request.headers.get(AUDIT_REASON_HEADER, "")
    reason = "".join(c for c in reason if c.isprintable())[:200].strip()
    return f"REST {what}" + (f" ({reason})" if reason else "")


def _page_links(request: web.Request, next_after: str | int | None) -> dict:
    links: dict[str, str | None] = {"self": str(request.rel_url), "next": None}
    if next_after is not None:
        query = {k: v for k, v in request.query.items() if k != "page[after]"}
        query["page[after]"] = str(next_after)
        links["next"] = f"{request.path}?{urlencode(query)}"
    return links


# --------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------


async def list_images(request: web.Request) -> web.Response:
    _check_params(request, {"page[limit]", "page[after]", "filter", "clientName", "dteMode"})
    limit = _int_param(request, "page[limit]", PAGE_DEFAULT, 1, PAGE_MAX)
    after = request.query.get("page[after]")
    if after is not None:
        check_backup_id(after)
    client, mode = parse_image_filter(request.query["filter"]) if "filter" in request.query else (None, None)
    if "clientName" in request.query:
        client = check_host_name(request.query["clientName"])
    if "dteMode" in request.query:
        mode = parse_dte_mode(request.query["dteMode"])
    page = _backend(request).list_images(client, mode, limit, after)
    return json_response(request, {
        "data": [image_json(v) for v in page.images],
        "meta": {"pagination": {"limit": limit, "count": len(page.images), "after": after, "next": page.next_after}},
        "links": _page_links(request, page.next_after),
    })


async def get_image(request: web.Request) -> web.Response:
    _check_params(request, set())
    view = _backend(request).get_image(check_backup_id(request.match_info["backupId"]))
    return json_response(request, {"data": image_json(view)}, headers={"ETag": view.image.etag})


def patch_mode(body: Any, backup_id: str) -> DteMode:
    """The PATCH body: `{"data": {"type": "image", "id": <backupId>, "attributes": {"dteMode": "ON"|"OFF"}}}`.

    [I] Reference §7.2 found no documented body; this JSON:API shape and the `dteMode`
    name are inferred (the jobs API's `dteMode`). `imageDteMode`, the name GET shows, is
    accepted too so a client can send back what it read.
    """
    shape = 'the body must be {"data": {"type": "image", "id": "<backupId>", "attributes": {"dteMode": "ON" | "OFF"}}}'
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict) or set(body) != {"data"}:
        raise BadRequest(shape)
    data = body["data"]
    extra = set(data) - {"type", "id", "attributes"}
    if extra or not isinstance(data.get("attributes"), dict):
        raise BadRequest(shape)
    if data.get("type") != "image":
        if not isinstance(data.get("type"), str):
            raise BadRequest(shape)
        raise Conflict(f"data.type is {shorten(data['type'])}: this endpoint changes an image")
    if "id" in data:
        if not isinstance(data["id"], str):
            raise BadRequest(f"data.id must be a string, not {type(data['id']).__name__}")
        if data["id"] != backup_id:  # JSON:API: a mismatched id is a conflict
            raise Conflict(f"data.id {shorten(data['id'])} does not match the image in the URL, {backup_id}")
    attributes = data["attributes"]
    named = [k for k in ("dteMode", "imageDteMode") if k in attributes]
    others = sorted(set(attributes) - {"dteMode", "imageDteMode"})
    if others:
        raise BadRequest(f"attribute {shorten(others[0])} cannot be changed: only dteMode")
    if not named:
        raise BadRequest(shape)
    modes = {parse_dte_mode(attributes[k], k) for k in named}
    if len(modes) > 1:
        raise BadRequest("dteMode and imageDteMode disagree")
    return modes.pop()


async def patch_image(request: web.Request) -> web.Response:
    _check_params(request, set())
    backup_id = check_backup_id(request.match_info["backupId"])
    precondition = IfMatch.parse(request.headers.get("If-Match"))
    mode = patch_mode(await read_json(request), backup_id)
    # PATCH without If-Match is allowed, as NetBackup allows it; with one, the change is
    # made only if the image is still at the revision the client read (412 otherwise).
    view = await _backend(request).set_image_dte_mode(backup_id, mode, _actor(request, f"PATCH /catalog/images/{backup_id}"),
                                                      precondition)
    return json_response(request, {"data": image_json(view)}, headers={"ETag": view.image.etag})


async def get_security(request: web.Request) -> web.Response:
    _check_params(request, set())
    return json_response(request, security_json(_backend(request).security()))


async def post_security(request: web.Request) -> web.Response:
    _check_params(request, set())
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object like {"dteGlobalMode": "PREFERRED_ON"}')
    unknown = sorted(set(body) - {"dteGlobalMode", "dteIgnoreImageMode"})
    if unknown:
        raise BadRequest(f"unknown security property {shorten(unknown[0])}: fabric simulates dteGlobalMode and dteIgnoreImageMode")
    if not body:
        raise BadRequest("nothing to set: give dteGlobalMode and/or dteIgnoreImageMode")
    # Both values are checked before either is written: a bad one changes nothing.
    global_mode = parse_enum(GlobalMode, body["dteGlobalMode"], "dteGlobalMode") if "dteGlobalMode" in body else None
    ignore = parse_enum(IgnoreImageMode, body["dteIgnoreImageMode"], "dteIgnoreImageMode") if "dteIgnoreImageMode" in body else None
    props = await _backend(request).set_security(global_mode, ignore, _actor(request, "POST /security/properties"))
    return json_response(request, security_json(props))


async def list_jobs(request: web.Request) -> web.Response:
    _check_params(request, {"page[limit]", "page[after]"})
    limit = _int_param(request, "page[limit]", PAGE_DEFAULT, 1, PAGE_MAX)
    after = _int_param(request, "page[after]", None, 1)
    jobs = _backend(request).jobs(limit + 1, after)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    next_after = jobs[-1].job_id if more and jobs else None
    return json_response(request, {
        "data": [job_json(j) for j in jobs],
        "meta": {"pagination": {"limit": limit, "count": len(jobs), "after": after, "next": next_after}},
        "links": _page_links(request, next_after),
    })


async def get_job(request: web.Request) -> web.Response:
    _check_params(request, set())
    text = request.match_info["jobId"]
    if not text.isdecimal() or len(text) > 12:
        raise BadRequest(f"not a job id: {shorten(text)}")
    return json_response(request, {"data": job_json(_backend(request).job(int(text)))})


async def list_audit(request: web.Request) -> web.Response:
    _check_params(request, {"page[limit]", "page[after]"})
    limit = _int_param(request, "page[limit]", 100, 1, PAGE_MAX)
    after = _int_param(request, "page[after]", None, 0)
    records = _backend(request).audit(limit + 1, after)
    more = len(records) > limit
    records = records[:limit]
    next_after = records[-1].audit_id if more and records else None
    return json_response(request, {
        "data": [audit_json(r) for r in records],
        "meta": {"pagination": {"limit": limit, "count": len(records), "after": after, "next": next_after}},
        "links": _page_links(request, next_after),
    })


async def list_hosts(request: web.Request) -> web.Response:
    _check_params(request, set())
    return json_response(request, {"data": [host_json(h) for h in _backend(request).hosts()]})


async def get_host(request: web.Request) -> web.Response:
    _check_params(request, set())
    name = check_host_name(request.match_info["name"])
    return json_response(request, {"data": host_json(_backend(request).host(name))})


async def post_host(request: web.Request) -> web.Response:
    """A host's DTE mode (DTE_CLIENT_MODE on a client, the media server DTE mode on a
    media server) and/or its version: `bpsetconfig -h`, `nbseccmd -dtemediamode`."""
    _check_params(request, set())
    name = check_host_name(request.match_info["name"])
    body = await read_json(request)
    if not isinstance(body, dict) or not body or set(body) - {"dteMode", "version"}:
        raise BadRequest('the body must be a JSON object like {"dteMode": "ON"} and/or {"version": "10.5"}')
    host = await _backend(request).set_host(name, body.get("dteMode"), body.get("version"),
                                           _actor(request, f"POST /config/hosts/{name}"))
    return json_response(request, {"data": host_json(host)})


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# --------------------------------------------------------------------------------------
# Middlewares and the application
# --------------------------------------------------------------------------------------

_PASSED_HEADERS = ("Allow", "WWW-Authenticate")


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error as NetBackup's JSON `{"errorCode", "errorMessage"}`; never a traceback."""
    try:
        return await handler(request)
    except AdminError as exc:
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="netbackup"' + (', error="invalid_token"' if "Authorization" in request.headers else "")
        return error_response(request, exc.status, exc.message, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: exc.headers[k] for k in _PASSED_HEADERS if k in exc.headers}
        message = f"the body is larger than {MAX_BODY // 1024} KiB" if exc.status == 413 else exc.reason
        return error_response(request, exc.status, message, headers)
    except Exception:
        log.exception("api.internal_error", method=request.method, path=request.path)
        return error_response(request, 500, "internal error (see the primary's log)")


def _auth(token: str) -> Callable:
    expected = token.encode()
    public = {("GET", f"{API_BASE}/openapi.json")}  # the description holds no data

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if (request.method, request.path) not in public:
            header = request.headers.get("Authorization")
            if header is None:
                raise Unauthorized("no token: send Authorization: Bearer <token> (the token is in the state folder's api-token)")
            scheme, _, credentials = header.strip().partition(" ")
            # NetBackup sends the bare JWT in Authorization; accept that and "Bearer <token>".
            presented = credentials.strip() if scheme.lower() == "bearer" else header.strip()
            if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected):
                raise Unauthorized("wrong token")
        return await handler(request)

    return auth


def make_app(backend: AdminBackend, token: str) -> web.Application:
    """The API application for one primary; `token` is the bearer token every call needs."""
    if not token:
        raise ValueError("the API needs a token")
    app = web.Application(middlewares=[_errors, _auth(token)], client_max_size=MAX_BODY)
    app[BACKEND] = backend
    # {backupId:[^/]*} also matches the empty id, so it gets a 400 that says so, not a 404.
    app.router.add_routes([
        web.get(f"{API_BASE}/catalog/images", list_images),
        web.get(API_BASE + "/catalog/images/{backupId:[^/]*}", get_image),
        web.patch(API_BASE + "/catalog/images/{backupId:[^/]*}", patch_image),
        web.get(f"{API_BASE}/security/properties", get_security),
        web.post(f"{API_BASE}/security/properties", post_security),
        web.get(f"{API_BASE}/security/auditlogs", list_audit),
        web.get(f"{API_BASE}/admin/jobs", list_jobs),
        web.get(API_BASE + "/admin/jobs/{jobId}", get_job),
        web.get(f"{API_BASE}/config/hosts", list_hosts),
        web.get(API_BASE + "/config/hosts/{name}", get_host),
        web.post(API_BASE + "/config/hosts/{name}", post_host),
        web.get(f"{API_BASE}/openapi.json", get_openapi),
    ])
    return app


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------


def write_token(state_dir: Path) -> str:
    """A fresh random token in `<state>/api-token`, readable by its owner only."""
    token = secrets.token_urlsafe(32)
    path = Path(state_dir) / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that was already there
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token


def read_token(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8").strip()


class ApiServer:
    """One primary's API on a loopback TCP port (0: a free one), in the running event loop."""

    def __init__(self, backend: AdminBackend, token: str, host: str = LOOPBACK, port: int = 0,
                 url_file: Path | None = None) -> None:
        self.backend = backend
        self.token = token
        self.host = host
        self.port = port
        self.url_file = url_file
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{API_BASE}"

    async def start(self) -> str:
        runner = web.AppRunner(make_app(self.backend, self.token), access_log=None,
                               max_line_size=MAX_LINE, max_field_size=MAX_LINE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        if self.url_file is not None:
            self.url_file.write_text(self.url + "\n", encoding="utf-8")
        log.info("api.started", host=self.backend.name, role=Role.PRIMARY.value, url=self.url)
        return self.url

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        if self.url_file is not None:
            try:
                if self.url_file.read_text(encoding="utf-8").strip() == self.url:
                    self.url_file.unlink()
            except OSError:
                pass
        log.info("api.stopped", host=self.backend.name, role=Role.PRIMARY.value)

    async def __aenter__(self) -> "ApiServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_primaries(primaries: list["Primary"], state_dir: Path, host: str = LOOPBACK) -> list[ApiServer]:
    """`fabric run --serve`: one API per live primary, one token for all of them."""
    token = write_token(state_dir)
    servers = []
    try:
        for primary in primaries:
            server = ApiServer(PrimaryBackend(primary), token, host, url_file=primary.config.state_dir / URL_FILE)
            await server.start()
            servers.append(server)
    except BaseException:
        for server in servers:
            await server.stop()
        raise
    return servers


# --------------------------------------------------------------------------------------
# OpenAPI
# --------------------------------------------------------------------------------------


def openapi_document() -> dict:
    """What this API accepts and answers, for people and for fuzzers (OpenAPI 3.0)."""
    error = {"$ref": "#/components/responses/Error"}
    errors = {"400": error, "401": error, "404": error}
    dte = {"type": "string", "enum": ["ON", "OFF"]}
    page = [
        {"name": "page[limit]", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_MAX}},
    ]
    backup_id = {"name": "backupId", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*_\d{10}$", "maxLength": MAX_BACKUP_ID}}
    body_types = {t: {"schema": {"$ref": "#/components/schemas/ImagePatch"}} for t in (NB_CONTENT_TYPE, "application/json")}
    return {
        "openapi": "3.0.3",
        "info": {"title": "fabric primary server API (NetBackup style)", "version": "3.0",
                 "description": "Catalog images and their DTE mode, DTE security properties, jobs, hosts and the audit log."},
        "servers": [{"url": API_BASE}],
        "security": [{"bearer": []}],
        "paths": {
            "/catalog/images": {"get": {
                "summary": "List images, newest first (keyset pages)",
                "parameters": [*page,
                               {"name": "page[after]", "in": "query", "schema": {"type": "string"},
                                "description": "the backupId of the last image of the previous page"},
                               {"name": "filter", "in": "query", "schema": {"type": "string"},
                                "description": "clientName eq 'web1' and imageDteMode eq 'ON'"},
                               {"name": "clientName", "in": "query", "schema": {"type": "string"}},
                               {"name": "dteMode", "in": "query", "schema": dte}],
                "responses": {"200": {"description": "a page of images",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImageList"}}}},
                              **errors}}},
            "/catalog/images/{backupId}": {
                "get": {"summary": "One image, with an ETag", "parameters": [backup_id],
                        "responses": {"200": {"description": "the image", "headers": {"ETag": {"schema": {"type": "string"}}},
                                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImageDocument"}}}},
                                      **errors}},
                "patch": {"summary": "Set the image DTE mode (bpimage -update -image_dtemode)",
                          "description": "Governs only operations that start afterwards. If-Match is optional; "
                                         "when given and the image changed since, 412.",
                          "parameters": [backup_id, {"name": "If-Match", "in": "header", "schema": {"type": "string"}},
                                         {"name": AUDIT_REASON_HEADER, "in": "header", "schema": {"type": "string"}}],
                          "requestBody": {"required": True, "content": body_types},
                          "responses": {"200": {"description": "the updated image",
                                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImageDocument"}}}},
                                        **errors, "409": error, "412": error, "415": error}},
            },
            "/security/properties": {
                "get": {"summary": "DTE global mode and DTE_IGNORE_IMAGE_MODE",
                        "responses": {"200": {"description": "the properties", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/SecurityProperties"}}}}, "401": error}},
                "post": {"summary": "Change them (nbseccmd -setsecurityconfig -dteglobalmode)",
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/SecurityProperties"}}}},
                         "responses": {"200": {"description": "the properties now"}, "400": error, "401": error, "415": error}},
            },
            "/security/auditlogs": {"get": {
                "summary": "Every change of a DTE setting or an image mode, oldest first",
                "parameters": [*page, {"name": "page[after]", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
                "responses": {"200": {"description": "audit records"}, "400": error, "401": error}}},
            "/admin/jobs": {"get": {
                "summary": "Jobs, newest first, with dteMode (On / Off / empty for parent jobs)",
                "parameters": [*page, {"name": "page[after]", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                "responses": {"200": {"description": "jobs"}, "400": error, "401": error}}},
            "/admin/jobs/{jobId}": {"get": {
                "summary": "One job", "parameters": [{"name": "jobId", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "the job"}, **errors}}},
            "/config/hosts": {"get": {"summary": "The domain's hosts and their DTE settings",
                                      "responses": {"200": {"description": "hosts"}, "401": error}}},
            "/config/hosts/{name}": {
                "get": {"summary": "One host", "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                        "responses": {"200": {"description": "the host"}, **errors}},
                "post": {"summary": "Set DTE_CLIENT_MODE (client) or the media server DTE mode, and/or the version",
                         "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "additionalProperties": False,
                             "properties": {"dteMode": {"type": "string", "enum": ["AUTOMATIC", "ON", "OFF"]},
                                            "version": {"type": "string"}}}}}},
                         "responses": {"200": {"description": "the host now"}, **errors, "415": error, "503": error}},
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the token in <state>/api-token (also accepted without 'Bearer ')"}},
            "responses": {"Error": {"description": "an error", "content": {"application/json": {"schema": {
                "type": "object", "required": ["errorCode", "errorMessage"],
                "properties": {"errorCode": {"type": "integer"}, "errorMessage": {"type": "string"}}}}}}},
            "schemas": {
                "Copy": {"type": "object", "properties": {
                    "copyNumber": {"type": "integer"}, "mediaServer": {"type": "string"}, "path": {"type": "string"},
                    "copyDteMode": dte, "hierarchicalDteMode": dte, "parentCopy": {"type": "integer", "nullable": True},
                    "isPrimary": {"type": "boolean"}, "copyTime": {"type": "string", "format": "date-time"}}},
                "Image": {"type": "object", "properties": {
                    "type": {"type": "string", "enum": ["image"]}, "id": {"type": "string"},
                    "attributes": {"type": "object", "properties": {
                        "backupId": {"type": "string"}, "clientName": {"type": "string"}, "policyType": {"type": "string"},
                        "scheduleType": {"type": "string"}, "backupTime": {"type": "string", "format": "date-time"},
                        "kilobytes": {"type": "integer"}, "numberOfFiles": {"type": "integer"}, "imageDteMode": dte,
                        "copies": {"type": "array", "items": {"$ref": "#/components/schemas/Copy"}}}},
                    "meta": {"type": "object", "properties": {"etag": {"type": "string"}, "revision": {"type": "integer"}}}}},
                "ImageDocument": {"type": "object", "properties": {"data": {"$ref": "#/components/schemas/Image"}}},
                "ImageList": {"type": "object", "properties": {
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
                    "meta": {"type": "object"}, "links": {"type": "object"}}},
                "ImagePatch": {"type": "object", "required": ["data"], "additionalProperties": False, "properties": {
                    "data": {"type": "object", "required": ["type", "attributes"], "additionalProperties": False, "properties": {
                        "type": {"type": "string", "enum": ["image"]}, "id": {"type": "string"},
                        "attributes": {"type": "object", "additionalProperties": False,
                                       "properties": {"dteMode": dte}, "required": ["dteMode"]}}}}},
                "SecurityProperties": {"type": "object", "additionalProperties": False, "properties": {
                    "dteGlobalMode": {"type": "string", "enum": [m.name for m in GlobalMode]},
                    "dteIgnoreImageMode": {"type": "string", "enum": [m.name for m in IgnoreImageMode]}}},
            },
        },
    }
