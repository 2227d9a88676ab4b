"""`fabric run`: bring a topology to life on live daemons and run its steps as real jobs.

The runner plays the administrator: it asks each domain's primary for jobs over MQTT,
changes settings the way nbseccmd / bpsetconfig / bpimage would, and injects faults.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from fabric.broker import EmbeddedBroker
from fabric.bus import Bus, BusError, Topics
from fabric.daemons.base import FAILED_KIND, Daemon, DaemonConfig, Route, direct_route
from fabric.daemons.client import Client
from fabric.daemons.media import MediaServer
from fabric.daemons.primary import Primary
from fabric.dte import Role
from fabric.jobs import JobRequest, JobResult, PolicyOperation
from fabric.model import (
    BackupKind,
    BackupStep,
    DuplicateStep,
    Expect,
    FaultKind,
    FaultStep,
    HealStep,
    ImageDteModeStep,
    ImportStep,
    MutateStep,
    PolicyStep,
    ReplicateStep,
    RestoreStep,
    Scenario,
    SetStep,
    Step,
    SyntheticStep,
    VerifyStep,
    step_domain,
)
from fabric.network import RelayNetwork
from fabric.pki import DomainCA
from fabric.status import Status

log = structlog.get_logger("fabric.run")


@dataclass
class StepReport:
    step: int
    op: str
    job_id: int | None = None
    status: int | None = None
    dte_mode: str | None = None
    backup_id: str | None = None
    copy: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    tls: dict | None = None
    verified: bool | None = None
    expect: str | None = None  # met | unmet | None
    reason: str = ""
    decision: str | None = None
    attempts: int | None = None
    image_dte_mode: str | None = None
    copies: list[dict] = field(default_factory=list)
    children: list[dict] = field(default_factory=list)  # a policy run's child jobs
    unmet: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class RunReport:
    scenario: str
    state_dir: str
    steps: list[StepReport]
    seconds: float = 0.0
    catalogs: dict[str, str] = field(default_factory=dict)  # domain -> catalog file

    @property
    def ok(self) -> bool:
        return all(s.expect != "unmet" for s in self.steps)

    def as_json(self) -> dict:
        return {"scenario": self.scenario, "ok": self.ok, "state_dir": self.state_dir, "seconds": round(self.seconds, 3),
                "catalogs": self.catalogs, "steps": [s.as_json() for s in self.steps]}


def check_expect(expect: Expect | None, report: StepReport) -> tuple[str | None, list[str]]:
    if expect is None:
        return None, []
    unmet = []
    if expect.status is not None and report.status != expect.status:
        unmet.append(f"status {report.status}, expected {expect.status}")
    if expect.fails is not None and (report.status != 0) != expect.fails:
        unmet.append("the job succeeded, expected it to fail" if expect.fails else f"the job failed ({report.status}), expected success")
    if expect.dte is not None and report.dte_mode != expect.dte.value:
        unmet.append(f"DTE mode {report.dte_mode or 'not set'}, expected {expect.dte.value}")
    if expect.verified is not None and report.verified != expect.verified:
        unmet.append(f"verified {report.verified}, expected {expect.verified}")
    return ("unmet" if unmet else "met"), unmet


def domain_cas(scenario: Scenario, state_dir: Path) -> dict[str, DomainCA]:
    """Each domain's CA under <state>/pki/<domain>, made on first use."""
    cas = {}
    for domain in scenario.domains:
        folder = state_dir / "pki" / domain
        cas[domain] = DomainCA.load(folder) if (folder / "ca.pem").exists() else DomainCA.create(domain, folder)
    return cas


def primary_of(scenario: Scenario, domain: str) -> str:
    return next(h.name for h in scenario.hosts.values() if h.domain == domain and h.role is Role.PRIMARY)


