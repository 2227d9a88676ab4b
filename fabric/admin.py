"""NetBackup's administration commands on fabric: bpimage, bpimagelist, bpdbjobs, nbseccmd, bp/nbsetconfig, audit, serve.

Each works on a state folder a run left (`--state DIR`; through its primary's API while one serves it) or on a running primary (`--primary URL`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import quote, urlencode, urlsplit

if TYPE_CHECKING:  # fabric.api pulls in aiohttp; load it only when a command runs
    from fabric.api import AdminBackend, HostView, ImageView, SecurityProperties
    from fabric.catalog import AuditRecord, JobRecord
    from fabric.daemons.base import Daemon
    from fabric.dte import DteMode, GlobalMode, IgnoreImageMode

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# NetBackup's status 227, "no entity was found": what bpimage and bpimagelist exit with
# when no image matches.
EXIT_NOT_FOUND = 227
TOKEN_ENV = "FABRIC_API_TOKEN"
STATE_ENV = "FABRIC_STATE"
CONNECT_PROBE_S = 1.0
HTTP_TIMEOUT_S = 60.0
REST_PAGE = 1000

# nbseccmd -dteglobalmode numbers (reference §3.2): 0 Preferred Off, 1 Preferred On, 2 Enforced.
GLOBAL_MODE_NUMBERS = {"0": "PREFERRED_OFF", "1": "PREFERRED_ON", "2": "ENFORCED"}


class CommandError(Exception):
    """A user error in a command: one line on stderr, and this exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _exit_code(http_status: int) -> int:
    if http_status == 404:
        return EXIT_NOT_FOUND
    if http_status in (400, 415):
        return EXIT_USAGE
    return EXIT_ERROR


# --------------------------------------------------------------------------------------
# Where the catalog is: a state folder's layout
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatePrimary:
    """A primary server a run left in a state folder: its catalog and its domain."""

    state_dir: Path
    name: str
    domain: str

    @property
    def folder(self) -> Path:
        return self.state_dir / "hosts" / self.name

    @property
    def catalog_path(self) -> Path:
        return self.folder / "catalog.sqlite"

    @property
    def url_file(self) -> Path:
        from fabric.api import URL_FILE

        return self.folder / URL_FILE

    @property
    def token_file(self) -> Path:
        from fabric.api import TOKEN_FILE

        return self.state_dir / TOKEN_FILE


def find_primaries(state_dir: Path) -> list[StatePrimary]:
    """Every `hosts/<name>/catalog.sqlite` is a primary; its domain is the pki folder that
    holds its certificate (`pki/<domain>/hosts/<name>.pem`)."""
    from fabric.catalog import DEFAULT_DOMAIN

    if not state_dir.is_dir():
        raise CommandError(f"no state folder {state_dir}", EXIT_USAGE)
    primaries = []
    for catalog in sorted((state_dir / "hosts").glob("*/catalog.sqlite")):
        name = catalog.parent.name
        domains = [d.parent.parent.name for d in (state_dir / "pki").glob(f"*/hosts/{name}.pem")]
        primaries.append(StatePrimary(state_dir, name, domains[0] if domains else DEFAULT_DOMAIN))
    if not primaries:
        raise CommandError(f"{state_dir} holds no catalog (hosts/<primary>/catalog.sqlite): is it a state folder a run left?", EXIT_USAGE)
    return primaries


def choose_primary(state_dir: Path, primary_host: str | None, domain: str | None) -> StatePrimary:
    primaries = find_primaries(state_dir)
    chosen = [p for p in primaries if (primary_host is None or p.name == primary_host) and (domain is None or p.domain == domain)]
    listed = ", ".join(f"{p.name} (domain {p.domain})" for p in primaries)
    if not chosen:
        raise CommandError(f"no such primary in {state_dir}; it has {listed}", EXIT_USAGE)
    if len(chosen) > 1:
        raise CommandError(f"{state_dir} has several primaries, {listed}: choose one with --primary-host or --domain", EXIT_USAGE)
    return chosen[0]


def host_roles(primary: StatePrimary) -> dict:
    """The domain's hosts by name, with their role, from what the run left on disk.

    Every host got a certificate in `pki/<domain>/hosts/`; a media server keeps its disk
    storage unit in `hosts/<name>/storage`, the primary its catalog; the others are clients.
    """
    from fabric.dte import Role

    names = {p.stem for p in (primary.state_dir / "pki" / primary.domain / "hosts").glob("*.pem")} or \
        {p.name for p in (primary.state_dir / "hosts").iterdir() if p.is_dir()}
    roles = {}
    for name in names:
        folder = primary.state_dir / "hosts" / name
        if (folder / "catalog.sqlite").exists():
            roles[name] = Role.PRIMARY
        elif (folder / "storage").is_dir():
            roles[name] = Role.MEDIA
        else:
            roles[name] = Role.CLIENT
    return roles


