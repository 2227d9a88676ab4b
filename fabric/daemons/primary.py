"""The primary server daemon: decides every job's DTE mode, runs the job, owns the catalog.

It plays nbjm (decide the child job's DTE mode before any connection, reference §8.2),
nbemm (the registry of hosts, versions and DTE modes) and bpdbm (the catalog).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from fabric import dte
from fabric.bus import Message
from fabric.catalog import Catalog, CopyRecord, FileRecord, ImageRecord
from fabric.channel import Leg
from fabric.daemons.base import Daemon, DaemonConfig, JobFailure, Route, direct_route
from fabric.datastream import receive_metadata
from fabric.dte import ClientMode, DomainSettings, DteMode, GlobalMode, Host, IgnoreImageMode, MediaMode, Outcome, Role, Version
from fabric.jobs import CopyInfo, JobRequest, JobResult, outcome_status
from fabric.model import RetryPolicy
from fabric.status import Status

CALL_TIMEOUT = 3600.0  # data legs have their own idle timeout; this only bounds a lost reply
CATALOG_FILE = "catalog.sqlite"
# Ordinary failures a retry may cure; DTE failures (83xx) never are: the rules decide the same.
RETRYABLE = {Status.CANNOT_CONNECT, Status.CONNECTION_BROKEN, Status.CONNECTION_TIMED_OUT, Status.CANT_CONNECT_TO_CLIENT,
             Status.MEDIA_WRITE_ERROR, Status.DISK_VOLUME_DOWN, Status.DISK_STORAGE_SERVER_DOWN, Status.STORAGE_UNIT_UNAVAILABLE}


@dataclass
class RegisteredHost:
    """What the primary knows of a host in its domain (or a trusted one): EMM's view."""

    name: str
    role: Role
    version: Version
    dte_mode: ClientMode | MediaMode | None
    domain: str
    port: int | None
    online: bool = True

    def as_dte_host(self) -> Host:
        return Host(self.name, self.role, self.version, self.dte_mode)

    @classmethod
    def from_json(cls, body: dict) -> "RegisteredHost":
        role = Role(body["role"])
        mode_type = MediaMode if role is Role.MEDIA else ClientMode
        mode = mode_type(body["dte_mode"]) if body.get("dte_mode") else None
        return cls(body["name"], role, Version.parse(body["version"]), mode, body["domain"], body.get("port"))