def build_daemon(scenario: Scenario, host: str, state_dir: Path, broker_url: str, cas: dict[str, DomainCA],
                 route: Route = direct_route, resume: bool = False) -> Daemon:
    """The daemon for one host of the topology, the same in `fabric run` and `fabric daemon`.

    `resume`: a restart after a crash within a run; a primary then keeps the settings its
    catalog has, instead of starting from the topology's."""
    spec = scenario.hosts[host]
    domain = scenario.domains[spec.domain]
    partners = {d.name for d in scenario.domains.values() if spec.domain in d.trusts} | set(domain.trusts)
    # Every host since 8.1 has a host certificate (D-SECCOMM); whether a leg uses it is
    # the DTE decision's business, not the certificate's.
    creds = cas[spec.domain].issue(spec.name, state_dir / "pki" / spec.domain / "hosts")
    config = DaemonConfig(
        name=spec.name, role=spec.role, domain=spec.domain, version=spec.version,
        primary=primary_of(scenario, spec.domain), state_dir=state_dir / "hosts" / spec.name, creds=creds,
        dte_mode=spec.dte_mode, trusted_cas=tuple(cas[p].cert_path for p in sorted(partners)),
        seed=scenario.seed, data_files=spec.data.files, data_size=spec.data.size, data_path=spec.data.path,
    )
    if spec.role is Role.PRIMARY:
        return Primary(config, broker_url, route, settings=None if resume else domain.settings, retry=domain.retry)
    if spec.role is Role.MEDIA:
        return MediaServer(config, broker_url, route)
    return Client(config, broker_url, route)


class HostProcess:
    """A daemon in its own OS process (`fabric daemon`): a crash is a real SIGKILL."""

    def __init__(self, scenario: Scenario, host: str, state_dir: Path, broker_url: str):
        self.command = [sys.executable, "-m", "fabric.cli", "daemon", scenario.path, host,
                        "--broker", broker_url, "--state", str(state_dir)]
        self.host = host
        self.process: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        command = self.command + (["--resume"] if self.process is not None else [])  # a restart
        self.process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

    async def crash(self) -> None:
        if self.running:
            self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        if self.running:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                await self.crash()

    async def failure(self) -> str:
        """What a process that died at start said on stderr (its last line)."""
        if self.process is None or self.process.stderr is None:
            return ""
        text = (await self.process.stderr.read()).decode(errors="replace").strip()
        return text.splitlines()[-1] if text else f"exit status {self.process.returncode}"