def _answers(url: str) -> bool:
    """Whether something listens where a URL file points (a killed server leaves one behind)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=CONNECT_PROBE_S):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# Targets: the same operations on a catalog file or through a primary's REST API
# --------------------------------------------------------------------------------------


class Target:
    """What the commands ask for, whoever answers; errors arrive as fabric.api.AdminError."""

    name: str

    def images(self, client: str | None = None) -> Iterator["ImageView"]:
        raise NotImplementedError

    def image(self, backup_id: str) -> "ImageView":
        raise NotImplementedError

    def set_image_dte_mode(self, backup_id: str, mode: "DteMode", actor: str) -> "ImageView":
        raise NotImplementedError

    def security(self) -> "SecurityProperties":
        raise NotImplementedError

    def set_security(self, global_mode: "GlobalMode | None", ignore: "IgnoreImageMode | None", actor: str) -> "SecurityProperties":
        raise NotImplementedError

    def jobs(self) -> Iterator["JobRecord"]:
        raise NotImplementedError

    def job(self, job_id: int) -> "JobRecord":
        raise NotImplementedError

    def host(self, name: str) -> "HostView":
        raise NotImplementedError

    def set_host(self, name: str, dte_mode: str | None, version: str | None, actor: str) -> "HostView":
        raise NotImplementedError

    def audit(self) -> Iterator["AuditRecord"]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalTarget(Target):
    """The catalog file itself, when no primary serves it."""

    def __init__(self, backend: "AdminBackend") -> None:
        self.backend = backend
        self.name = backend.name

    def images(self, client: str | None = None) -> Iterator["ImageView"]:
        after = None
        while True:
            page = self.backend.list_images(client, None, REST_PAGE, after)
            yield from page.images
            if page.next_after is None:
                return
            after = page.next_after

    def image(self, backup_id: str) -> "ImageView":
        return self.backend.get_image(backup_id)

    def set_image_dte_mode(self, backup_id: str, mode: "DteMode", actor: str) -> "ImageView":
        return asyncio.run(self.backend.set_image_dte_mode(backup_id, mode, actor, None))

    def security(self) -> "SecurityProperties":
        return self.backend.security()

    def set_security(self, global_mode, ignore, actor: str) -> "SecurityProperties":
        return asyncio.run(self.backend.set_security(global_mode, ignore, actor))

    def jobs(self) -> Iterator["JobRecord"]:
        after = None
        while True:
            jobs = self.backend.jobs(REST_PAGE, after)
            yield from jobs
            if len(jobs) < REST_PAGE:
                return
            after = jobs[-1].job_id

    def job(self, job_id: int) -> "JobRecord":
        return self.backend.job(job_id)

    def host(self, name: str) -> "HostView":
        return self.backend.host(name)

    def set_host(self, name: str, dte_mode: str | None, version: str | None, actor: str) -> "HostView":
        return asyncio.run(self.backend.set_host(name, dte_mode, version, actor))

    def audit(self) -> Iterator["AuditRecord"]:
        after = 0
        while True:
            records = self.backend.audit(REST_PAGE, after)
            yield from records
            if len(records) < REST_PAGE:
                return
            after = records[-1].audit_id

    def close(self) -> None:
        self.backend.catalog.close()


class RestTarget(Target):
    """A running primary's REST API (`--primary URL`, or the one serving `--state DIR`)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.name = self.url
        self.token = token
        # Never through a proxy: the API listens on loopback, and an http_proxy set for the
        # internet must not see the token.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, body: Any = None, actor: str | None = None) -> Any:
        from fabric.api import AUDIT_REASON_HEADER, NB_CONTENT_TYPE, AdminError, Unavailable

        headers = {"Authorization": f"Bearer {self.token}", "Accept": NB_CONTENT_TYPE}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = NB_CONTENT_TYPE
        if actor:
            headers[AUDIT_REASON_HEADER] = "".join(c for c in actor if " " <= c <= "~")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw)["errorMessage"]
            except (ValueError, KeyError, TypeError):
                message = f"{exc.code} {exc.reason}"
            raise AdminError(f"{message} (HTTP {exc.code})", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unavailable(f"cannot reach the primary at {self.url}: {reason}") from None
        except ValueError:
            raise Unavailable(f"{self.url} did not answer JSON: is it a fabric primary's API?") from None

    def _pages(self, path: str, params: dict[str, str]) -> Iterator[dict]:
        params = {**params, "page[limit]": str(REST_PAGE)}
        while True:
            body = self.call("GET", f"{path}?{urlencode(params)}")
            yield from body["data"]
            following = body["meta"]["pagination"]["next"]
            if following is None:
                return
            params["page[after]"] = str(following)

    def images(self, client: str | None = None) -> Iterator["ImageView"]:
        from fabric.api import image_from_json

        params = {"clientName": client} if client else {}
        return (image_from_json(r) for r in self._pages("/catalog/images", params))

    def image(self, backup_id: str) -> "ImageView":
        from fabric.api import image_from_json

        return image_from_json(self.call("GET", f"/catalog/images/{quote(backup_id, safe='')}")["data"])

    def set_image_dte_mode(self, backup_id: str, mode: "DteMode", actor: str) -> "ImageView":
        from fabric.api import image_from_json

        body = {"data": {"type": "image", "id": backup_id, "attributes": {"dteMode": mode.name}}}
        return image_from_json(self.call("PATCH", f"/catalog/images/{quote(backup_id, safe='')}", body, actor)["data"])

    def security(self) -> "SecurityProperties":
        from fabric.api import security_from_json

        return security_from_json(self.call("GET", "/security/properties"))

    def set_security(self, global_mode, ignore, actor: str) -> "SecurityProperties":
        from fabric.api import security_from_json

        body = {}
        if global_mode is not None:
            body["dteGlobalMode"] = global_mode.name
        if ignore is not None:
            body["dteIgnoreImageMode"] = ignore.name
        return security_from_json(self.call("POST", "/security/properties", body, actor))

    def jobs(self) -> Iterator["JobRecord"]:
        from fabric.api import job_from_json

        return (job_from_json(r) for r in self._pages("/admin/jobs", {}))

    def job(self, job_id: int) -> "JobRecord":
        from fabric.api import job_from_json

        return job_from_json(self.call("GET", f"/admin/jobs/{job_id}")["data"])

    def host(self, name: str) -> "HostView":
        from fabric.api import host_from_json

        return host_from_json(self.call("GET", f"/config/hosts/{quote(name, safe='')}")["data"])

    def set_host(self, name: str, dte_mode: str | None, version: str | None, actor: str) -> "HostView":
        from fabric.api import host_from_json

        body = {k: v for k, v in (("dteMode", dte_mode), ("version", version)) if v is not None}
        return host_from_json(self.call("POST", f"/config/hosts/{quote(name, safe='')}", body, actor)["data"])

    def audit(self) -> Iterator["AuditRecord"]:
        from fabric.api import audit_from_json

        return (audit_from_json(r) for r in self._pages("/security/auditlogs", {}))


def api_url(text: str) -> str:
    """`http://127.0.0.1:PORT/netbackup` as printed by `fabric serve`; the base path may be left off."""
    from fabric.api import API_BASE

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(f"--primary {text!r} is not a URL like http://127.0.0.1:8443{API_BASE}", EXIT_USAGE)
    try:
        parts.port
    except ValueError:
        raise CommandError(f"--primary {text!r} has an invalid port", EXIT_USAGE) from None
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or API_BASE}"


