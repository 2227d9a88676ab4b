"""The data channel: one TCP stream per job leg, carrying length-prefixed frames of backup data.

A plaintext header says the job and its DTE mode, the receiver accepts or refuses, and a dte=on leg turns into mutual TLS.

The negotiation reads lines through an asyncio StreamReader; once a leg is open its transport
is handed to a _FrameReceiver, which reads every frame straight into a buffer of its own.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import ssl
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Awaitable, Callable, Iterable

import structlog

from fabric.dte import DteMode
from fabric.pki import HostCredentials, client_context, server_context

log = structlog.get_logger(__name__)

LISTEN_HOST = "127.0.0.1"
HEADER_MAX = 4096
ANSWER_MAX = 4096
MAX_FRAME = 16 * 1024 * 1024
SENDFILE_FRAME = 2 * 1024 * 1024  # frames of a file sent by send_file on a plaintext leg
READ_FRAME = 1024 * 1024  # frames of a file read and sent inside TLS
# Buffers of about one frame (senders write 256 KiB to 1 MiB): the default 64 KiB pauses the
# socket several times per frame, and much larger buffers fall out of the CPU cache
# (measured with scripts/bench_channel.py).
STREAM_LIMIT = 1024 * 1024
WRITE_HIGH_WATER = 1024 * 1024
DEFAULT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
# How long a refusing receiver keeps reading, so that closing with unread bytes does not
# send a TCP reset that destroys the refusal before the opener reads it.
REFUSAL_LINGER = 1.0

# Frames a leg holds unread before it stops reading its socket (flow control back to the sender).
MAX_QUEUED_FRAMES = 4

_FRAME_LENGTH = struct.Struct(">I")
_END_FRAME = _FRAME_LENGTH.pack(0)


class ChannelError(Exception):
    """A leg could not be opened or did not complete; subclasses say why."""


class ConnectFailed(ChannelError):
    """No TCP connection to the receiver (NetBackup status 25)."""


class ConnectionBroken(ChannelError):
    """The stream ended or was reset in the middle of the protocol (status 40)."""


class ChannelTimeout(ChannelError):
    """The peer stayed silent longer than the leg's timeout (status 41)."""


class TlsFailed(ChannelError):
    """The TLS handshake or the peer's certificate was rejected (the DTE negotiation family)."""


class LegRefused(ChannelError):
    """The receiver read the header and refused the leg; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HeaderInvalid(ValueError):
    """A header line that is not the protocol's JSON object."""


@dataclass(frozen=True)
class LegHeader:
    """The plaintext line an opener sends first: which job, which leg, and whether it is encrypted."""

    job_id: int
    leg: str
    dte: DteMode
    sender: str
    receiver: str

    def encode(self) -> bytes:
        line = json.dumps(
            {"job_id": self.job_id, "leg": self.leg, "dte": self.dte.value, "sender": self.sender, "receiver": self.receiver},
            separators=(",", ":"),
        ).encode() + b"\n"
        if len(line) > HEADER_MAX:
            raise ValueError(f"header of {len(line)} bytes exceeds {HEADER_MAX}")
        return line

    @classmethod
    def decode(cls, line: bytes) -> "LegHeader":
        try:
            fields = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeaderInvalid(f"header is not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise HeaderInvalid("header is not a JSON object")
        expected = {"job_id", "leg", "dte", "sender", "receiver"}
        if set(fields) != expected:
            raise HeaderInvalid(f"header keys must be {sorted(expected)}, got {sorted(fields)}")
        job_id = fields["job_id"]
        if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 0:
            raise HeaderInvalid(f"job_id must be a non-negative integer, got {job_id!r}")
        for key in ("leg", "sender", "receiver"):
            if not isinstance(fields[key], str) or not fields[key]:
                raise HeaderInvalid(f"{key} must be a non-empty string, got {fields[key]!r}")
        if fields["dte"] not in ("on", "off"):
            raise HeaderInvalid(f"dte must be 'on' or 'off', got {fields['dte']!r}")
        return cls(job_id, fields["leg"], DteMode(fields["dte"]), fields["sender"], fields["receiver"])


@dataclass(frozen=True)
class TlsInfo:
    """What TLS the two hosts really negotiated, as the report shows it."""

    version: str
    cipher: str


@dataclass(frozen=True)
class Answer:
    """The receiver's one-line reply: accept, or refuse with a reason a person can read."""

    accept: bool
    reason: str = ""

    def encode(self) -> bytes:
        fields: dict[str, object] = {"accept": self.accept}
        if not self.accept:
            # Cut the reason, not the JSON: a reason may quote a long hostile header.
            fields["reason"] = self.reason[: ANSWER_MAX // 4]
        return json.dumps(fields).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "Answer":
        try:
            fields = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"answer is not JSON: {line[:80]!r}") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("accept"), bool):
            raise ValueError(f"answer has no boolean 'accept': {line[:80]!r}")
        return cls(fields["accept"], str(fields.get("reason", "")))


