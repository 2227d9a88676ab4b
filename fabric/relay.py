"""A fault relay: a real TCP proxy on 127.0.0.1 between a leg's opener and its receiver.

It records the bytes on the wire in each direction (proof of encryption) and cuts, breaks or delays the link on demand.
"""

from __future__ import annotations

import asyncio
from typing import Callable
import enum

import structlog

log = structlog.get_logger(__name__)

LISTEN_HOST = "127.0.0.1"
CHUNK = 256 * 1024
STREAM_LIMIT = 1024 * 1024
WRITE_HIGH_WATER = 4 * 1024 * 1024
DEFAULT_CAPTURE_LIMIT = 64 * 1024 * 1024


class Direction(enum.Enum):
    UP = "up"  # opener -> receiver
    DOWN = "down"  # receiver -> opener


class _Link:
    """One proxied connection: the opener's side and the receiver's side."""

    def __init__(self, opener: asyncio.StreamWriter, receiver: asyncio.StreamWriter) -> None:
        self.opener = opener
        self.receiver = receiver

    def abort(self) -> None:
        self.opener.transport.abort()
        self.receiver.transport.abort()


class Relay:
    """Forwards every connection made to `port` to the target, faults permitting."""

    def __init__(self, target_host: str, target_port: int, capture: bool, capture_limit: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._capture = capture
        self._capture_limit = capture_limit
        self._captured = {Direction.UP: bytearray(), Direction.DOWN: bytearray()}
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._is_cut = False
        self._upstream_budget: int | None = None
        self._on_break: Callable[[], None] | None = None
        self._delay = 0.0

    @classmethod
    async def start(
        cls,
        target_host: str,
        target_port: int,
        *,
        capture: bool = True,
        capture_limit: int = DEFAULT_CAPTURE_LIMIT,
    ) -> "Relay":
        """Listen on a free port; keep the first `capture_limit` bytes of each direction."""
        relay = cls(target_host, target_port, capture, capture_limit)
        await relay._listen()
        log.info("relay started", port=relay.port, target=f"{target_host}:{target_port}")
        return relay

    def captured(self, direction: str | Direction = Direction.UP) -> bytes:
        """Every byte that crossed the relay in `direction`, over all connections, in order."""
        return bytes(self._captured[Direction(direction)])

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until heal()."""
        self._stop()
        log.info("relay cut", port=self.port)

    async def heal(self) -> None:
        """Clear every fault (cut, cut_after, delay) and accept connections again, on the same port."""
        self._is_cut = False
        self._upstream_budget = None
        self._delay = 0.0
        if self._server is None:
            await self._listen()
        log.info("relay healed", port=self.port)

    def cut_after(self, nbytes: int, on_break: Callable[[], None] | None = None) -> None:
        """Forward `nbytes` more bytes upstream, then break that connection (once), and
        call `on_break` (a crash injected mid-transfer uses it to kill the host too)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self._upstream_budget = nbytes
        self._on_break = on_break

    def cut_after_cancel(self) -> None:
        """Withdraw a pending cut_after that has not struck yet."""
        self._upstream_budget = None
        self._on_break = None

    def delay(self, seconds: float) -> None:
        """Hold every chunk `seconds` before forwarding it, in both directions (0: no delay)."""
        self._delay = max(0.0, seconds)

    async def close(self) -> None:
        self._stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _stop(self) -> None:
        self._is_cut = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.abort()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, LISTEN_HOST, self.port, limit=STREAM_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, opener_reader: asyncio.StreamReader, opener_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._is_cut:
            opener_writer.transport.abort()
            return
        try:
            receiver_reader, receiver_writer = await asyncio.open_connection(
                self.target_host, self.target_port, limit=STREAM_LIMIT
            )
        except OSError as exc:
            log.warning("relay cannot reach target", target=f"{self.target_host}:{self.target_port}", error=str(exc))
            opener_writer.transport.abort()
            return
        if self._is_cut:  # cut while we were connecting
            opener_writer.transport.abort()
            receiver_writer.transport.abort()
            return
        for writer in (opener_writer, receiver_writer):
            writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        link = _Link(opener_writer, receiver_writer)
        self._links.add(link)
        self._tasks.add(task)
        try:
            await asyncio.gather(
                self._pump(link, opener_reader, receiver_writer, Direction.UP),
                self._pump(link, receiver_reader, opener_writer, Direction.DOWN),
            )
        except asyncio.CancelledError:
            # Only close() cancels this task; re-raising would make asyncio log it as an error.
            link.abort()
            return
        finally:
            self._links.discard(link)
            self._tasks.discard(task)
        opener_writer.close()
        receiver_writer.close()

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, target: asyncio.StreamWriter, direction: Direction
    ) -> None:
        try:
            while chunk := await source.read(CHUNK):
                if self._delay:
                    await asyncio.sleep(self._delay)
                breaking = False
                if direction is Direction.UP and self._upstream_budget is not None:
                    if len(chunk) >= self._upstream_budget:
                        chunk = chunk[: self._upstream_budget]
                        self._upstream_budget = None
                        breaking = True
                    else:
                        self._upstream_budget -= len(chunk)
                self._record(direction, chunk)
                if breaking:
                    # Flush to the kernel first: aborting drops what is still in asyncio's buffer.
                    target.transport.set_write_buffer_limits(high=0)
                target.write(chunk)
                await target.drain()
                if breaking:
                    log.info("relay broke a connection", port=self.port)
                    link.abort()
                    on_break, self._on_break = self._on_break, None
                    if on_break:
                        on_break()
                    return
            # Pass the half-close on: the other direction may still be carrying data.
            if target.can_write_eof():
                target.write_eof()
        except OSError:
            link.abort()

    def _record(self, direction: Direction, chunk: bytes) -> None:
        if not self._capture:
            return
        buffer = self._captured[direction]
        room = self._capture_limit - len(buffer)
        if room > 0:
            buffer += chunk[:room]