class Fabric:
    """The live topology: broker, one primary per domain, media servers and clients."""

    def __init__(self, scenario: Scenario, state_dir: Path, broker_url: str | None = None, capture: bool = False,
                 relays: bool | None = None, on_progress: Callable[[int, int], None] | None = None,
                 processes: bool = False):
        self.on_progress = on_progress
        self.processes = processes
        self.scenario = scenario
        self.state_dir = state_dir
        self.external_broker = broker_url
        self.broker: EmbeddedBroker | None = None
        self.broker_url = broker_url or ""
        # Relays cost a copy per chunk; put them in the path only when something needs
        # them: a fault step, or a capture of the wire.
        needs_relays = capture or any(isinstance(s, FaultStep) and (s.kind is FaultKind.CUT or s.after_bytes)
                                      for s in scenario.steps)
        self.network = RelayNetwork(capture=capture) if (needs_relays if relays is None else relays) else None
        if processes and self.network is not None:
            # Relays live in this process; a daemon in another process routes straight to
            # its peer, so wire capture and link faults need the in-process fabric.
            raise ValueError("link faults, crash-after faults and --capture need the in-process fabric (no --processes)")
        self.daemons: dict[str, Daemon | HostProcess] = {}
        self.bus: Bus | None = None
        self.aliases: dict[str, str] = {}  # image alias -> backup id (kept by an import)
        self.alias_domains: dict[str, list[str]] = {}  # image alias -> domains holding it, home first

    @property
    def route(self) -> Route:
        return self.network.route if self.network else direct_route

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.external_broker:
            self.broker = EmbeddedBroker()
            await self.broker.start()
            self.broker_url = self.broker.url
        cas = domain_cas(self.scenario, self.state_dir)
        self.bus = Bus(self.broker_url, client_id="fabric-run", host="fabric-run", log_context={"role": "admin"})
        await self.bus.start()
        for role in (Role.PRIMARY, Role.MEDIA, Role.CLIENT):  # primaries first: the others register
            for spec in self.scenario.hosts_with_role(role):
                if self.processes:
                    daemon = HostProcess(self.scenario, spec.name, self.state_dir, self.broker_url)
                else:
                    daemon = build_daemon(self.scenario, spec.name, self.state_dir, self.broker_url, cas, self.route)
                await daemon.start()
                self.daemons[spec.name] = daemon
        if self.processes:
            await self.wait_registered(list(self.daemons))
        if self.on_progress:
            for domain in self.scenario.domains:
                await self.bus.subscribe(Topics(domain=domain).events(), self._progress_event)
        log.info("fabric up", hosts=len(self.daemons), broker=self.broker_url)

    async def wait_registered(self, hosts: list[str], timeout: float = 60.0) -> None:
        """Until every host is up and known to its domain's primary (daemons in processes)."""
        deadline = time.monotonic() + timeout
        pending = set(hosts)
        restarts = dict.fromkeys(hosts, 0)
        while pending:
            for name in sorted(pending):
                daemon = self.daemons[name]
                if isinstance(daemon, HostProcess) and not daemon.running:
                    # As a service manager would (Restart=on-failure): a daemon that died
                    # while starting, e.g. refused by a broker still closing its old session,
                    # gets a few more tries before the run gives up.
                    reason = await daemon.failure()
                    if restarts[name] >= 3:
                        raise RuntimeError(f"the daemon for {name} exited: {reason}")
                    restarts[name] += 1
                    log.warning("daemon exited while starting; restarting", host=name, reason=reason)
                    await asyncio.sleep(0.2 * restarts[name])
                    await daemon.start()
            for domain in {self.scenario.hosts[h].domain for h in pending}:
                try:
                    online = set((await self.ask(domain, "hosts", {}, timeout=2))["online"])
                except (BusError, StepFailed):
                    continue
                primary = primary_of(self.scenario, domain)
                pending -= {h for h in pending if h in online or (h == primary)}
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"hosts did not come up in {timeout:.0f} s: {', '.join(sorted(pending))}")
            if pending:
                await asyncio.sleep(0.1)

    async def _progress_event(self, message) -> None:
        if message.kind == "progress":
            self.on_progress(int(message.body.get("job_id", 0)), int(message.body.get("bytes", 0)))

    def primary_of(self, domain: str) -> str:
        return primary_of(self.scenario, domain)

    async def stop(self) -> None:
        if self.bus:
            await self.bus.stop()
        for daemon in reversed(list(self.daemons.values())):
            if daemon.running:
                await daemon.stop()
        if self.network:
            await self.network.close()
        if self.broker:
            await self.broker.stop()

    # -- asking a primary --------------------------------------------------------------

    async def ask(self, domain: str, kind: str, body: dict, timeout: float = 3600.0) -> dict:
        reply = await self.bus.request(Topics(domain=domain).cmd(self.primary_of(domain)), kind, body, timeout=timeout)
        if reply.kind == FAILED_KIND:
            raise StepFailed(reply.body.get("status", 1), reply.body.get("reason", ""))
        return reply.body

    # -- steps -------------------------------------------------------------------------

    async def run_step(self, step: Step) -> StepReport:
        report = StepReport(step.index, step.op)
        try:
            if isinstance(step, (SetStep, ImageDteModeStep, MutateStep, FaultStep, HealStep)):
                report.reason = await self._admin_step(step)
            else:
                self._job_report(report, await self._job_step(step))
        except StepFailed as failure:
            report.status, report.reason = failure.status, failure.reason
        except BusError as exc:
            # The control plane itself is down: the job could not even be submitted.
            report.status, report.reason = int(Status.CANNOT_CONNECT), f"the control plane is unavailable: {exc}"
        report.expect, report.unmet = check_expect(step.expect, report)
        return report

    def _job_report(self, report: StepReport, result: JobResult) -> None:
        for name in ("job_id", "status", "dte_mode", "backup_id", "copy", "bytes", "seconds", "tls", "verified", "reason",
                     "decision", "attempts", "image_dte_mode"):
            setattr(report, name, getattr(result, name))
        report.copies = [asdict(c) for c in result.copies]
        if result.children:
            # A parent job has no DTE mode of its own (§6.9); the step shows its backup's.
            report.children = [c.as_json() for c in result.children]
            report.dte_mode, report.tls = result.children[0].dte_mode, result.children[0].tls

    async def _job_step(self, step: Step) -> JobResult:
        hosts = self.scenario.hosts
        if isinstance(step, BackupStep):
            domain = hosts[step.media].domain
            request = JobRequest("backup", step.index, client=step.client, media=step.media,
                                 incremental=step.kind is BackupKind.INCREMENTAL, policy_type=step.policy_type.value)
        elif isinstance(step, PolicyStep):
            policy = self.scenario.policies[step.policy]
            domain = hosts[policy.media].domain
            operations = tuple(PolicyOperation(op.kind.value, op.to, hosts[op.to].domain, self.primary_of(hosts[op.to].domain))
                               for op in policy.operations)
            request = JobRequest("policy", step.index, client=policy.client, media=policy.media, policy=policy.name,
                                 incremental=step.kind is BackupKind.INCREMENTAL, policy_type=policy.policy_type.value,
                                 operations=operations)
        else:
            image = getattr(step, "image", None) or step.images[0]
            if image not in self.aliases:
                raise StepFailed(int(Status.NO_ENTITY_FOUND), f"image {image} does not exist: the step that should have made it failed")
            backup_id = self.aliases[image]
            domain = step_domain(self.scenario, step, self.alias_domains[image])
            if isinstance(step, RestoreStep):
                request = JobRequest("restore", step.index, client=step.to, media=step.media, backup_id=backup_id)
            elif isinstance(step, DuplicateStep):
                request = JobRequest("duplicate", step.index, media=step.media, target=step.to, backup_id=backup_id)
            elif isinstance(step, VerifyStep):
                request = JobRequest("verify", step.index, media=step.media, backup_id=backup_id)
            elif isinstance(step, ReplicateStep):
                request = JobRequest("replicate", step.index, media=step.media, target=step.to,
                                     target_domain=hosts[step.to].domain, backup_id=backup_id)
            elif isinstance(step, ImportStep):
                request = JobRequest("import", step.index, media=step.media, backup_id=backup_id)
            elif isinstance(step, SyntheticStep):
                missing = [a for a in step.images if a not in self.aliases]
                if missing:
                    raise StepFailed(int(Status.NO_ENTITY_FOUND), f"image {missing[0]} does not exist")
                request = JobRequest("synthetic", step.index, target=step.media, images=tuple(self.aliases[a] for a in step.images))
            else:
                raise AssertionError(f"no job for {step.op}")
        result = JobResult.from_json(await self.ask(domain, "run_job", request.as_json()))
        alias = getattr(step, "alias", None)
        if result.status == 0 and alias:
            self.aliases[alias], self.alias_domains[alias] = result.backup_id, [domain]
        if result.status == 0 and isinstance(step, ImportStep):
            self.alias_domains[step.image].append(domain)
        if isinstance(step, PolicyStep) and alias and result.backup_id and result.children[0].status == 0:
            self.aliases[alias] = result.backup_id
            self.alias_domains[alias] = [domain] + [hosts[c.media_server].domain for c in result.children
                                                    if c.op == "import" and c.status == 0]
        return result

    async def _admin_step(self, step: Step) -> str:
        actor = f"scenario step {step.index}"
        if isinstance(step, SetStep) and step.host:
            body = {"host": step.host, "actor": actor, "dte_mode": step.dte_mode.value if step.dte_mode else None,
                    "version": str(step.version) if step.version else None}
            await self.ask(self.scenario.hosts[step.host].domain, "set_host", body)
            return f"{step.host}: " + ", ".join(f"{k} {v}" for k, v in body.items() if k in ("dte_mode", "version") and v)
        if isinstance(step, SetStep):
            domain = step.domain or next(iter(self.scenario.domains))
            body = {"actor": actor, "global_mode": step.global_mode.value if step.global_mode else None,
                    "ignore_image_mode": step.ignore_image_mode.value if step.ignore_image_mode else None}
            now = await self.ask(domain, "set_domain", body)
            return f"domain {domain}: global {now['global_mode']}, DTE_IGNORE_IMAGE_MODE {now['ignore_image_mode']}"
        if isinstance(step, ImageDteModeStep):
            if step.image not in self.aliases:
                raise StepFailed(int(Status.NO_ENTITY_FOUND), f"image {step.image} does not exist")
            changed = await self.ask(step_domain(self.scenario, step, self.alias_domains[step.image]), "set_image_dte_mode",
                                     {"backup_id": self.aliases[step.image], "mode": step.mode.value, "actor": actor})
            return f"image {step.image}: DTE mode {changed['before']} -> {changed['after']}"
        if isinstance(step, MutateStep):
            domain = self.scenario.hosts[step.client].domain
            reply = await self.bus.request(Topics(domain=domain).cmd(step.client), "mutate", {"files": step.files})
            return f"{step.client}: changed {len(reply.body['changed'])} files"
        if isinstance(step, FaultStep):
            return await self._fault(step)
        if isinstance(step, HealStep):
            return await self._heal(step)
        raise AssertionError(step)

    async def _fault(self, step: FaultStep) -> str:
        if step.kind is FaultKind.CRASH and step.after_bytes:
            daemon = self.daemons[step.host]
            self.network.break_host_after(step.host, step.after_bytes, lambda: asyncio.ensure_future(daemon.crash()))
            return f"{step.host} will crash after {step.after_bytes} bytes of its next transfer"
        if step.kind is FaultKind.CRASH:
            await self.daemons[step.host].crash()
            return f"{step.host} crashed"
        if step.kind is FaultKind.DISK_FULL:
            await self.inject(step.host, disk_full=True)
            return f"{step.host}: disk storage unit full"
        if step.kind is FaultKind.VOLUME_DOWN:
            await self.inject(step.host, volume_down=True)
            return f"{step.host}: disk volume down"
        if step.kind is FaultKind.CUT:
            await self.network.cut(*step.link, after=step.after_bytes)
            return f"link {step.link[0]}<->{step.link[1]} cut" + (f" after {step.after_bytes} bytes" if step.after_bytes else "")
        if step.kind is FaultKind.BROKER_DOWN:
            if not self.broker:
                raise StepFailed(1, "broker_down needs the embedded broker (no --broker)")
            await self.broker.stop()
            return "broker stopped"
        raise AssertionError(step.kind)

    async def _heal(self, step: HealStep) -> str:
        if step.host:
            daemon = self.daemons[step.host]
            if not daemon.running:
                await daemon.start()
                spec = self.scenario.hosts[step.host]
                # A primary back from a crash must relearn its hosts before the next job.
                again = [h.name for h in self.scenario.hosts.values() if h.domain == spec.domain and self.daemons[h.name].running] \
                    if spec.role is Role.PRIMARY else [step.host]
                await self.wait_registered(again)
            if self.scenario.hosts[step.host].role is Role.MEDIA:
                await self.inject(step.host, disk_full=False, volume_down=False)
            return f"{step.host} back"
        if step.link:
            await self.network.heal(*step.link)
            return f"link {step.link[0]}<->{step.link[1]} healed"
        await self.broker.start()
        await asyncio.wait_for(self.bus.connected.wait(), 15)
        # Every daemon reconnects by itself and registers again when its primary is back.
        await self.wait_registered([name for name, daemon in self.daemons.items() if daemon.running])
        return "broker back"

    async def inject(self, media: str, **faults: bool) -> None:
        """Storage faults go to the media server over the control plane, as to any process."""
        reply = await self.bus.request(Topics(domain=self.scenario.hosts[media].domain).cmd(media), "inject_fault", faults)
        if reply.kind == FAILED_KIND:
            raise StepFailed(reply.body.get("status", 1), reply.body.get("reason", ""))


class StepFailed(Exception):
    def __init__(self, status: int, reason: str):
        self.status, self.reason = int(status), reason
        super().__init__(reason)


async def run_scenario(scenario: Scenario, state_dir: Path, *, broker_url: str | None = None, capture: bool = False,
                       on_step: Callable[[Step, StepReport | None], None] | None = None,
                       on_progress: Callable[[int, int], None] | None = None,
                       keep: Callable[[Fabric], object] | None = None, processes: bool = False) -> RunReport:
    """Run every step in order on a live fabric; always tears it down again."""
    started = time.monotonic()
    fabric = Fabric(scenario, state_dir, broker_url, capture, on_progress=on_progress, processes=processes)
    reports: list[StepReport] = []
    try:
        await fabric.start()
        for step in scenario.steps:
            if on_step:
                on_step(step, None)
            report = await fabric.run_step(step)
            reports.append(report)
            if on_step:
                on_step(step, report)
        if keep:
            await keep(fabric)
    finally:
        await fabric.stop()
    catalogs = {d: str(state_dir / "hosts" / fabric.primary_of(d) / "catalog.sqlite") for d in scenario.domains}
    return RunReport(scenario.name, str(state_dir), reports, time.monotonic() - started, catalogs)