ExpectLeg = Callable[[LegHeader], str | None | Awaitable[str | None]]
HandleLeg = Callable[["Leg"], Awaitable[None]]


class Leg:
    """One open leg: framed payload in both directions, in plaintext or inside TLS."""

    def __init__(
        self,
        header: LegHeader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: TlsInfo | None,
        timeout: float | None,
        logger: structlog.typing.FilteringBoundLogger,
        peer: str,
    ) -> None:
        self.header = header
        self.tls = tls
        self.peer = peer
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self._writer = writer
        self._log = logger
        self._closed = False
        self._receiver = _FrameReceiver.take_over(reader, writer, peer)

    async def send_frame(self, payload: bytes | bytearray | memoryview) -> None:
        if isinstance(payload, memoryview):
            payload = payload.cast("B")  # so len() counts bytes, whatever the view's format
        length = len(payload)
        if length == 0:
            raise ValueError("empty frame: a zero length marks the end of the stream; call send_end()")
        if length > MAX_FRAME:
            raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        try:
            async with asyncio.timeout(self.timeout):
                # Two writes, not prefix + payload: concatenating would copy every payload once more.
                self._writer.write(_FRAME_LENGTH.pack(length))
                self._writer.write(payload)
                await self._writer.drain()
        except TimeoutError:
            raise ChannelTimeout(f"{self.peer} did not take data for {self.timeout} s") from None
        except (OSError, EOFError) as exc:
            raise ConnectionBroken(f"sending to {self.peer}: {_describe(exc)}") from exc
        self.bytes_sent += length

    async def send_file(self, f: BinaryIO, count: int) -> None:
        """Send `count` bytes of an open file, from its current position, as frames.

        On a plaintext leg each frame's payload goes by os.sendfile (loop.sendfile): the
        bytes never enter Python. Inside TLS they must be encrypted, so they are read."""
        if count < 0:
            raise ValueError("count must be >= 0")
        transport = self._writer.transport
        loop = asyncio.get_running_loop()
        offset = f.tell()
        left = count
        while left:
            piece = min(SENDFILE_FRAME if self.tls is None else READ_FRAME, left)
            try:
                async with asyncio.timeout(self.timeout):
                    if self.tls is None:
                        self._writer.write(_FRAME_LENGTH.pack(piece))
                        await self._writer.drain()
                        sent = await loop.sendfile(transport, f, offset, piece, fallback=True)
                    else:
                        data = f.read(piece)
                        sent = len(data)
                        if sent:
                            self._writer.write(_FRAME_LENGTH.pack(sent))
                            self._writer.write(data)
                            await self._writer.drain()
            except TimeoutError:
                raise ChannelTimeout(f"{self.peer} did not take data for {self.timeout} s") from None
            except (OSError, EOFError, RuntimeError) as exc:
                raise ConnectionBroken(f"sending to {self.peer}: {_describe(exc)}") from exc
            if sent != piece:
                raise ConnectionBroken(f"sending to {self.peer}: the file ended {left - sent} bytes early")
            offset += piece
            left -= piece
            self.bytes_sent += piece
        f.seek(offset)

    async def send_end(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                self._writer.write(_END_FRAME)
                await self._writer.drain()
        except TimeoutError:
            raise ChannelTimeout(f"{self.peer} did not take the end of stream for {self.timeout} s") from None
        except (OSError, EOFError) as exc:
            raise ConnectionBroken(f"ending the stream to {self.peer}: {_describe(exc)}") from exc

    async def recv_frame(self) -> bytearray | None:
        """The next payload, or None when the peer sent the end-of-stream frame."""
        try:
            async with asyncio.timeout(self.timeout):
                payload = await self._receiver.next_frame()
        except TimeoutError:
            raise ChannelTimeout(f"{self.peer} sent nothing for {self.timeout} s") from None
        if payload is not None:
            self.bytes_received += len(payload)
        return payload

    async def close(self) -> None:
        """Close politely (TLS close_notify); a peer that does not answer is cut off."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except (TimeoutError, OSError):
            self._writer.transport.abort()
        self._log.info("leg closed", bytes_sent=self.bytes_sent, bytes_received=self.bytes_received)

    def abort(self) -> None:
        """Drop the connection at once, as a crashing host would."""
        self._closed = True
        self._writer.transport.abort()


class _FrameReceiver(asyncio.BufferedProtocol):
    """A leg's reading side once it is open: frames read straight into their own bytearray.

    Through a StreamReader every byte was copied three times after the kernel's copy: into
    the reader's buffer, out of it (shifting what follows), and into the joined frame. Here
    the transport (plain or TLS) reads the 4-byte length into `_length`, then the payload into
    a new bytearray of exactly that length, which is handed over whole: one copy, and no
    buffer is reused, so a consumer may keep a frame (ImageWriter queues them for its thread).

    Only reading moves here: pause_writing / resume_writing / connection_lost are passed on
    to the stream's own protocol, which the StreamWriter still uses for drain() and
    wait_closed(). Reading pauses while MAX_QUEUED_FRAMES frames wait for recv_frame.
    """

    def __init__(self, transport: asyncio.BaseTransport, stream_protocol: asyncio.BaseProtocol, peer: str, keep_open_on_eof: bool) -> None:
        self._transport = transport
        self._stream_protocol = stream_protocol
        self._peer = peer
        self._keep_open_on_eof = keep_open_on_eof
        self._length = bytearray(_FRAME_LENGTH.size)
        self._length_got = 0
        self._frame: bytearray | None = None
        self._frame_got = 0
        # Frames (None for an end-of-stream frame) and, last, the error that stopped reading.
        self._frames: deque[bytearray | None | ChannelError] = deque()
        self._ended: ChannelError | None = None  # the stream is over: raised once the queue is empty
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._discard = bytearray(64 * 1024)

    @classmethod
    def take_over(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> "_FrameReceiver":
        """Install a receiver on the writer's transport, keeping what the reader already holds."""
        transport = writer.transport
        receiver = cls(transport, transport.get_protocol(), peer, keep_open_on_eof=writer.get_extra_info("sslcontext") is None)
        transport.set_protocol(receiver)
        # Bytes the stream read past the negotiation (frames the peer sent at once) come first.
        # StreamReader has no public way to take its buffer without copying it through read().
        leftover = reader._buffer  # type: ignore[attr-defined]
        if leftover:
            receiver._feed(memoryview(leftover))
            leftover.clear()
        # The reader may already have seen the end (or the loss) of the connection, which the
        # transport will not report again.
        lost = reader.exception()
        if lost is not None:
            receiver._end(lost)
        elif reader.at_eof():
            receiver._end(None)
        # The reader pauses the transport when its buffer is full; the receiver decides now.
        if not receiver._paused and not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()
        return receiver

    async def next_frame(self) -> bytearray | None:
        while not self._frames:
            if self._ended is not None:
                # A new exception each call: re-raising one instance would pile up tracebacks.
                raise ConnectionBroken(*self._ended.args) from self._ended.__cause__
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._frames.popleft()
        if self._paused and len(self._frames) < MAX_QUEUED_FRAMES and self._ended is None:
            self._paused = False
            self._transport.resume_reading()
        if isinstance(item, ChannelError):
            raise item
        return item

    # -- called by the transport -----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._ended is not None:
            return self._discard  # a broken stream: what still arrives is dropped
        if self._frame is None:
            return memoryview(self._length)[self._length_got :]
        return memoryview(self._frame)[self._frame_got :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._ended is not None:
            return
        if self._frame is not None:
            self._frame_got += nbytes
            if self._frame_got == len(self._frame):
                frame, self._frame = self._frame, None
                self._push(frame)
            return
        self._length_got += nbytes
        if self._length_got < _FRAME_LENGTH.size:
            return
        self._length_got = 0
        (length,) = _FRAME_LENGTH.unpack(self._length)
        if length == 0:
            self._push(None)
        elif length > MAX_FRAME:
            # Checked before allocating: a hostile length must not cost 4 GiB.
            self._frames.append(ConnectionBroken(f"{self._peer} announced a frame of {length} bytes (max {MAX_FRAME})"))
            self._end(None)
            self._pause()
        else:
            self._frame = bytearray(length)
            self._frame_got = 0

    def eof_received(self) -> bool:
        self._end(None)
        # As StreamReaderProtocol: a plain socket stays open for writing, TLS closes.
        return self._keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)
        self._stream_protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._stream_protocol.pause_writing()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self._stream_protocol.resume_writing()  # type: ignore[attr-defined]

    # -- internals -------------------------------------------------------------------------

    def _feed(self, data: memoryview) -> None:
        while data and self._ended is None:
            buffer = self.get_buffer(len(data))
            count = min(len(buffer), len(data))
            buffer[:count] = data[:count]
            self.buffer_updated(count)
            data = data[count:]

    def _push(self, frame: bytearray | None) -> None:
        self._frames.append(frame)
        if len(self._frames) >= MAX_QUEUED_FRAMES:
            self._pause()
        self._wake()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            if not self._transport.is_closing():
                self._transport.pause_reading()  # type: ignore[attr-defined]

    def _end(self, exc: BaseException | None) -> None:
        if self._ended is None:
            if exc is None:
                self._ended = ConnectionBroken(f"{self._peer} closed the stream before its end-of-stream frame")
            else:
                self._ended = ConnectionBroken(f"receiving from {self._peer}: {_describe(exc)}")
                self._ended.__cause__ = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)