class Primary(Daemon):
    role = Role.PRIMARY

    def __init__(self, config: DaemonConfig, broker_url: str, route: Route = direct_route, *,
                 settings: DomainSettings | None = None, retry: RetryPolicy = RetryPolicy()):
        super().__init__(config, broker_url, route)
        self.initial_settings = settings
        self.retry = retry
        self.hosts: dict[str, RegisteredHost] = {}
        self.gone: dict[str, asyncio.Event] = {}  # set when a registered host goes offline
        self.catalog: Catalog | None = None

    async def on_start(self) -> None:
        self.catalog = Catalog.open(self.config.state_dir / CATALOG_FILE)
        # A run starts from its topology's settings; a primary restarting after a crash
        # (the same run) keeps what was changed since: only the first start applies them.
        settings, self.initial_settings = self.initial_settings, None
        if settings is not None:
            current = self.catalog.get_settings(self.config.domain).as_dte()
            if current.global_mode is not settings.global_mode:
                self.catalog.set_global_mode(settings.global_mode, "topology", self.config.domain)
            if current.ignore_image_mode is not settings.ignore_image_mode:
                self.catalog.set_ignore_image_mode(settings.ignore_image_mode, "topology", self.config.domain)

    async def start(self) -> None:
        await super().start()
        await self.bus.subscribe(self.topics.all_status(), self.on_status)
        await self.bus.publish(self.topics.announcements(), "primary_online", {"primary": self.name})

    async def on_stop(self) -> None:
        if self.catalog:
            self.catalog.close()
            self.catalog = None

    @property
    def settings(self) -> DomainSettings:
        return self.catalog.get_settings(self.config.domain).as_dte()

    # -- the host registry -------------------------------------------------------------

    async def cmd_register(self, body: dict) -> dict:
        host = RegisteredHost.from_json(body)
        self.hosts[host.name] = host
        self.gone[host.name] = asyncio.Event()
        self.log.info("host registered", peer=host.name, peer_role=host.role.value, version=str(host.version),
                      dte_mode=host.dte_mode.value if host.dte_mode else None)
        return {}

    async def cmd_hosts(self, body: dict) -> dict:
        """Which hosts have registered and are online (a runner waits for its topology)."""
        return {"online": sorted(name for name, host in self.hosts.items() if host.online)}

    async def on_status(self, message: Message) -> None:
        host = (message.topic or "").split("/")[-2]
        if host in self.hosts and message.body.get("state") == "offline":
            self.hosts[host].online = False
            self.gone[host].set()
            self.log.warning("host went offline", peer=host)
        elif host in self.hosts and message.body.get("state") == "online":
            self.hosts[host].online = True
        return None

    async def call(self, host: str, kind: str, body: dict[str, Any], timeout: float = 30.0, *,
                   domain: str | None = None, peer_is_client: bool = False) -> dict:
        """A request that also ends when its host goes offline (its last will): a host that
        crashed mid-job never answers, and the job must fail now, not at the timeout."""
        gone = self.gone.get(host) if domain is None else None
        if gone is None:
            return await super().call(host, kind, body, timeout, domain=domain, peer_is_client=peer_is_client)
        request = asyncio.ensure_future(super().call(host, kind, body, timeout, domain=domain, peer_is_client=peer_is_client))
        watch = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({request, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if request.done():
            return request.result()
        request.cancel()
        status = Status.CANT_CONNECT_TO_CLIENT if peer_is_client else Status.DISK_STORAGE_SERVER_DOWN
        raise JobFailure(status, f"{host} went offline during {kind}")

    def host(self, name: str, role: Role) -> RegisteredHost:
        host = self.hosts.get(name)
        down = Status.DISK_STORAGE_SERVER_DOWN if role is Role.MEDIA else Status.CANT_CONNECT_TO_CLIENT
        if host is None:
            raise JobFailure(down, f"{name} has not registered with {self.name}")
        if not host.online:
            raise JobFailure(down, f"{name} is offline")
        return host

    # -- settings (nbseccmd, bpsetconfig) ------------------------------------------------

    async def cmd_set_domain(self, body: dict) -> dict:
        actor = body.get("actor", "unknown")
        if body.get("global_mode"):
            self.catalog.set_global_mode(GlobalMode(body["global_mode"]), actor, self.config.domain)
        if body.get("ignore_image_mode"):
            self.catalog.set_ignore_image_mode(IgnoreImageMode(body["ignore_image_mode"]), actor, self.config.domain)
        settings = self.settings
        return {"global_mode": settings.global_mode.value, "ignore_image_mode": settings.ignore_image_mode.value}

    async def cmd_set_host(self, body: dict) -> dict:
        """Push a host's DTE mode or version to it, then record it (EMM and audit)."""
        name, actor = body["host"], body.get("actor", "unknown")
        host = self.hosts.get(name)
        if host is None:
            raise JobFailure(Status.NO_ENTITY_FOUND, f"{name} is not a host of domain {self.config.domain}")
        described = await self.call(name, "configure", {"dte_mode": body.get("dte_mode"), "version": body.get("version")},
                                    peer_is_client=host.role is Role.CLIENT)
        updated = RegisteredHost.from_json(described)
        self.hosts[name] = replace(updated, online=True)
        if body.get("dte_mode"):
            self.catalog.set_host_dte_mode(name, body["dte_mode"], actor)
        if body.get("version"):
            self.catalog.set_host_version(name, body["version"], actor)
        return described

    async def cmd_set_image_dte_mode(self, body: dict) -> dict:
        """`bpimage -update -image_dtemode`: governs only jobs that start afterwards."""
        before, after = self.catalog.set_image_dte_mode(body["backup_id"], DteMode(body["mode"]), body.get("actor", "unknown"))
        return {"before": before.value, "after": after.value}

    async def cmd_describe_image(self, body: dict) -> dict:
        image = self._image(body["backup_id"])
        return {"backup_id": image.backup_id, "image_dte_mode": image.image_dte_mode.value,
                "copies": [c.__dict__ | {"copy_dte_mode": c.copy_dte_mode.value, "hierarchical_dte_mode": c.hierarchical_dte_mode.value}
                           for c in self.catalog.copies(image.backup_id)]}

    # -- jobs --------------------------------------------------------------------------

    async def cmd_run_job(self, body: dict) -> dict:
        request = JobRequest.from_json(body)
        return (await self.run_job(request)).as_json()

    async def run_job(self, request: JobRequest) -> JobResult:
        """One job with the domain's retry policy: a new attempt re-decides DTE (settings may
        have changed), a DTE failure is final."""
        if request.op == "policy":
            return await self.run_policy(request)
        job = self.catalog.create_job(request.op, state="queued", step=request.step, client=request.client,
                                      media_server=request.media, target=request.target, backup_id=request.backup_id,
                                      parent_job_id=request.parent_job_id)
        log = self.log.bind(job_id=job.job_id, op=request.op)
        started = time.time()
        run = getattr(self, f"_run_{request.op}")
        attempt = 0
        while True:
            attempt += 1
            self.catalog.update_job(job.job_id, state="active", attempt=attempt)
            try:
                result: JobResult = await run(job.job_id, request)
            except JobFailure as failure:
                final = attempt >= self.retry.attempts or failure.status not in RETRYABLE
                log.warning("job attempt failed", attempt=attempt, status=failure.status, reason=failure.reason, final=final)
                if not final:
                    self.catalog.update_job(job.job_id, state="waiting_for_retry", status=failure.status, reason=failure.reason)
                    await asyncio.sleep(self.retry.delay)
                    continue
                result = JobResult(job.job_id, request.op, failure.status, failure.reason,
                                   decision=getattr(failure, "decision", None), backup_id=request.backup_id)
            ended = time.time()
            result = replace(result, job_id=job.job_id, seconds=round(ended - started, 4), attempts=attempt)
            tls = result.tls or {}
            self.catalog.update_job(
                job.job_id, state="done", status=result.status, reason=result.reason, ended=ended,
                dte_mode=DteMode(result.dte_mode) if result.dte_mode else None, backup_id=result.backup_id,
                copy_number=result.copy, bytes=result.bytes, tls_version=tls.get("version"), tls_cipher=tls.get("cipher"),
            )
            log.info("job done", status=result.status, dte_mode=result.dte_mode, bytes=result.bytes, attempts=attempt)
            return result

    async def run_policy(self, request: JobRequest) -> JobResult:
        """A policy run as NetBackup shows it: a parent job (no DTE mode of its own, §6.9)
        whose children are the backup and then each lifecycle operation (nbstserv). Each
        secondary operation is decided when it runs, with the settings of that moment."""
        parent = self.catalog.create_job("policy", state="active", step=request.step, client=request.client,
                                         media_server=request.media, reason=f"policy {request.policy}")
        started = time.time()
        child = replace(request, op="backup", operations=(), parent_job_id=parent.job_id)
        children = [await self.run_job(child)]
        backup = children[0]
        for operation in request.operations if backup.status == 0 else ():
            if operation.kind == "duplicate":
                children.append(await self.run_job(JobRequest("duplicate", request.step, target=operation.target,
                                                              backup_id=backup.backup_id, parent_job_id=parent.job_id)))
                continue
            replicated = await self.run_job(JobRequest("replicate", request.step, target=operation.target,
                                                       target_domain=operation.target_domain, backup_id=backup.backup_id,
                                                       parent_job_id=parent.job_id))
            children.append(replicated)
            if replicated.status == 0:
                # The import runs in the target domain, by its primary (AIR, §6.4, §11.4).
                body = JobRequest("import", request.step, media=operation.target, backup_id=backup.backup_id).as_json()
                try:
                    children.append(JobResult.from_json(await self.call(operation.target_primary, "run_job", body,
                                                                        timeout=CALL_TIMEOUT, domain=operation.target_domain)))
                except JobFailure as failure:
                    children.append(JobResult(None, "import", failure.status, failure.reason))
        # The parent ends with the first failure of its children, as the Activity Monitor shows it.
        failed = next((c for c in children if c.status != 0), None)
        status, reason = (failed.status, f"{failed.op} failed: {failed.reason}") if failed else (0, f"policy {request.policy}: {len(children)} jobs")
        ended = time.time()
        self.catalog.update_job(parent.job_id, state="done", status=status, reason=reason, ended=ended,
                                backup_id=backup.backup_id, bytes=sum(c.bytes for c in children))
        return JobResult(parent.job_id, "policy", status, reason, backup_id=backup.backup_id,
                         bytes=sum(c.bytes for c in children), seconds=round(ended - started, 4),
                         image_dte_mode=backup.image_dte_mode, copies=self._copies(backup.backup_id), children=tuple(children))

    def decided(self, outcome: Outcome) -> DteMode:
        """The job's DTE mode, or the job fails here, before any connection (nbjm, §8.2)."""
        if outcome.fails:
            failure = JobFailure(outcome_status(outcome), outcome.reason)
            failure.decision = "fail"  # type: ignore[attr-defined]
            raise failure
        return DteMode.of(outcome.encrypts)

    # Each _run_<op> runs one attempt and raises JobFailure when it fails.

    async def _run_backup(self, job_id: int, req: JobRequest) -> JobResult:
        client, media = self.host(req.client, Role.CLIENT), self.host(req.media, Role.MEDIA)
        if req.policy_type == "universal_share":
            outcome = dte.decide_universal_share_backup(self.settings, media.as_dte_host())
        else:
            outcome = dte.decide_backup(self.settings, client.as_dte_host(), media.as_dte_host())
        mode = self.decided(outcome)
        base_id, base_files = self._incremental_base(req.client) if req.incremental else (None, None)
        backup_time = int(time.time())
        backup_id = self.catalog.allocate_backup_id(req.client, backup_time)
        try:
            ready = await self.call(req.media, "expect_store", {"job_id": job_id, "leg": "backup", "dte": mode.value,
                                                                 "sender": req.client, "name": backup_id})
            sent, stored = await self.both(
                self.call(req.client, "send_backup", {"job_id": job_id, "dte": mode.value, "receiver": req.media,
                                                      "port": ready["port"], "base_files": base_files},
                          timeout=CALL_TIMEOUT, peer_is_client=True),
                self.call(req.media, "leg_result", {"job_id": job_id, "leg": "backup"}, timeout=CALL_TIMEOUT),
                abort=lambda: self.call(req.media, "abort_leg", {"job_id": job_id, "leg": "backup"}),
            )
            encrypted = self.check_no_downgrade(mode, stored, sent)
            files = [FileRecord(f["path"], f["size"], f["sha256"]) for f in sent["files"]]
            image_mode = dte.image_dte_mode(encrypted, media.as_dte_host())
            copy_mode, hierarchical = dte.copy_attributes(encrypted, [media.as_dte_host()], None)
            image = self.catalog.commit_backup(
                ImageRecord(backup_id, req.client, req.policy_type, "incremental" if req.incremental else "full",
                            backup_time, image_mode, stored["bytes"], len(files), job_id, base_id),
                files,
                CopyRecord(backup_id, 1, req.media, stored["path"], copy_mode, hierarchical, None, 0, True),
            )
        except BaseException:
            self.catalog.release_backup_id(backup_id)
            raise
        return self._result(job_id, req, outcome, mode, stored, image.backup_id, 1, image_mode=image.image_dte_mode)

    def _incremental_base(self, client: str) -> tuple[str | None, dict[str, str] | None]:
        """What the client had at its last backup: the chain back to the last full, merged."""
        latest = self.catalog.list_images(client=client, limit=1)
        if not latest:
            return None, None  # no full yet: the incremental sends everything
        chain, image = [], latest[0]
        while image is not None:
            chain.append(image)
            if image.schedule_type == "full" or not image.base_backup_id:
                break
            image = self.catalog.get_image(image.base_backup_id)
        files: dict[str, str] = {}
        for image in reversed(chain):
            files.update({f.path: f.sha256 for f in self.catalog.files(image.backup_id)})
        return latest[0].backup_id, files

    async def _run_restore(self, job_id: int, req: JobRequest) -> JobResult:
        image = self._image(req.backup_id)
        copy = self._copy(image.backup_id, req.media)
        client, media = self.host(req.client, Role.CLIENT), self.host(copy.media_server, Role.MEDIA)
        outcome = dte.decide_restore(self.settings, image.image_dte_mode.is_on, client.as_dte_host(), [media.as_dte_host()])
        mode = self.decided(outcome)
        ready = await self.call(req.client, "expect_restore", {"job_id": job_id, "leg": "restore", "dte": mode.value,
                                                               "sender": media.name}, peer_is_client=True)
        sent, restored = await self.both(
            self.call(media.name, "send_copy", {"job_id": job_id, "leg": "restore", "dte": mode.value, "receiver": req.client,
                                                "port": ready["port"], "copy": Path(copy.path).name, "receiver_is_client": True},
                      timeout=CALL_TIMEOUT),
            self.call(req.client, "leg_result", {"job_id": job_id, "leg": "restore"}, timeout=CALL_TIMEOUT, peer_is_client=True),
            abort=lambda: self.call(req.client, "abort_leg", {"job_id": job_id, "leg": "restore"}, peer_is_client=True),
        )
        self.check_no_downgrade(mode, restored, sent)
        verified = self._matches(image.backup_id, restored["files"])
        result = self._result(job_id, req, outcome, mode, restored, image.backup_id, copy.copy_number, verified=verified)
        if not verified:
            return replace(result, status=int(Status.FILE_WRITE_FAILED), reason="restored files differ from the checksums recorded at backup")
        return result

    async def _run_duplicate(self, job_id: int, req: JobRequest) -> JobResult:
        image = self._image(req.backup_id)
        source_copy = self._copy(image.backup_id, req.media)
        source, target = self.host(source_copy.media_server, Role.MEDIA), self.host(req.target, Role.MEDIA)
        outcome = dte.decide_duplication(self.settings, image.image_dte_mode.is_on, source.as_dte_host(), target.as_dte_host())
        mode = self.decided(outcome)
        stored = await self._copy_between(job_id, "duplicate", mode, source.name, Path(source_copy.path).name, target.name,
                                          f"{image.backup_id}.dup{job_id}")
        encrypted = self.check_no_downgrade(mode, stored)
        copy_mode, hierarchical = dte.copy_attributes(encrypted, [source.as_dte_host(), target.as_dte_host()],
                                                      source_copy.hierarchical_dte_mode.is_on)
        try:
            copy = self.catalog.add_copy(image.backup_id, target.name, stored["path"], copy_mode, hierarchical, source_copy.copy_number)
        except BaseException:
            await self.call(target.name, "delete_copy", {"copy": stored["name"]})
            raise
        return self._result(job_id, req, outcome, mode, stored, image.backup_id, copy.copy_number)

    async def _run_verify(self, job_id: int, req: JobRequest) -> JobResult:
        image = self._image(req.backup_id)
        copy = self._copy(image.backup_id, req.media)
        media = self.host(copy.media_server, Role.MEDIA)
        outcome = dte.decide_verify(self.settings, image.image_dte_mode.is_on, media.as_dte_host())
        mode = self.decided(outcome)
        info = await self._catalog_info(job_id, "verify", mode, media.name, Path(copy.path).name, with_meta=False)
        verified = self._matches(image.backup_id, info["files"])
        result = self._result(job_id, req, outcome, mode, info, image.backup_id, copy.copy_number, verified=verified)
        if not verified:
            return replace(result, status=int(Status.MEDIA_READ_ERROR), reason=f"copy {copy.copy_number} on {media.name} differs from the catalog")
        return result

    async def _run_replicate(self, job_id: int, req: JobRequest) -> JobResult:
        image = self._image(req.backup_id)
        source_copy = self._copy(image.backup_id, req.media)
        source = self.host(source_copy.media_server, Role.MEDIA)
        described = await self.call(req.target, "describe", {}, domain=req.target_domain)
        target = RegisteredHost.from_json(described)
        # D-REPL: decided by the image mode or the *source* domain's settings.
        outcome = dte.decide_replication(self.settings, image.image_dte_mode.is_on, source.as_dte_host(), target.as_dte_host())
        mode = self.decided(outcome)
        meta = {
            "backup_id": image.backup_id, "client": image.client, "policy_type": image.policy_type,
            "schedule_type": image.schedule_type, "backup_time": image.backup_time,
            "image_dte_mode": image.image_dte_mode.value, "origin_domain": self.config.domain,
            "replication_encrypted": mode.is_on, "source_hierarchical": source_copy.hierarchical_dte_mode.value,
            "source_media_version": str(source.version),
        }
        stored = await self._copy_between(job_id, "replicate", mode, source.name, Path(source_copy.path).name, target.name,
                                          f"replica-{image.backup_id}", target_domain=req.target_domain, meta=meta)
        self.check_no_downgrade(mode, stored)
        return self._result(job_id, req, outcome, mode, stored, image.backup_id, None)

    async def _run_import(self, job_id: int, req: JobRequest) -> JobResult:
        media = self.host(req.media, Role.MEDIA)
        replica = f"replica-{req.backup_id}"
        header = await self.call(media.name, "read_meta", {"copy": replica})
        meta = header["meta"]
        image_on = meta["image_dte_mode"] == "on"
        outcome = dte.decide_import(self.settings, image_on, media.as_dte_host())
        mode = self.decided(outcome)
        info = await self._catalog_info(job_id, "import", mode, media.name, replica, with_meta=True)
        recorded = {f["path"]: f["sha256"] for f in info["meta"]["files"]}
        if {f["path"]: f["sha256"] for f in info["files"]} != recorded:
            raise JobFailure(Status.NO_IMAGES_PROCESSED, f"replica {replica} on {media.name} does not match its header")
        # The copy was written by the replication: its DTE attributes are the replication's.
        source_media = Host("source", Role.MEDIA, Version.parse(meta.get("source_media_version", "10.5")))
        copy_mode, hierarchical = dte.copy_attributes(meta["replication_encrypted"], [source_media, media.as_dte_host()],
                                                      meta["source_hierarchical"] == "on")
        files = [FileRecord(f["path"], f["size"], f["sha256"]) for f in info["meta"]["files"]]
        image = self.catalog.import_image(
            ImageRecord(meta["backup_id"], meta["client"], meta["policy_type"], meta["schedule_type"], meta["backup_time"],
                        DteMode(meta["image_dte_mode"]), sum(f.size for f in files), len(files), job_id,
                        origin_domain=meta["origin_domain"]),
            files,
            CopyRecord(meta["backup_id"], 1, media.name, header["path"], copy_mode, hierarchical, None, 0, True),
        )
        return self._result(job_id, req, outcome, mode, info, image.backup_id, 1, verified=True, image_mode=image.image_dte_mode)

    async def _run_synthetic(self, job_id: int, req: JobRequest) -> JobResult:
        components = [self._image(b) for b in req.images]
        copies = [self._copy(c.backup_id, None) for c in components]
        sources = [self.host(c.media_server, Role.MEDIA) for c in copies]
        target = self.host(req.target, Role.MEDIA)
        involved = list({h.name: h.as_dte_host() for h in [*sources, target]}.values())
        outcome = dte.decide_synthetic(self.settings, [c.image_dte_mode.is_on for c in components], involved)
        mode = self.decided(outcome)
        backup_time = int(time.time())
        backup_id = self.catalog.allocate_backup_id(components[0].client, backup_time)
        names = []
        try:
            received = []
            for n, (copy, source) in enumerate(zip(copies, sources)):
                name = f"synth{job_id}-{n}"
                received.append(await self._copy_between(job_id, f"component{n}", mode, source.name, Path(copy.path).name,
                                                         target.name, name))
                names.append(name)
            encrypted = all(self.check_no_downgrade(mode, r) for r in received)
            merged = await self.call(target.name, "synthesize", {"name": backup_id, "components": names}, timeout=CALL_TIMEOUT)
            files = [FileRecord(f["path"], f["size"], f["sha256"]) for f in merged["files"]]
            image_mode = dte.image_dte_mode(encrypted, target.as_dte_host())
            copy_mode, hierarchical = dte.copy_attributes(encrypted, involved, None)
            image = self.catalog.commit_backup(
                ImageRecord(backup_id, components[0].client, "synthetic", "full", backup_time, image_mode,
                            merged["bytes"], len(files), job_id, components[-1].backup_id),
                files,
                CopyRecord(backup_id, 1, target.name, merged["path"], copy_mode, hierarchical, None, 0, True),
            )
        except BaseException:
            self.catalog.release_backup_id(backup_id)
            for name in names:
                await self.call(target.name, "delete_copy", {"copy": name})
            raise
        moved = {"bytes": sum(r["bytes"] for r in received), "tls": received[0].get("tls") if received else None}
        return self._result(job_id, req, outcome, mode, moved, image.backup_id, 1, image_mode=image.image_dte_mode)

    # -- job plumbing ------------------------------------------------------------------

    async def _copy_between(self, job_id: int, leg: str, mode: DteMode, source: str, copy_name: str, target: str,
                            name: str, *, target_domain: str | None = None, meta: dict | None = None) -> dict:
        """Media server to media server (duplication, replication, synthetic components)."""
        ready = await self.call(target, "expect_store", {"job_id": job_id, "leg": leg, "dte": mode.value, "sender": source,
                                                         "name": name, "hash_files": True, "meta": meta}, domain=target_domain)
        _, stored = await self.both(
            self.call(source, "send_copy", {"job_id": job_id, "leg": leg, "dte": mode.value, "receiver": target,
                                            "port": ready["port"], "copy": copy_name}, timeout=CALL_TIMEOUT),
            self.call(target, "leg_result", {"job_id": job_id, "leg": leg}, timeout=CALL_TIMEOUT, domain=target_domain),
            abort=lambda: self.call(target, "abort_leg", {"job_id": job_id, "leg": leg}, domain=target_domain),
        )
        return stored

    async def _catalog_info(self, job_id: int, leg: str, mode: DteMode, media: str, copy_name: str, with_meta: bool) -> dict:
        """Verify and import: the media server reads the copy and sends catalog information
        to this primary over a data leg (channel 4, media server -> primary, §9.1)."""

        async def receive(leg_: Leg) -> dict:
            payload = await receive_metadata(leg_)
            return {**payload, "bytes": leg_.bytes_received}

        self.expect(job_id, leg, mode, media, receive)
        sent, info = await self.both(
            self.call(media, "send_catalog_info", {"job_id": job_id, "leg": leg, "dte": mode.value, "receiver": self.name,
                                                   "port": self.legs.port, "copy": copy_name, "with_meta": with_meta},
                      timeout=CALL_TIMEOUT),
            self.leg_result(job_id, leg, CALL_TIMEOUT),
            abort=lambda: self.cmd_abort_leg({"job_id": job_id, "leg": leg}),
        )
        return info

    async def both(self, first: Awaitable[dict], second: Awaitable[dict], abort: Callable[[], Awaitable[Any]]) -> tuple[dict, dict]:
        """Run a leg's two ends together; when one fails, stop the other and report the
        more telling failure (a disk-full beats the broken connection it caused)."""
        tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if all(t.done() and not t.cancelled() and t.exception() is None for t in tasks):
                return tasks[0].result(), tasks[1].result()
            await asyncio.wait(tasks, timeout=1.0)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        failures = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        for task in tasks:
            task.cancel()
        try:
            await abort()
        except Exception:  # the other end may be the one that is gone
            pass
        consequences = {Status.CONNECTION_BROKEN, Status.CONNECTION_TIMED_OUT}
        failures.sort(key=lambda f: isinstance(f, JobFailure) and f.status in consequences)
        raise failures[0]

    def check_no_downgrade(self, mode: DteMode, *ends: dict) -> bool:
        """The invariant: a job decided `encrypt` never moved data without TLS."""
        tls = [end.get("tls") for end in ends]
        if mode.is_on and not all(tls):
            raise JobFailure(Status.DTE_NEGOTIATION_REFUSED, "the job was decided DTE On but a leg ran without TLS")
        if not mode.is_on and any(tls):
            raise JobFailure(Status.DTE_NEGOTIATION_REFUSED, "the job was decided DTE Off but a leg ran TLS")
        return mode.is_on

    def _image(self, backup_id: str | None) -> ImageRecord:
        image = self.catalog.get_image(backup_id) if backup_id else None
        if image is None:
            raise JobFailure(Status.NO_ENTITY_FOUND, f"no image {backup_id} in the catalog of {self.name}")
        return image

    def _copy(self, backup_id: str, media: str | None) -> CopyRecord:
        copies = self.catalog.copies(backup_id)
        chosen = [c for c in copies if c.media_server == media] if media else [c for c in copies if c.primary] or copies
        if not chosen:
            where = f" on {media}" if media else ""
            raise JobFailure(Status.NO_ENTITY_FOUND, f"image {backup_id} has no copy{where}")
        return chosen[0]

    def _matches(self, backup_id: str, files: list[dict]) -> bool:
        recorded = {f.path: f.sha256 for f in self.catalog.files(backup_id)}
        return {f["path"]: f["sha256"] for f in files} == recorded

    def _result(self, job_id: int, req: JobRequest, outcome: Outcome, mode: DteMode, moved: dict, backup_id: str | None,
                copy: int | None, *, verified: bool | None = None, image_mode: DteMode | None = None) -> JobResult:
        return JobResult(job_id, req.op, 0, outcome.reason, decision=outcome.decision.value, dte_mode=mode.value,
                         backup_id=backup_id, copy=copy, bytes=moved.get("bytes", 0), tls=moved.get("tls"),
                         verified=verified, image_dte_mode=image_mode.value if image_mode else None,
                         media_server=req.target or req.media, copies=self._copies(backup_id))

    def _copies(self, backup_id: str | None) -> tuple[CopyInfo, ...]:
        if not backup_id:
            return ()
        return tuple(CopyInfo(c.copy_number, c.media_server, c.copy_dte_mode.value, c.hierarchical_dte_mode.value)
                     for c in self.catalog.copies(backup_id))
