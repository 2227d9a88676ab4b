"""What every fabric daemon shares: its bus, its leg listener, and the commands it answers.

A daemon is an asyncio object with start()/stop()/crash(); `fabric run` runs several in one
loop, `fabric daemon` runs one per process. Commands arrive on `<domain>/<host>/cmd`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from fabric.bus import Bus, BusError, BusTimeout, BusUnavailable, Message, RemoteError, Topics
from fabric.channel import (
    ChannelError,
    ChannelTimeout,
    ConnectFailed,
    ConnectionBroken,
    Leg,
    LegHeader,
    LegRefused,
    LegServer,
    TlsFailed,
    open_leg,
    serve_legs,
)
from fabric.datastream import StreamError
from fabric.dte import ClientMode, DteMode, MediaMode, Role, Version, Host
from fabric.pki import HostCredentials
from fabric.status import Status
from fabric.storage import StorageDown, StorageError, StorageFull

FAILED_KIND = "failed"
OK_KIND = "ok"
LEG_WAIT_S = 30.0  # how long a receiver waits for an expected leg to connect


class JobFailure(Exception):
    """A job leg failed with a NetBackup status; travels over the bus as a `failed` reply."""

    def __init__(self, status: Status | int, reason: str):
        self.status = int(status)
        self.reason = reason
        super().__init__(f"status {self.status}: {reason}")


def failure_of(exc: BaseException, peer: str = "", peer_is_client: bool = False) -> JobFailure:
    """The NetBackup status a lower-layer error stands for (reference §11.6)."""
    if isinstance(exc, JobFailure):
        return exc
    if isinstance(exc, LegRefused):
        return JobFailure(Status.DTE_NEGOTIATION_REFUSED, f"{peer} refused the data channel: {exc.reason}")
    if isinstance(exc, TlsFailed):
        return JobFailure(Status.TLS_HANDSHAKE_FAILED, f"TLS handshake with {peer} failed: {exc}")
    if isinstance(exc, ConnectFailed):
        status = Status.CANT_CONNECT_TO_CLIENT if peer_is_client else Status.CANNOT_CONNECT
        return JobFailure(status, f"cannot connect to {peer}: {exc}")
    if isinstance(exc, ChannelTimeout):
        return JobFailure(Status.CONNECTION_TIMED_OUT, f"network connection to {peer} timed out: {exc}")
    if isinstance(exc, (ConnectionBroken, ConnectionError)):
        return JobFailure(Status.CONNECTION_BROKEN, f"network connection with {peer} broken: {exc}")
    if isinstance(exc, ChannelError):
        return JobFailure(Status.CONNECTION_BROKEN, f"data channel with {peer} failed: {exc}")
    if isinstance(exc, StorageFull):
        return JobFailure(Status.MEDIA_WRITE_ERROR, str(exc))
    if isinstance(exc, StorageDown):
        return JobFailure(Status.DISK_VOLUME_DOWN, str(exc))
    if isinstance(exc, StorageError):
        return JobFailure(Status.MEDIA_READ_ERROR, str(exc))
    if isinstance(exc, StreamError):
        return JobFailure(Status.FILE_READ_FAILED, str(exc))
    if isinstance(exc, OSError):
        return JobFailure(Status.FILE_WRITE_FAILED, f"{exc.strerror or exc}")
    if isinstance(exc, (BusTimeout, BusUnavailable)):
        status = Status.CANT_CONNECT_TO_CLIENT if peer_is_client else Status.DISK_STORAGE_SERVER_DOWN
        return JobFailure(status, f"{peer} does not answer on the control plane: {exc}")
    if isinstance(exc, RemoteError):
        return JobFailure(Status.PARTIAL, f"{peer}: {exc}")
    return JobFailure(Status.PARTIAL, f"{type(exc).__name__}: {exc}")


@dataclass
class DaemonConfig:
    """Everything a daemon needs to start, from the topology (or `fabric daemon` flags)."""

    name: str
    role: Role
    domain: str
    version: Version
    primary: str
    state_dir: Path  # this host's own folder
    creds: HostCredentials | None
    dte_mode: ClientMode | MediaMode | None = None
    trusted_cas: tuple[Path, ...] = ()  # other domains' CAs (replication)
    seed: int = 0
    data_files: int = 8
    data_size: int = 1 << 20
    data_path: str | None = None

    def as_dte_host(self) -> Host:
        return Host(self.name, self.role, self.version, self.dte_mode)


# A route turns (sender, receiver, receiver's real port) into where to connect: the
# receiver itself, or a fault relay in between. Daemons never know which.
Route = Callable[[str, str, int], Awaitable[tuple[str, int]]]


async def direct_route(sender: str, receiver: str, port: int) -> tuple[str, int]:
    return "127.0.0.1", port


PROGRESS_EVERY = 8 << 20


class ProgressLeg:
    """A leg that reports how many payload bytes it has sent, every PROGRESS_EVERY bytes."""

    def __init__(self, leg: Leg, report: Callable[[int], None]):
        self._leg = leg
        self._report = report
        self._next = PROGRESS_EVERY
        self.sent = 0

    async def send_frame(self, payload: bytes) -> None:
        await self._leg.send_frame(payload)
        self.sent += len(payload)
        if self.sent >= self._next:
            self._next = self.sent + PROGRESS_EVERY
            self._report(self.sent)

    async def send_file(self, f, count: int) -> None:
        await self._leg.send_file(f, count)
        self.sent += count
        if self.sent >= self._next:
            self._next = self.sent + PROGRESS_EVERY
            self._report(self.sent)

    def __getattr__(self, name: str):
        return getattr(self._leg, name)


@dataclass
class Expectation:
    """A leg the primary told this host to expect, and what to do with it."""

    header_dte: DteMode
    sender: str
    handler: Callable[[Leg], Awaitable[dict]]
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class Daemon:
    """The shared machinery; subclasses add `cmd_<kind>` coroutines."""

    role: Role = Role.CLIENT

    def __init__(self, config: DaemonConfig, broker_url: str, route: Route = direct_route):
        self.config = config
        self.name = config.name
        self.broker_url = broker_url
        self.route = route
        self.topics = Topics(domain=config.domain)
        self.log = structlog.get_logger(f"fabric.{config.role.value}").bind(host=config.name, role=config.role.value)
        self.bus: Bus | None = None
        self.legs: LegServer | None = None
        self.expected: dict[tuple[int, str], Expectation] = {}
        self.running = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        await self.on_start()
        self.bus = Bus(self.broker_url, client_id=f"{self.config.domain}.{self.name}", domain=self.config.domain,
                       host=self.name, log_context={"host": self.name, "role": self.role.value})
        await self.bus.start()
        await self.bus.subscribe(self.topics.cmd(self.name), self.on_command)
        self.legs = await serve_legs(self.name, self.config.creds, self.expect_leg, self.handle_leg,
                                     self.config.as_dte_host().max_tls, extra_cas=self.config.trusted_cas)
        self.running = True
        if self.role is not Role.PRIMARY:
            # A primary that restarts says so; register again so it learns its hosts anew.
            # (Not its retained status topic: amqtt 0.12 hangs in shutdown delivering a
            # will to subscribers whose connections it is closing.)
            await self.bus.subscribe(self.topics.announcements(), self.on_primary_status)
            try:
                await self.announce()
            except BusError as exc:
                self.log.warning("primary not reachable yet; will register when it comes online",
                                 primary=self.config.primary, error=str(exc))
        self.log.info("daemon started", version=str(self.config.version), port=self.legs.port)

    async def on_primary_status(self, message: Message) -> None:
        if self.running and message.kind == "primary_online":
            try:
                await self.announce()
            except BusError as exc:
                self.log.warning("could not register with the primary", error=str(exc))

    async def on_start(self) -> None:
        """Subclass hook: open storage, catalogs, datasets."""

    async def announce(self) -> None:
        """Tell the domain's primary who we are (version, DTE mode, data port)."""
        if self.role is Role.PRIMARY:
            return
        await self.bus.request(self.topics.cmd(self.config.primary), "register", self.describe(), timeout=10)

    def describe(self) -> dict:
        mode = self.config.dte_mode.value if self.config.dte_mode else None
        return {"name": self.name, "role": self.role.value, "version": str(self.config.version), "dte_mode": mode,
                "domain": self.config.domain, "port": self.legs.port if self.legs else None}

    async def stop(self) -> None:
        self.running = False
        await self._close_legs()
        if self.bus:
            await self.bus.stop()
            self.bus = None
        await self.on_stop()
        self.log.info("daemon stopped")

    async def crash(self) -> None:
        """Die without goodbye: legs cut, the broker publishes our last will."""
        self.running = False
        await self._close_legs()
        if self.bus:
            await self.bus.abort()
            self.bus = None
        await self.on_stop()
        self.log.warning("daemon crashed")

    async def on_stop(self) -> None:
        pass

    async def _close_legs(self) -> None:
        for expectation in self.expected.values():
            if not expectation.done.done():
                expectation.done.set_exception(JobFailure(Status.CONNECTION_BROKEN, f"{self.name} went down"))
                expectation.done.exception()  # marked retrieved: nobody may be waiting
        self.expected.clear()
        if self.legs:
            await self.legs.close()
            self.legs = None

    # -- commands ----------------------------------------------------------------------

    async def on_command(self, message: Message) -> Message | None:
        handler = getattr(self, f"cmd_{message.kind}", None)
        if handler is None:
            return message.reply("error", {"reason": f"{self.name} has no command {message.kind!r}"})
        try:
            result = await handler(message.body)
        except Exception as exc:  # storage, stream and channel errors are job statuses here
            failure = failure_of(exc, self.name)
            if not isinstance(exc, JobFailure):
                self.log.warning("command failed", kind=message.kind, status=failure.status, reason=failure.reason)
            return message.reply(FAILED_KIND, {"status": failure.status, "reason": failure.reason})
        return message.reply(OK_KIND, result or {})

    async def call(self, host: str, kind: str, body: dict[str, Any], timeout: float = 30.0, *,
                   domain: str | None = None, peer_is_client: bool = False) -> dict:
        """A request to another daemon; its `failed` reply becomes a JobFailure here."""
        topics = self.topics if domain is None else Topics(domain=domain)
        try:
            reply = await self.bus.request(topics.cmd(host), kind, body, timeout=timeout)
        except BusError as exc:
            raise failure_of(exc, host, peer_is_client) from None
        if reply.kind == FAILED_KIND:
            raise JobFailure(reply.body.get("status", Status.PARTIAL), reply.body.get("reason", ""))
        return reply.body

    # -- data legs ---------------------------------------------------------------------

    def expect(self, job_id: int, leg: str, dte: DteMode, sender: str, handler: Callable[[Leg], Awaitable[dict]]) -> Expectation:
        expectation = Expectation(dte, sender, handler)
        self.expected[(job_id, leg)] = expectation
        return expectation

    async def expect_leg(self, header: LegHeader) -> str | None:
        """Accept only the leg the primary announced, with the DTE mode it decided."""
        expectation = self.expected.get((header.job_id, header.leg))
        if expectation is None:
            return f"{self.name} expects no {header.leg} leg for job {header.job_id}"
        if header.sender != expectation.sender:
            return f"job {header.job_id} expects its data from {expectation.sender}, not {header.sender}"
        if header.dte is not expectation.header_dte:
            # The one rule of the data channel: a peer cannot talk a job down to plaintext
            # (nor up: both ends follow the primary's decision).
            return f"job {header.job_id} was decided DTE {expectation.header_dte.value}; the sender asked for {header.dte.value}"
        if expectation.connected.is_set():
            return f"job {header.job_id} {header.leg} leg is already connected"
        return None

    async def handle_leg(self, leg: Leg) -> None:
        key = (leg.header.job_id, leg.header.leg)
        expectation = self.expected.get(key)
        if expectation is None or expectation.done.done():
            return
        expectation.connected.set()
        try:
            result = await expectation.handler(leg)
            if leg.tls:
                result["tls"] = {"version": leg.tls.version, "cipher": leg.tls.cipher}
            if not expectation.done.done():
                expectation.done.set_result(result)
        except Exception as exc:  # every failure of a leg is a job status, never a crash
            failure = failure_of(exc, leg.header.sender)
            self.log.warning("leg failed", job_id=leg.header.job_id, status=failure.status, reason=failure.reason)
            if not expectation.done.done():
                expectation.done.set_exception(failure)

    async def leg_result(self, job_id: int, leg: str, timeout: float) -> dict:
        expectation = self.expected.get((job_id, leg))
        if expectation is None:
            raise JobFailure(Status.PARTIAL, f"{self.name} expects no {leg} leg for job {job_id}")
        connected = asyncio.ensure_future(expectation.connected.wait())
        try:
            await asyncio.wait({connected, expectation.done}, timeout=LEG_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
            if not expectation.connected.is_set() and not expectation.done.done():
                raise JobFailure(Status.CONNECTION_TIMED_OUT, f"no {leg} leg for job {job_id} reached {self.name} in {LEG_WAIT_S:.0f} s")
            async with asyncio.timeout(timeout):
                return await asyncio.shield(expectation.done)
        except TimeoutError:
            raise JobFailure(Status.CONNECTION_TIMED_OUT, f"the {leg} leg of job {job_id} did not finish in {timeout:.0f} s") from None
        finally:
            connected.cancel()
            if not expectation.done.done():  # so whoever prepared storage for it cleans up
                expectation.done.set_exception(JobFailure(Status.CONNECTION_TIMED_OUT, "abandoned"))
                expectation.done.exception()
            self.expected.pop((job_id, leg), None)

    async def cmd_abort_leg(self, body: dict) -> dict:
        expectation = self.expected.pop((body["job_id"], body["leg"]), None)
        if expectation and not expectation.done.done():
            expectation.done.set_exception(JobFailure(Status.TERMINATED_BY_ADMIN, "aborted"))
            expectation.done.exception()
        return {}

    async def cmd_leg_result(self, body: dict) -> dict:
        return await self.leg_result(body["job_id"], body["leg"], body.get("timeout", 600))

    def publish_progress(self, job_id: int, leg: str, moved: int) -> None:
        """Tell whoever watches the domain's events how far a leg is (fire and forget)."""
        if self.bus is not None and self.bus.connected.is_set():
            task = asyncio.ensure_future(self.bus.publish(self.topics.events(), "progress",
                                                          {"job_id": job_id, "leg": leg, "bytes": moved, "host": self.name}))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # progress may be lost, never raised

    async def send_leg(self, job_id: int, leg: str, dte: DteMode, receiver: str, port: int,
                       send: Callable[[Leg], Awaitable[int]], *, receiver_is_client: bool = False) -> dict:
        """Open a leg to `receiver` and run `send` on it; returns bytes, TLS and seconds."""
        started = time.monotonic()
        header = LegHeader(job_id=job_id, leg=leg, dte=dte, sender=self.name, receiver=receiver)
        host, real_port = await self.route(self.name, receiver, port)
        try:
            opened = await open_leg(host, real_port, header, self.config.creds, self.config.as_dte_host().max_tls,
                                    extra_cas=self.config.trusted_cas)
        except Exception as exc:
            raise failure_of(exc, receiver, receiver_is_client) from None
        try:
            sent = await send(ProgressLeg(opened, lambda moved: self.publish_progress(job_id, leg, moved)))
        except Exception as exc:
            opened.abort()
            raise failure_of(exc, receiver, receiver_is_client) from None
        await opened.close()
        tls = {"version": opened.tls.version, "cipher": opened.tls.cipher} if opened.tls else None
        return {"bytes": sent, "tls": tls, "seconds": time.monotonic() - started}