async def open_leg(
    host: str,
    port: int,
    header: LegHeader,
    creds: HostCredentials | None,
    max_tls: str,
    timeout: float | None = DEFAULT_TIMEOUT,
    *,
    extra_cas: Iterable[Path] = (),
) -> Leg:
    """Connect to a receiver, negotiate the leg, and return it ready for frames.

    `timeout` bounds the whole negotiation and then every frame read or write on the leg.
    """
    line = header.encode()
    if header.dte.is_on and creds is None:
        raise ValueError(f"{header.sender} has no host certificate: it cannot open a dte=on leg")
    context = client_context(creds, max_tls, extra_cas) if header.dte.is_on and creds else None
    logger = log.bind(host=header.sender, job_id=header.job_id, leg=header.leg)
    try:
        async with asyncio.timeout(timeout):
            leg = await _negotiate_as_opener(host, port, header, line, context, timeout, logger)
    except TimeoutError:
        logger.warning("leg timed out", receiver=header.receiver, timeout=timeout)
        raise ChannelTimeout(f"no answer from {header.receiver} at {host}:{port} within {timeout} s") from None
    except ChannelError as exc:
        logger.warning("leg failed", receiver=header.receiver, error=str(exc), kind=type(exc).__name__)
        raise
    return leg


async def _negotiate_as_opener(
    host: str,
    port: int,
    header: LegHeader,
    line: bytes,
    context: ssl.SSLContext | None,
    timeout: float | None,
    logger: structlog.typing.FilteringBoundLogger,
) -> Leg:
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=STREAM_LIMIT)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {header.receiver} at {host}:{port}: {_describe(exc)}") from exc
    try:
        _tune(writer)
        writer.write(line)
        try:
            answer = await _read_answer(reader)
        except (OSError, EOFError, ValueError) as exc:
            raise ConnectionBroken(f"{header.receiver} did not answer the header: {_describe(exc)}") from exc
        if not answer.accept:
            logger.warning("leg refused", receiver=header.receiver, reason=answer.reason)
            raise LegRefused(answer.reason)
        tls = None
        if context is not None:
            # Only now, after the answer: a ClientHello sent earlier would sit in the
            # receiver's plaintext buffer and its handshake would wait forever.
            tls = await _opener_handshake(reader, writer, context, header)
            _tune(writer)
            logger.info("tls negotiated", peer=header.receiver, version=tls.version, cipher=tls.cipher)
        logger.info("leg accepted", receiver=header.receiver, dte=header.dte.value)
        return Leg(header, reader, writer, tls, timeout, logger, peer=header.receiver)
    except BaseException:
        writer.transport.abort()
        raise