def _token(args: argparse.Namespace, state_token: Path | None) -> str:
    from fabric.api import read_token

    candidates = [Path(args.token_file)] if args.token_file else []
    if not candidates and os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if not candidates and state_token is not None:
        candidates = [state_token]
    if not candidates:
        raise CommandError(f"no API token: give --token-file FILE (the server wrote <state>/api-token), --state DIR, or set {TOKEN_ENV}",
                           EXIT_USAGE)
    try:
        return read_token(candidates[0])
    except OSError as exc:
        raise CommandError(f"cannot read the API token {candidates[0]}: {exc.strerror or exc}", EXIT_USAGE) from None


def open_target(args: argparse.Namespace) -> Target:
    """`--primary URL`: its API. `--state DIR`: the API serving that folder if one runs (so
    a live primary's registry follows the change), otherwise the catalog file."""
    from fabric.api import CatalogBackend
    from fabric.catalog import Catalog, CatalogError

    state = Path(args.state).expanduser() if args.state else (Path(os.environ[STATE_ENV]) if os.environ.get(STATE_ENV) else None)
    if args.primary:
        primary = choose_primary(state, args.primary_host, args.domain) if state and (args.primary_host or args.domain) else None
        token_file = primary.token_file if primary else (state / "api-token" if state else None)
        return RestTarget(api_url(args.primary), _token(args, token_file))
    if state is None:
        raise CommandError("give --state DIR (the state folder a run left) or --primary URL (a running primary's API)", EXIT_USAGE)
    primary = choose_primary(state, args.primary_host, args.domain)
    if primary.url_file.exists():
        url = primary.url_file.read_text(encoding="utf-8").strip()
        if url and _answers(url):
            return RestTarget(url, _token(args, primary.token_file))
    try:
        catalog = Catalog.open(primary.catalog_path)
    except (CatalogError, OSError, sqlite3.Error) as exc:  # sqlite3.DatabaseError: a file that is not a catalog
        raise CommandError(f"cannot open the catalog {primary.catalog_path}: {exc}") from None
    return LocalTarget(CatalogBackend(catalog, primary.name, primary.domain, host_roles(primary)))


