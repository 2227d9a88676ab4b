"""MQTT brokers for the control plane: an in-process amqtt one and a Mosquitto subprocess.

Both listen on 127.0.0.1 only, on a free port unless told otherwise, and expose `url`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import structlog

if TYPE_CHECKING:
    from amqtt.broker import Broker

LOOPBACK = "127.0.0.1"
MQTT_SCHEME = "mqtt"

log = structlog.get_logger(__name__)


def parse_broker_url(url: str) -> tuple[str, int]:
    """Split `mqtt://host:port` into (host, port); anything else is a ValueError."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"broker URL must be a string like 'mqtt://127.0.0.1:1883', got {url!r}")
    parts = urlsplit(url)
    if parts.scheme != MQTT_SCHEME:
        raise ValueError(
            f"broker URL {url!r} must start with 'mqtt://' (TLS and websockets are not supported here)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"broker URL {url!r} must be just 'mqtt://host:port', nothing after the port")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has an invalid port: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host; expected 'mqtt://host:port'")
    # An implicit 1883 would hide typos in scenario files and CLI flags.
    if port is None or port == 0:
        raise ValueError(f"broker URL {url!r} needs an explicit port, e.g. 'mqtt://{parts.hostname}:1883'")
    return parts.hostname, port


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class _BrokerProcess:
    """What both brokers share: a port, a URL and the async-with protocol."""

    host: str = LOOPBACK

    def __init__(self, port: int = 0) -> None:
        # 0 means "pick a free one at start"; once picked it is kept, so stop() then
        # start() brings the broker back on the same port (clients reconnect to it).
        self.port = port

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("broker has no port yet: start it first")
        return f"{MQTT_SCHEME}://{self.host}:{self.port}"

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class EmbeddedBroker(_BrokerProcess):
    """An amqtt broker inside the current event loop; nothing to install."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._broker: Broker | None = None
        # amqtt logs every connection and packet at INFO; the bus logs what matters.
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        if self._broker is not None:
            return
        # Imported here: daemons that only parse a broker URL should not pay for amqtt.
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{self.port}"}},
            # Naming the plugins replaces amqtt's defaults, which add a $SYS publisher task
            # and packet loggers we do not want; anonymous auth must be listed or every
            # CONNECT is refused ("no plugin responded").
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = Broker(config)
        await broker.start()
        if not self.port:
            # Letting amqtt bind port 0 and reading the port back avoids the race of
            # probing for a free port and binding it later; amqtt has no public accessor.
            self.port = broker._servers["default"].instance.sockets[0].getsockname()[1]
        self._broker = broker
        log.debug("broker.started", kind="amqtt", url=self.url)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is None:
            return
        # amqtt 0.12's shutdown can wait forever on a client handler that is delivering a
        # QoS 1 message (a last will) to a connection it is closing. Cut every client
        # connection first, as a dying broker process would, then shut down, bounded.
        for _, handler in list(getattr(broker, "_sessions", {}).values()):
            writer = getattr(getattr(handler, "writer", None), "_writer", None)
            transport = getattr(writer, "transport", None)
            if transport is not None:
                transport.abort()
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=5)
        except TimeoutError:
            log.warning("broker.shutdown_timed_out", kind="amqtt", url=self.url)
            for server in getattr(broker, "_servers", {}).values():
                instance = getattr(server, "instance", None)
                if instance is not None:
                    instance.close()
        log.debug("broker.stopped", kind="amqtt", url=self.url)


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None; Debian puts it in /usr/sbin, often off PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class MosquittoBroker(_BrokerProcess):
    """The real `mosquitto` binary as a child process with a generated config file."""

    READY_TIMEOUT = 5.0
    PORT_ATTEMPTS = 3

    def __init__(self, port: int = 0, binary: str | None = None) -> None:
        super().__init__(port)
        self._fixed_port = port != 0
        self._binary = binary or find_mosquitto()
        self._process: asyncio.subprocess.Process | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @staticmethod
    def available() -> bool:
        return find_mosquitto() is not None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        if self.running:
            return
        if self._binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install -y mosquitto)")
        self._workdir = tempfile.TemporaryDirectory(prefix="fabric-mosquitto-")
        # A probed free port can be taken before mosquitto binds it; try a few.
        attempts = 1 if self._fixed_port else self.PORT_ATTEMPTS
        last_error: Exception | None = None
        for _ in range(attempts):
            if not self._fixed_port:
                self.port = _free_loopback_port()
            try:
                await self._launch(Path(self._workdir.name))
                log.debug("broker.started", kind="mosquitto", url=self.url, pid=self._process.pid)
                return
            except OSError as exc:
                last_error = exc
        self._workdir.cleanup()
        self._workdir = None
        raise OSError(f"mosquitto did not start: {last_error}") from last_error

    async def _launch(self, workdir: Path) -> None:
        config = workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        log_path = workdir / "mosquitto.log"
        with log_path.open("ab") as log_file:
            # The child keeps its own copy of the descriptor; a pipe could fill and stall it.
            process = await asyncio.create_subprocess_exec(
                self._binary, "-c", str(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )
        self._process = process
        deadline = time.monotonic() + self.READY_TIMEOUT
        while True:
            if process.returncode is not None:
                self._process = None
                raise OSError(f"mosquitto exited with {process.returncode}: {log_path.read_text().strip()}")
            try:
                _, writer = await asyncio.open_connection(LOOPBACK, self.port)
            except OSError:
                if time.monotonic() > deadline:
                    await self._terminate(process)
                    self._process = None
                    raise OSError(f"mosquitto not accepting on port {self.port} after {self.READY_TIMEOUT}s")
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return

    @staticmethod
    async def _terminate(process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=3)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await self._terminate(process)
            log.debug("broker.stopped", kind="mosquitto", url=self.url)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