async def _opener_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext, header: LegHeader
) -> TlsInfo:
    try:
        await writer.start_tls(context, server_hostname=header.receiver)
    except (OSError, EOFError) as exc:
        raise TlsFailed(f"TLS handshake with {header.receiver} failed: {_describe(exc)}") from exc
    # TLS 1.3 finishes the client's handshake before the server has checked the client's
    # certificate; the receiver's confirmation inside TLS tells us it accepted ours.
    try:
        confirmation = await _read_answer(reader)
    except (OSError, EOFError, ValueError) as exc:
        raise TlsFailed(f"{header.receiver} rejected the TLS session: {_describe(exc)}") from exc
    if not confirmation.accept:
        raise TlsFailed(confirmation.reason)
    return _tls_info(writer)


class LegServer:
    """A host's listener for incoming legs on 127.0.0.1; one task per connection."""

    def __init__(
        self,
        host: str,
        context: ssl.SSLContext | None,
        expect_leg: ExpectLeg,
        handle_leg: HandleLeg,
        timeout: float | None,
    ) -> None:
        self.host = host
        self._context = context
        self._expect_leg = expect_leg
        self._handle_leg = handle_leg
        self._timeout = timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._log = log.bind(host=host)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _listen(self, port: int) -> None:
        self._server = await asyncio.start_server(self._serve_connection, LISTEN_HOST, port, limit=STREAM_LIMIT)
        self._log.info("listening for legs", port=self.port, tls=self._context is not None)

    async def close(self) -> None:
        """Stop listening and drop every open leg, as a stopping (or crashing) host does."""
        if self._server is None:
            return
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            leg = await self._negotiate(reader, writer)
            if leg is None:
                return
            try:
                await self._handle_leg(leg)
            except ChannelError as exc:
                leg._log.warning("leg failed", error=str(exc), kind=type(exc).__name__)
            except Exception:
                leg._log.exception("leg handler crashed")
            await leg.close()
        except asyncio.CancelledError:
            # Only close() cancels this task (the host stops or crashes): the leg just drops.
            # Re-raising would make asyncio 3.11 log the cancellation as an error.
            writer.transport.abort()
        finally:
            self._connections.discard(task)

    async def _negotiate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Leg | None:
        """Read the header, answer it, and run the TLS handshake; None when the leg did not open."""
        logger = self._log
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    header = LegHeader.decode(await _read_header_line(reader))
                except HeaderInvalid as exc:
                    logger.warning("leg refused", reason=str(exc))
                    await _refuse(reader, writer, str(exc))
                    return None
                logger = logger.bind(job_id=header.job_id, leg=header.leg)
                reason = await self._check(header)
                if reason is not None:
                    logger.warning("leg refused", sender=header.sender, dte=header.dte.value, reason=reason)
                    await _refuse(reader, writer, reason)
                    return None
                writer.write(Answer(True).encode())
                tls = None
                if header.dte.is_on:
                    assert self._context is not None
                    tls = await self._handshake(reader, writer, header, logger)
                    if tls is None:
                        return None
                _tune(writer)
        except TimeoutError:
            logger.warning("leg timed out", timeout=self._timeout)
            writer.transport.abort()
            return None
        except (OSError, EOFError) as exc:
            logger.warning("leg failed", error=_describe(exc), kind="ConnectionBroken")
            writer.transport.abort()
            return None
        logger.info("leg accepted", sender=header.sender, dte=header.dte.value)
        return Leg(header, reader, writer, tls, self._timeout, logger, peer=header.sender)

    async def _check(self, header: LegHeader) -> str | None:
        if header.receiver != self.host:
            return f"leg for {header.receiver} reached {self.host}"
        if header.dte.is_on and self._context is None:
            return f"{self.host} has no host certificate: it cannot take an encrypted leg"
        try:
            verdict = self._expect_leg(header)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception:
            self._log.exception("expect_leg crashed", job_id=header.job_id, leg=header.leg)
            return f"{self.host} could not check job {header.job_id}"
        return verdict

    async def _handshake(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        header: LegHeader,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> TlsInfo | None:
        assert self._context is not None
        try:
            await writer.start_tls(self._context)
        except (OSError, EOFError) as exc:
            logger.warning("tls failed", sender=header.sender, error=_describe(exc))
            writer.transport.abort()
            return None
        # The CA vouches for the certificate; the header must also name the host it belongs to.
        names = _certificate_dns_names(writer)
        if header.sender not in names:
            reason = f"client certificate is for {', '.join(names) or 'no host'}, header says sender {header.sender}"
            logger.warning("tls failed", sender=header.sender, error=reason)
            await _refuse(reader, writer, reason)
            return None
        writer.write(Answer(True).encode())
        tls = _tls_info(writer)
        logger.info("tls negotiated", peer=header.sender, version=tls.version, cipher=tls.cipher)
        return tls


async def serve_legs(
    host: str,
    creds: HostCredentials | None,
    expect_leg: ExpectLeg,
    handle_leg: HandleLeg,
    max_tls: str,
    *,
    extra_cas: Iterable[Path] = (),
    timeout: float | None = DEFAULT_TIMEOUT,
    port: int = 0,
) -> LegServer:
    """Listen for legs addressed to `host` on 127.0.0.1 (port 0: a free port).

    `expect_leg(header)` returns None to accept or a refusal reason; `handle_leg(leg)` then
    runs for each accepted leg, which is closed when it returns. A host without `creds`
    refuses every dte=on leg. `timeout` bounds the negotiation and each later frame.
    """
    context = server_context(creds, max_tls, extra_cas) if creds is not None else None
    leg_server = LegServer(host, context, expect_leg, handle_leg, timeout)
    await leg_server._listen(port)
    return leg_server


async def _read_header_line(reader: asyncio.StreamReader) -> bytes:
    # Read in bounded pieces rather than readline(): the stream's limit is sized for frames,
    # and a header must not be allowed to grow past HEADER_MAX.
    buffer = bytearray()
    while b"\n" not in buffer and len(buffer) <= HEADER_MAX:
        chunk = await reader.read(HEADER_MAX + 1 - len(buffer))
        if not chunk:
            raise HeaderInvalid("connection closed before the end of the header line")
        buffer += chunk
    line, newline, rest = bytes(buffer).partition(b"\n")
    if not newline or len(line) + 1 > HEADER_MAX:
        raise HeaderInvalid(f"header longer than {HEADER_MAX} bytes")
    if rest:
        raise HeaderInvalid("opener sent data before the answer to its header")
    return line


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    line = await reader.readuntil(b"\n")
    if len(line) > ANSWER_MAX:
        raise ValueError(f"answer longer than {ANSWER_MAX} bytes")
    return Answer.decode(line)


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str) -> None:
    try:
        writer.write(Answer(False, reason).encode())
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(REFUSAL_LINGER):
            while await reader.read(HEADER_MAX):
                pass
    except (TimeoutError, OSError):
        pass
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()


def _tune(writer: asyncio.StreamWriter) -> None:
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)


def _tls_info(writer: asyncio.StreamWriter) -> TlsInfo:
    ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
    return TlsInfo(version=ssl_object.version() or "", cipher=ssl_object.cipher()[0])


def _certificate_dns_names(writer: asyncio.StreamWriter) -> list[str]:
    certificate = writer.get_extra_info("peercert") or {}
    return [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