# --------------------------------------------------------------------------------------
# Parsing: NetBackup's single-dash flags, one-line errors
# --------------------------------------------------------------------------------------


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse errors in this subcommand one line (no usage block), and refuse
    unknown arguments here rather than in the top-level parser, which prints the usage."""

    def error(message: str) -> None:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, []

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser


def _target_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where")
    where.add_argument("--state", metavar="DIR", help=f"the state folder a run left (or ${STATE_ENV})")
    where.add_argument("--primary", metavar="URL", help="a running primary's API, e.g. http://127.0.0.1:PORT/netbackup")
    where.add_argument("--token-file", metavar="FILE", help=f"the API token (default <state>/api-token, or ${TOKEN_ENV})")
    where.add_argument("--primary-host", metavar="NAME", help="which primary, when the state folder has several")
    where.add_argument("--domain", metavar="NAME", help="which domain's primary, when the state folder has several")


def _add(subparsers, name: str, help_text: str, handler: Callable[[argparse.Namespace], int], *,
         description: str | None = None, targeted: bool = True, nb_help: bool = True) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=description or help_text, allow_abbrev=False,
                                   add_help=nb_help)
    if not nb_help:  # -h is NetBackup's host option there
        parser.add_argument("--help", action="help", help="show this help and exit")
    if targeted:
        _target_options(parser)
    parser.set_defaults(handler=_guarded(handler))
    return _strict(parser)


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Every error a user can cause: one line on stderr and an exit code, no traceback."""

    def run(args: argparse.Namespace) -> int:
        from fabric.api import AdminError

        if handler is not cmd_serve:
            _quiet_logs()
        try:
            return handler(args)
        except CommandError as exc:
            print(f"{args.command}: {exc.message}", file=sys.stderr)
            return exc.code
        except AdminError as exc:
            print(f"{args.command}: {exc.message}", file=sys.stderr)
            return _exit_code(exc.status)
        except BrokenPipeError:  # `| head`
            return EXIT_OK

    return run


class _CurrentStderr:
    """Whatever sys.stderr is at each write: a stream captured at configure time may be
    closed by the time a warning comes (pytest swaps stderr per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _quiet_logs() -> None:
    """A command's output is its listing: log warnings only, as JSON lines on stderr."""
    import logging

    import structlog

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def register(subparsers) -> None:
    """Add the NetBackup-style commands, `fabric audit` and `fabric serve` to `fabric`'s argparse tree."""
    p = _add(subparsers, "bpimage", "change an image's DTE mode: bpimage -update -backupid ID -image_dtemode On|Off", cmd_bpimage)
    p.add_argument("-update", action="store_true", help="update the image's attributes (the only action simulated)")
    p.add_argument("-backupid", metavar="ID", help="the image: <client>_<10-digit ctime>")
    p.add_argument("-client", metavar="NAME", help="the image's client (checked against the backup id)")
    p.add_argument("-image_dtemode", metavar="On|Off", help="the new image DTE mode (reference 7.2)")

    p = _add(subparsers, "bpimagelist", "list images with image_dteMode and per copy copy_dtemode / hierarchical_dtemode",
             cmd_bpimagelist)
    p.add_argument("-backupid", metavar="ID")
    p.add_argument("-client", metavar="NAME")
    p.add_argument("-l", action="store_true", help="NetBackup's raw IMAGE / HISTO / FRAG lines")
    p.add_argument("-json", "--json", action="store_true", dest="json", help="JSON")

    p = _add(subparsers, "bpdbjobs", "list jobs with their DTE mode, TLS version and cipher", cmd_bpdbjobs)
    p.add_argument("-report", action="store_true", help="the job table (also the default)")
    p.add_argument("-jobid", metavar="N", help="only this job")
    p.add_argument("-json", "--json", action="store_true", dest="json", help="JSON")

    p = _add(subparsers, "nbseccmd", "DTE security settings: -getsecurityconfig / -setsecurityconfig -dteglobalmode, -dtemediamode",
             cmd_nbseccmd)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("-getsecurityconfig", action="store_true")
    action.add_argument("-setsecurityconfig", action="store_true")
    p.add_argument("-dteglobalmode", nargs="?", const="", default=None, metavar="0|1|2",
                   help="0 Preferred Off, 1 Preferred On, 2 Enforced (reference 3.2)")
    p.add_argument("-dtemediamode", nargs="?", const="", default=None, metavar="on|off", help="a media server's DTE mode")
    p.add_argument("-mediaserver", metavar="NAME")

    for name in ("bpsetconfig", "nbsetconfig"):
        p = _add(subparsers, name, "set DTE_CLIENT_MODE on a client, DTE_IGNORE_IMAGE_MODE on the primary, MEDIA_DTE_MODE",
                 cmd_setconfig, nb_help=False,
                 description="Entries are KEY = VALUE (as arguments, or lines on standard input): DTE_CLIENT_MODE = "
                             "AUTOMATIC|ON|OFF (-h client), MEDIA_DTE_MODE = ON|OFF (-h media server), "
                             "DTE_IGNORE_IMAGE_MODE = NEVER|WHERE_UNSUPPORTED|ALWAYS (the primary: domain-wide in fabric).")
        p.add_argument("-h", dest="host", metavar="HOST", help="the host to configure (default: the primary)")
        p.add_argument("entries", nargs="*", metavar="ENTRY")

    for name in ("bpgetconfig", "nbgetconfig"):
        p = _add(subparsers, name, "show a host's DTE configuration entries", cmd_getconfig, nb_help=False)
        p.add_argument("-h", dest="host", metavar="HOST", help="the host (default: the primary)")
        p.add_argument("keys", nargs="*", metavar="KEY")

    p = _add(subparsers, "audit", "every change of a DTE setting or an image mode: when, by what, before, after", cmd_audit)
    p.add_argument("-json", "--json", action="store_true", dest="json", help="JSON")

    p = _add(subparsers, "serve", "start the primary's REST API on the catalog a run left (no other daemons)", cmd_serve,
             targeted=False)
    p.add_argument("--state", metavar="DIR", required=True, help="the state folder a run left")
    p.add_argument("--primary-host", metavar="NAME", help="serve only this primary (default: every primary in the folder)")
    p.add_argument("--listen", metavar="HOST", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", metavar="N", type=int, default=0, help="port (default: a free one; one primary only)")


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def _command_line(*words: object) -> str:
    return " ".join(str(w) for w in words if w is not None and w != "")


def _backup_id(value: str | None, flag: str = "-backupid") -> str:
    from fabric.api import BadRequest, check_backup_id

    if value is None:
        raise CommandError(f"{flag} ID is required", EXIT_USAGE)
    try:
        return check_backup_id(value)
    except BadRequest as exc:
        raise CommandError(exc.message, EXIT_USAGE) from None


def cmd_bpimage(args: argparse.Namespace) -> int:
    from fabric.api import BadRequest, parse_dte_mode

    if not args.update:
        raise CommandError("only bpimage -update -backupid ID -image_dtemode On|Off is simulated", EXIT_USAGE)
    backup_id = _backup_id(args.backupid)
    if args.image_dtemode is None:
        raise CommandError("-image_dtemode On|Off is required with -update", EXIT_USAGE)
    try:
        mode = parse_dte_mode(args.image_dtemode, "-image_dtemode")
    except BadRequest as exc:
        raise CommandError(exc.message.replace('"ON" or "OFF"', "On or Off"), EXIT_USAGE) from None
    if args.client is not None and not backup_id.startswith(f"{args.client}_"):
        raise CommandError(f"backup id {backup_id} is not an image of client {args.client}", EXIT_USAGE)
    actor = _command_line("bpimage -update -backupid", backup_id, "-image_dtemode", mode.name.title())
    target = open_target(args)
    try:
        view = target.set_image_dte_mode(backup_id, mode, actor)
    finally:
        target.close()
    print(f"{view.image.backup_id}: image_dteMode {view.image.image_dte_mode.name.title()}")
    return EXIT_OK


def cmd_bpimagelist(args: argparse.Namespace) -> int:
    from fabric.api import BadRequest, check_host_name

    backup_id = _backup_id(args.backupid) if args.backupid is not None else None
    if args.client is not None:
        try:
            check_host_name(args.client)
        except BadRequest as exc:
            raise CommandError(exc.message, EXIT_USAGE) from None
    target = open_target(args)
    try:
        if backup_id is not None:
            views: Iterator[ImageView] = iter([target.image(backup_id)])
            if args.client is not None and not backup_id.startswith(f"{args.client}_"):
                views = iter([])
        else:
            views = target.images(args.client)
        shown = render_images(views, "json" if args.json else "long" if args.l else "table", sys.stdout)
    finally:
        target.close()
    if not shown:
        raise CommandError("no entity was found", EXIT_NOT_FOUND)
    return EXIT_OK


def cmd_bpdbjobs(args: argparse.Namespace) -> int:
    if args.jobid is not None and (not args.jobid.isdecimal() or len(args.jobid) > 12):
        raise CommandError(f"-jobid must be a job number, not {args.jobid!r}", EXIT_USAGE)
    target = open_target(args)
    try:
        jobs = iter([target.job(int(args.jobid))]) if args.jobid is not None else target.jobs()
        if args.json:
            from fabric.api import job_json

            print(json.dumps([job_json(j)["attributes"] for j in jobs], indent=2))
        else:
            print(render_jobs(list(jobs)))
    finally:
        target.close()
    return EXIT_OK


def cmd_nbseccmd(args: argparse.Namespace) -> int:
    from fabric.api import BadRequest, parse_enum
    from fabric.dte import GlobalMode, MediaMode

    if args.getsecurityconfig:
        if args.dteglobalmode not in (None, "") or args.dtemediamode not in (None, ""):
            raise CommandError("-getsecurityconfig takes -dteglobalmode or -dtemediamode without a value", EXIT_USAGE)
        target = open_target(args)
        try:
            if args.dtemediamode is not None:
                if not args.mediaserver:
                    raise CommandError("-dtemediamode needs -mediaserver NAME", EXIT_USAGE)
                host = target.host(args.mediaserver)
                if host.role.value != "media":
                    raise CommandError(f"{args.mediaserver} is not a media server (it is the {host.role.value})", EXIT_USAGE)
                print(f"DTE Media Mode ({host.name}): {host.dte_mode.upper() if host.dte_mode else 'ON (default)'}")
                return EXIT_OK
            props = target.security()
        finally:
            target.close()
        print(f"DTE Global Mode: {props.global_mode.name}")
        if args.dteglobalmode is None:
            print(f"DTE Ignore Image Mode: {props.ignore_image_mode.name}")
        return EXIT_OK

    # -setsecurityconfig
    if (args.dteglobalmode is None) == (args.dtemediamode is None):
        raise CommandError("-setsecurityconfig takes one of -dteglobalmode 0|1|2 or -dtemediamode on|off -mediaserver NAME", EXIT_USAGE)
    if args.dteglobalmode is not None:
        name = GLOBAL_MODE_NUMBERS.get(args.dteglobalmode.strip())
        if name is None:
            raise CommandError(f"-dteglobalmode must be 0 (Preferred Off), 1 (Preferred On) or 2 (Enforced), not {args.dteglobalmode!r}",
                               EXIT_USAGE)
        mode = GlobalMode[name]
        actor = f"nbseccmd -setsecurityconfig -dteglobalmode {args.dteglobalmode.strip()}"
        target = open_target(args)
        try:
            props = target.set_security(mode, None, actor)
        finally:
            target.close()
        print(f"DTE Global Mode: {props.global_mode.name}")
        return EXIT_OK
    if not args.mediaserver:
        raise CommandError("-dtemediamode needs -mediaserver NAME", EXIT_USAGE)
    try:
        media_mode = parse_enum(MediaMode, args.dtemediamode, "-dtemediamode")
    except BadRequest as exc:
        raise CommandError(exc.message, EXIT_USAGE) from None
    actor = f"nbseccmd -setsecurityconfig -dtemediamode {media_mode.value} -mediaserver {args.mediaserver}"
    target = open_target(args)
    try:
        host = target.host(args.mediaserver)
        if host.role.value != "media":
            raise CommandError(f"{args.mediaserver} is not a media server (it is the {host.role.value})", EXIT_USAGE)
        host = target.set_host(args.mediaserver, media_mode.name, None, actor)
    finally:
        target.close()
    print(f"DTE Media Mode ({host.name}): {(host.dte_mode or '').upper()}")
    return EXIT_OK


_ENTRY = re.compile(r"([A-Za-z_]+)\s*=\s*(\S+)")
SETCONFIG_KEYS = ("DTE_CLIENT_MODE", "MEDIA_DTE_MODE", "DTE_IGNORE_IMAGE_MODE")


def parse_entries(text: str) -> list[tuple[str, str]]:
    """`KEY = VALUE` entries, as bp.conf lines or arguments; anything else is an error."""
    entries, rest = [], text
    for match in _ENTRY.finditer(text):
        entries.append((match[1].upper(), match[2]))
    rest = _ENTRY.sub("", text).strip()
    if rest:
        raise CommandError(f"not a KEY = VALUE entry: {rest.splitlines()[0][:60]!r}", EXIT_USAGE)
    if not entries:
        raise CommandError("no entry: give e.g. 'DTE_CLIENT_MODE = ON' as arguments or on standard input", EXIT_USAGE)
    for key, _ in entries:
        if key == "DTE_MEDIA_MODE":
            continue
        if key not in SETCONFIG_KEYS:
            raise CommandError(f"fabric does not simulate {key}; it knows {', '.join(SETCONFIG_KEYS)}", EXIT_USAGE)
    return [("MEDIA_DTE_MODE" if k == "DTE_MEDIA_MODE" else k, v) for k, v in entries]


def cmd_setconfig(args: argparse.Namespace) -> int:
    from fabric.api import BadRequest, parse_enum
    from fabric.dte import IgnoreImageMode

    text = " ".join(args.entries) if args.entries else sys.stdin.read()
    entries = parse_entries(text)
    words = " ".join(f"{k} = {v}" for k, v in entries)
    actor = _command_line(args.command, "-h" if args.host else None, args.host, words)
    target = open_target(args)
    try:
        lines = []
        for key, value in entries:
            if key == "DTE_IGNORE_IMAGE_MODE":
                if args.host and target.host(args.host).role.value != "primary":
                    raise CommandError(f"fabric keeps DTE_IGNORE_IMAGE_MODE on the primary, for the whole domain; "
                                       f"{args.host} is not the primary", EXIT_USAGE)
                try:
                    ignore = parse_enum(IgnoreImageMode, value, "DTE_IGNORE_IMAGE_MODE")
                except BadRequest as exc:
                    raise CommandError(exc.message, EXIT_USAGE) from None
                props = target.set_security(None, ignore, actor)
                lines.append(f"{args.host or 'primary'}: DTE_IGNORE_IMAGE_MODE = {props.ignore_image_mode.name}")
                continue
            if not args.host:
                raise CommandError(f"{key} is a host's setting: name the host with -h HOST", EXIT_USAGE)
            host = target.host(args.host)
            wanted = "client" if key == "DTE_CLIENT_MODE" else "media"
            if host.role.value != wanted:
                raise CommandError(f"{key} is set on a {'client' if wanted == 'client' else 'media server'}; "
                                   f"{args.host} is the {host.role.value}", EXIT_USAGE)
            host = target.set_host(args.host, value, None, actor)
            lines.append(f"{host.name}: {key} = {(host.dte_mode or '').upper()}")
    finally:
        target.close()
    print("\n".join(lines))
    return EXIT_OK


def cmd_getconfig(args: argparse.Namespace) -> int:
    keys = [k.upper() for k in args.keys] or list(SETCONFIG_KEYS)
    unknown = [k for k in keys if k not in SETCONFIG_KEYS]
    if unknown:
        raise CommandError(f"fabric does not simulate {unknown[0]}; it knows {', '.join(SETCONFIG_KEYS)}", EXIT_USAGE)
    target = open_target(args)
    try:
        lines = []
        if args.host:
            host = target.host(args.host)
            default = "(the version's default)"
            if host.role.value == "client" and "DTE_CLIENT_MODE" in keys:
                lines.append(f"DTE_CLIENT_MODE = {host.dte_mode.upper() if host.dte_mode else default}")
            if host.role.value == "media" and "MEDIA_DTE_MODE" in keys:
                lines.append(f"MEDIA_DTE_MODE = {host.dte_mode.upper() if host.dte_mode else 'ON ' + default}")
            if host.version:
                lines.append(f"VERSION = {host.version}")
        if (not args.host or not lines) and "DTE_IGNORE_IMAGE_MODE" in keys:
            lines.append(f"DTE_IGNORE_IMAGE_MODE = {target.security().ignore_image_mode.name}")
    finally:
        target.close()
    print("\n".join(lines))
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    target = open_target(args)
    try:
        records = list(target.audit())
    finally:
        target.close()
    if args.json:
        print(json.dumps([{"audit_id": r.audit_id, "when": r.when, "actor": r.actor, "what": r.what,
                           "before": r.before, "after": r.after} for r in records], indent=2))
        return EXIT_OK
    from fabric.cli import table

    rows = [("id", "when (UTC)", "what", "before", "after", "by")]
    rows += [(str(r.audit_id), r.when, r.what, r.before or "-", r.after or "-", r.actor) for r in records]
    print(table(rows) if records else "no changes recorded")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

# `bpimagelist -l` field order (reference §7.3, KB-IMAGELIST); "version" appears twice.
IMAGE_FIELDS = (
    "client_name date1 date2 version backupid policy_name client_type proxy_client creator sched_label sched_type "
    "retention backup_time elapsed expiration compression encryption kbytes num_files copies num_fragments "
    "files_compressed files_file version2 name1 options primary image_type tir_info tir_expiration keywords mpx "
    "ext_security raw dump_lvl fs_only prev_BItime BIfull_time obj_desc requestID backup_stat backup_copy prev_image "
    "jobid num_resumes resume_expr ff_size pfi_type image_attrib ss_classification_id ss_name ss_completed snap_time "
    "slp_version remoteExpiration origin_master_server origin_master_guid ir_enabled client_charset hold "
    "kilobytes_data_transferred image_dteMode intelligent_catalog_archiving resilient_expiration malware_scan_result "
    "image_group_key"
).split()
FRAG_FIELDS = (
    "copy_num frag_num KB remainder media_type density file_num id host block_size offset media_date dev_written "
    "f_flags media_desc expiration mpx ret_level checkpoint resume_nbr media_seq_no media_subtype ss_try_to_keep_date "
    "copy_date fragment_state data_format kms_key_tag slp_dest_tag mirror_parent copy_on_hold copy_dtemode "
    "hierarchical_dtemode copy_worm_lock_flags copy_worm_unlock_time held_for_dependent_copy"
).split()
NULL = "*NULL*"
SCHED_TYPES = {"full": 0, "incremental": 1}  # reference §11.2 schedule type codes


def dte_number(mode: "DteMode") -> int:
    """[I] Reference §7.3: the raw listing's DTE fields are probably 0 = Off, 1 = On."""
    return 1 if mode.is_on else 0


def image_fields(view: "ImageView") -> dict[str, object]:
    image = view.image
    known = {
        "client_name": image.client, "version": 13, "backupid": image.backup_id, "policy_name": image.policy_type,
        "creator": "root", "sched_label": image.schedule_type, "sched_type": SCHED_TYPES.get(image.schedule_type, 0),
        "retention": 1, "backup_time": image.backup_time, "expiration": image.expiration or 0, "kbytes": image.kbytes,
        "num_files": image.num_files, "copies": len(view.copies), "num_fragments": len(view.copies), "version2": 13,
        "primary": next((c.copy_number for c in view.copies if c.primary), 1), "image_type": 2 if image.origin_domain else 0,
        "prev_image": image.base_backup_id or NULL, "jobid": image.job_id or 0,
        "origin_master_server": image.origin_domain or NULL, "kilobytes_data_transferred": image.kbytes,
        "image_dteMode": dte_number(image.image_dte_mode),
    }
    strings = {"proxy_client", "files_file", "name1", "keywords", "obj_desc", "resume_expr", "ss_classification_id",
               "ss_name", "origin_master_guid", "image_group_key"}
    return {f: known.get(f, NULL if f in strings else 0) for f in IMAGE_FIELDS}


def frag_fields(view: "ImageView", copy) -> dict[str, object]:
    known = {
        "copy_num": copy.copy_number, "frag_num": 1, "KB": view.image.kbytes, "file_num": 1, "id": copy.path.replace(" ", "?"),
        "host": copy.media_server, "block_size": 262144, "media_date": copy.created, "expiration": view.image.expiration or 0,
        "ret_level": 1, "copy_date": copy.created, "fragment_state": 1, "mirror_parent": copy.parent_copy or 0,
        "copy_dtemode": dte_number(copy.copy_dte_mode), "hierarchical_dtemode": dte_number(copy.hierarchical_dte_mode),
    }
    strings = {"media_desc", "kms_key_tag", "slp_dest_tag"}
    return {f: known.get(f, NULL if f in strings else 0) for f in FRAG_FIELDS}


def image_listing_json(view: "ImageView") -> dict:
    """`bpimagelist -json`: the `-l` record with its field names, copies as FRAG objects."""
    record = {k: v for k, v in image_fields(view).items() if k != "version2"}
    record["frags"] = [frag_fields(view, c) for c in view.copies]
    return record


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def render_images(views: Iterator["ImageView"], form: str, out: IO[str]) -> int:
    """Print images as they come (a million-image catalog is never held in memory for the
    raw and JSON forms); returns how many were printed."""
    count = 0
    if form == "long":
        for view in views:
            out.write("IMAGE " + " ".join(str(v) for v in image_fields(view).values()) + "\n")
            out.write("HISTO " + " ".join(["-1"] * 10) + "\n")
            for copy in view.copies:
                out.write("FRAG " + " ".join(str(v) for v in frag_fields(view, copy).values()) + "\n")
            count += 1
        return count
    if form == "json":
        for view in views:
            out.write(("[\n" if count == 0 else ",\n") + json.dumps(image_listing_json(view), indent=2))
            count += 1
        if count:
            out.write("\n]\n")
        return count
    from fabric.cli import table

    rows = [("Backed Up (UTC)", "Expires", "Files", "KB", "Client", "Backup ID", "Sched", "Image DTE", "Copies (copy media DTE/hierarchical)")]
    for view in views:
        image = view.image
        copies = ", ".join(f"{c.copy_number} {c.media_server} {c.copy_dte_mode.name.title()}/{c.hierarchical_dte_mode.name.title()}"
                           for c in view.copies)
        rows.append((_when(image.backup_time), _when(image.expiration), str(image.num_files), str(image.kbytes), image.client,
                     image.backup_id, image.schedule_type.upper(), image.image_dte_mode.name.title(), copies or "-"))
        count += 1
    if count:
        out.write(table(rows) + "\n")
    return count


def render_jobs(jobs: list["JobRecord"]) -> str:
    from fabric.cli import table

    rows = [("JobID", "Type", "State", "Status", "Client", "Media Server", "DTE Mode", "TLS", "Cipher", "KB")]
    for job in jobs:
        rows.append((str(job.job_id), job.job_type.title(), job.state.replace("_", " ").title(),
                     "" if job.status is None else str(job.status), job.client or "", job.target or job.media_server or "",
                     job.dte_mode.name.title() if job.dte_mode else "", job.tls_version or "", job.tls_cipher or "",
                     str(-(-job.bytes // 1024))))
    return table(rows)


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------


async def wait_for_interrupt() -> None:
    """Until Ctrl-C or SIGTERM: the normal end of a served fabric, not an error."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _announce(servers, state_dir: Path, out: IO[str]) -> None:
    from fabric.api import TOKEN_FILE

    for server in servers:
        print(f"API of {server.backend.name} (domain {server.backend.domain}): {server.url}", file=out)
    print(f"token: {state_dir / TOKEN_FILE}  (send it as Authorization: Bearer <token>)", file=out)
    choose = f" --domain {servers[0].backend.domain}" if len(servers) > 1 else ""
    print(f"try:   fabric bpimagelist --state {state_dir}{choose}", file=out)
    print("Ctrl-C to stop", file=out, flush=True)


async def serve_fabric(daemons: list["Daemon"], state_dir: Path, out: IO[str]) -> None:
    """`fabric run --serve`: an API on each live primary until Ctrl-C."""
    from fabric.api import serve_primaries
    from fabric.dte import Role

    servers = await serve_primaries([d for d in daemons if d.role is Role.PRIMARY], state_dir)
    try:
        _announce(servers, state_dir, out)
        await wait_for_interrupt()
    finally:
        for server in servers:
            await server.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from fabric import logs

    state = Path(args.state).expanduser()
    primaries = find_primaries(state)
    if args.primary_host:
        primaries = [choose_primary(state, args.primary_host, None)]
    if args.port and len(primaries) > 1:
        raise CommandError(f"--port needs one primary; {state} has {len(primaries)}: add --primary-host", EXIT_USAGE)
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port} is not a TCP port", EXIT_USAGE)
    logs.configure(state / "logs" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    try:
        asyncio.run(_serve_catalogs(state, primaries, args.listen, args.port))
    except OSError as exc:
        raise CommandError(f"cannot serve on {args.listen}:{args.port}: {exc.strerror or exc}") from None
    return EXIT_OK


async def _serve_catalogs(state: Path, primaries: list[StatePrimary], listen: str, port: int) -> None:
    from fabric.api import ApiServer, CatalogBackend, write_token
    from fabric.catalog import Catalog

    token = write_token(state)
    servers: list[ApiServer] = []
    catalogs = []
    try:
        for primary in primaries:
            catalog = Catalog.open(primary.catalog_path)
            catalogs.append(catalog)
            server = ApiServer(CatalogBackend(catalog, primary.name, primary.domain, host_roles(primary)), token, listen, port,
                               url_file=primary.url_file)
            await server.start()
            servers.append(server)
        _announce(servers, state, sys.stdout)
        await wait_for_interrupt()
    finally:
        for server in servers:
            await server.stop()
        for catalog in catalogs:
            catalog.close()
