"""The data channel over real sockets and real TLS: negotiation, refusal, proof on the wire, faults.

A fault relay sits between opener and receiver wherever a test needs to see the bytes or break the link.
"""

from __future__ import annotations

import asyncio
import os
import json
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.channel import (
    ChannelTimeout,
    ConnectFailed,
    ConnectionBroken,
    HEADER_MAX,
    Leg,
    LegHeader,
    LegRefused,
    LegServer,
    TlsFailed,
    open_leg,
    serve_legs,
)
from fabric.dte import DteMode, Host, Role, Version, negotiated_tls_version
from fabric.pki import DomainCA, HostCredentials
from fabric.relay import Relay

DOWNGRADE = "a peer cannot talk a job down to plaintext"


@dataclass(frozen=True)
class Pki:
    prod: DomainCA
    dr: DomainCA
    media1: HostCredentials
    web1: HostCredentials
    web2: HostCredentials
    dr_web1: HostCredentials  # same host name, certificate from the other domain's CA
    dr_media1: HostCredentials


def make_pki(folder: Path) -> Pki:
    prod = DomainCA.create("prod", folder / "prod")
    dr = DomainCA.create("dr", folder / "dr")
    return Pki(
        prod,
        dr,
        media1=prod.issue("media1", folder / "prod"),
        web1=prod.issue("web1", folder / "prod"),
        web2=prod.issue("web2", folder / "prod"),
        dr_web1=dr.issue("web1", folder / "dr"),
        dr_media1=dr.issue("media1", folder / "dr"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Sink:
    """A receiver's handle_leg: keeps every frame, then answers with one 'ack' frame."""

    echo: bool = False
    legs: list[Leg] = field(default_factory=list)
    payload: bytearray = field(default_factory=bytearray)
    errors: list[Exception] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, leg: Leg) -> None:
        self.legs.append(leg)
        try:
            while (frame := await leg.recv_frame()) is not None:
                self.payload += frame
                if self.echo:
                    await leg.send_frame(frame)
            await leg.send_frame(b"ack")
            await leg.send_end()
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self.done.set()


def expecting(dte: DteMode):
    """expect_leg for a job the primary dispatched with `dte`."""

    def expect_leg(header: LegHeader) -> str | None:
        if header.dte is not dte:
            return DOWNGRADE if dte.is_on else "job was dispatched with dte=off"
        return None

    return expect_leg


@asynccontextmanager
async def receiver(
    creds: HostCredentials | None, sink: Sink, dte: DteMode = DteMode.ON, max_tls: str = "TLSv1.3", host: str = "media1", **kwargs
) -> AsyncIterator[LegServer]:
    server = await serve_legs(host, creds, expecting(dte), sink.handle, max_tls, **kwargs)
    try:
        yield server
    finally:
        await server.close()


def header(dte: DteMode, sender: str = "web1", receiver: str = "media1", job_id: int = 7) -> LegHeader:
    return LegHeader(job_id=job_id, leg="backup", dte=dte, sender=sender, receiver=receiver)


async def send_all(leg: Leg, data: bytes, chunk: int = 256 * 1024) -> bytes | None:
    """Send `data` in frames and the end marker; return the receiver's answer frame."""
    for start in range(0, len(data), chunk):
        await leg.send_frame(data[start : start + chunk])
    await leg.send_end()
    answer = await leg.recv_frame()
    assert await leg.recv_frame() is None
    return answer


async def raw_exchange(port: int, line: bytes) -> dict:
    """Talk to a LegServer without open_leg, as a broken or hostile opener would."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(line)
    answer = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return json.loads(answer)


# ---------------------------------------------------------------------------------------
# TLS negotiation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_version", "media_version", "expected"),
    [("10.5", "10.5", "TLSv1.3"), ("10.5", "10.4", "TLSv1.2"), ("10.1", "10.5", "TLSv1.2")],
)
async def test_dte_on_negotiates_the_highest_tls_both_hosts_allow(pki, client_version, media_version, expected):
    client = Host("web1", Role.CLIENT, Version.parse(client_version))
    media = Host("media1", Role.MEDIA, Version.parse(media_version))
    assert negotiated_tls_version(client, media) == expected
    sink = Sink()
    async with receiver(pki.media1, sink, max_tls=media.max_tls) as server:
        leg = await open_leg("127.0.0.1", server.port, header(DteMode.ON), pki.web1, client.max_tls, 5)
        assert await send_all(leg, b"x" * 1000) == b"ack"
        await leg.close()
        await sink.done.wait()
    assert leg.tls is not None and leg.tls.version == expected
    assert sink.legs[0].tls == leg.tls
    assert leg.tls.cipher.startswith("TLS_") == (expected == "TLSv1.3")
    assert "GCM" in leg.tls.cipher or "CHACHA20" in leg.tls.cipher
    assert (leg.bytes_sent, leg.bytes_received) == (1000, 3)
    assert (sink.legs[0].bytes_received, sink.legs[0].bytes_sent) == (1000, 3)


async def test_dte_off_leg_has_no_tls(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.OFF) as server:
        leg = await open_leg("127.0.0.1", server.port, header(DteMode.OFF), pki.web1, "TLSv1.3", 5)
        assert await send_all(leg, b"plain") == b"ack"
        await leg.close()
        await sink.done.wait()
    assert leg.tls is None and sink.legs[0].tls is None
    assert bytes(sink.payload) == b"plain"


# ---------------------------------------------------------------------------------------
# Proof on the wire
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dte", [DteMode.ON, DteMode.OFF])
async def test_marker_is_on_the_wire_only_without_dte(pki, dte):
    marker = b"FABRIC-WIRE-MARKER-%08x" % random.getrandbits(32)
    data = (marker + b"|") * 20000  # about 600 KiB, spread over several frames
    sink = Sink()
    async with receiver(pki.media1, sink, dte=dte) as server:
        relay = await Relay.start("127.0.0.1", server.port)
        try:
            leg = await open_leg("127.0.0.1", relay.port, header(dte), pki.web1, "TLSv1.3", 5)
            assert await send_all(leg, data) == b"ack"
            await leg.close()
            await sink.done.wait()
            upstream = relay.captured("up")
            downstream = relay.captured("down")
        finally:
            await relay.close()
    assert bytes(sink.payload) == data  # the receiver got every byte, either way
    assert b'"job_id":7' in upstream  # the header is plaintext by design, and the relay saw it
    assert len(upstream) > len(data)
    if dte.is_on:
        assert marker not in upstream
        assert b"ack" not in downstream
    else:
        assert upstream.count(marker) >= 20000 - 3  # a frame's length prefix may split one
        assert b"ack" in downstream


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


async def test_header_talking_the_job_down_to_plaintext_is_refused(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.ON) as server:
        relay = await Relay.start("127.0.0.1", server.port)
        try:
            with pytest.raises(LegRefused) as refused:
                await open_leg("127.0.0.1", relay.port, header(DteMode.OFF), pki.web1, "TLSv1.3", 5)
            upstream = relay.captured("up")
        finally:
            await relay.close()
    assert refused.value.reason == DOWNGRADE
    assert sink.legs == [] and not sink.payload
    assert upstream == header(DteMode.OFF).encode()  # the header and not one payload byte


async def test_opener_sending_before_the_answer_is_refused(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.OFF) as server:
        answer = await raw_exchange(server.port, header(DteMode.OFF).encode() + b"\x00\x00\x00\x05hello")
    assert answer["accept"] is False and "before the answer" in answer["reason"]
    assert sink.legs == []


async def test_leg_addressed_to_another_host_is_refused(pki):
    sink = Sink()
    async with receiver(pki.media1, sink) as server:
        with pytest.raises(LegRefused, match="media2"):
            await open_leg("127.0.0.1", server.port, header(DteMode.ON, receiver="media2"), pki.web1, "TLSv1.3", 5)
    assert sink.legs == []


async def test_host_without_certificate_refuses_dte_on(pki):
    sink = Sink()
    async with receiver(None, sink) as server:
        with pytest.raises(LegRefused, match="no host certificate"):
            await open_leg("127.0.0.1", server.port, header(DteMode.ON), pki.web1, "TLSv1.3", 5)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json at all\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"job_id": 1}\n', "keys"),
        (b'{"job_id": "7", "leg": "b", "dte": "on", "sender": "web1", "receiver": "media1"}\n', "job_id"),
        (b'{"job_id": 7, "leg": "b", "dte": "maybe", "sender": "web1", "receiver": "media1"}\n', "dte"),
        (b"\xff\xfe\n", "not JSON"),
        (b"x" * (HEADER_MAX * 3), "longer than"),
        (b'{"leg": "' + b"y" * HEADER_MAX + b'"}\n', "longer than"),
    ],
)
async def test_malformed_or_oversized_header_is_refused_without_traceback(pki, line, reason):
    sink = Sink()
    with structlog.testing.capture_logs() as logs:
        async with receiver(pki.media1, sink) as server:
            answer = await raw_exchange(server.port, line)
            # The server is unharmed: a proper leg still works afterwards.
            leg = await open_leg("127.0.0.1", server.port, header(DteMode.ON), pki.web1, "TLSv1.3", 5)
            assert await send_all(leg, b"ok") == b"ack"
            await leg.close()
            await sink.done.wait()
    assert answer["accept"] is False and reason in answer["reason"]
    assert len(sink.legs) == 1
    assert any(entry["event"] == "leg refused" for entry in logs)
    assert not any("exc_info" in entry or entry["log_level"] in ("error", "critical") for entry in logs)


async def test_expect_leg_may_be_async_and_its_long_reason_reaches_the_opener(pki):
    async def expect_leg(header: LegHeader) -> str | None:
        await asyncio.sleep(0)
        return "no such job " + "z" * 10_000

    sink = Sink()
    server = await serve_legs("media1", pki.media1, expect_leg, sink.handle, "TLSv1.3")
    try:
        with pytest.raises(LegRefused) as refused:
            await open_leg("127.0.0.1", server.port, header(DteMode.ON), pki.web1, "TLSv1.3", 5)
    finally:
        await server.close()
    assert refused.value.reason.startswith("no such job zzz") and len(refused.value.reason) <= HEADER_MAX
    assert sink.legs == []


# ---------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tls", ["TLSv1.3", "TLSv1.2"])
async def test_client_certificate_from_another_domain_is_rejected(pki, max_tls):
    sink = Sink()
    async with receiver(pki.media1, sink, max_tls=max_tls) as server:
        with pytest.raises(TlsFailed):
            # The opener trusts prod's CA, so only the receiver can object: to dr's client cert.
            await open_leg(
                "127.0.0.1", server.port, header(DteMode.ON), pki.dr_web1, max_tls, 5, extra_cas=[pki.prod.cert_path]
            )
    assert sink.legs == []


async def test_receiver_certificate_from_another_domain_is_rejected(pki):
    sink = Sink()
    async with receiver(pki.dr_media1, sink, extra_cas=[pki.prod.cert_path]) as server:
        with pytest.raises(TlsFailed, match="certificate verify failed"):
            await open_leg("127.0.0.1", server.port, header(DteMode.ON), pki.web1, "TLSv1.3", 5)
    assert sink.legs == []


async def test_receiver_certificate_for_another_host_is_rejected(pki):
    # A listener claiming to be media2 but holding media1's certificate.
    sink = Sink()
    async with receiver(pki.media1, sink, host="media2") as server:
        with pytest.raises(TlsFailed, match="media2"):
            await open_leg("127.0.0.1", server.port, header(DteMode.ON, receiver="media2"), pki.web1, "TLSv1.3", 5)


async def test_client_certificate_must_name_the_header_sender(pki):
    sink = Sink()
    async with receiver(pki.media1, sink) as server:
        with pytest.raises(TlsFailed, match="header says sender web1"):
            await open_leg("127.0.0.1", server.port, header(DteMode.ON, sender="web1"), pki.web2, "TLSv1.3", 5)
    assert sink.legs == []


async def test_cross_domain_leg_works_when_each_side_trusts_the_other_ca(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, extra_cas=[pki.dr.cert_path]) as server:
        leg = await open_leg(
            "127.0.0.1", server.port, header(DteMode.ON), pki.dr_web1, "TLSv1.3", 5, extra_cas=[pki.prod.cert_path]
        )
        assert await send_all(leg, b"replica") == b"ack"
        await leg.close()
    assert leg.tls is not None and leg.tls.version == "TLSv1.3"


# ---------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dte", [DteMode.ON, DteMode.OFF])
async def test_cut_after_breaks_the_transfer_on_both_sides(pki, dte):
    data = random.randbytes(4 * 1024 * 1024)
    sink = Sink()
    async with receiver(pki.media1, sink, dte=dte) as server:
        relay = await Relay.start("127.0.0.1", server.port)
        try:
            leg = await open_leg("127.0.0.1", relay.port, header(dte), pki.web1, "TLSv1.3", 5)
            relay.cut_after(300 * 1024)
            with pytest.raises(ConnectionBroken):
                await send_all(leg, data)
            await leg.close()
            await asyncio.wait_for(sink.done.wait(), 5)
        finally:
            await relay.close()
    assert len(sink.errors) == 1 and isinstance(sink.errors[0], ConnectionBroken)
    assert len(sink.payload) < 300 * 1024
    assert bytes(sink.payload) == data[: len(sink.payload)]


async def test_cut_relay_refuses_connections_until_healed(pki):
    sink = Sink()
    async with receiver(pki.media1, sink) as server:
        relay = await Relay.start("127.0.0.1", server.port)
        try:
            relay.cut()
            relay.cut_after(10)
            with pytest.raises(ConnectFailed):
                await open_leg("127.0.0.1", relay.port, header(DteMode.ON), pki.web1, "TLSv1.3", 5)
            await relay.heal()  # clears cut_after too
            leg = await open_leg("127.0.0.1", relay.port, header(DteMode.ON), pki.web1, "TLSv1.3", 5)
            assert await send_all(leg, b"after heal") == b"ack"
            await leg.close()
        finally:
            await relay.close()


async def test_cut_drops_an_open_leg(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.OFF) as server:
        relay = await Relay.start("127.0.0.1", server.port)
        try:
            leg = await open_leg("127.0.0.1", relay.port, header(DteMode.OFF), pki.web1, "TLSv1.3", 5)
            await leg.send_frame(b"first")
            await asyncio.sleep(0.05)
            relay.cut()
            with pytest.raises(ConnectionBroken):
                await leg.recv_frame()
            await leg.close()
            await asyncio.wait_for(sink.done.wait(), 5)
        finally:
            await relay.close()
    assert isinstance(sink.errors[0], ConnectionBroken)


async def test_silent_receiver_times_out():
    accepted: list[asyncio.StreamWriter] = []

    def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ChannelTimeout):
            await open_leg("127.0.0.1", port, header(DteMode.OFF), None, "TLSv1.3", 0.3)
    finally:
        server.close()
        for writer in accepted:
            writer.close()


async def test_stalled_peer_times_out_on_recv(pki):
    stalled = asyncio.Event()

    async def stall(leg: Leg) -> None:
        await stalled.wait()

    server = await serve_legs("media1", pki.media1, expecting(DteMode.ON), stall, "TLSv1.3")
    try:
        leg = await open_leg("127.0.0.1", server.port, header(DteMode.ON), pki.web1, "TLSv1.3", 0.3)
        with pytest.raises(ChannelTimeout):
            await leg.recv_frame()
        await leg.close()
    finally:
        stalled.set()
        await server.close()


async def test_delay_slows_the_link(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.OFF) as server:
        relay = await Relay.start("127.0.0.1", server.port, capture=False)
        try:
            relay.delay(0.1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            leg = await open_leg("127.0.0.1", relay.port, header(DteMode.OFF), pki.web1, "TLSv1.3", 5)
            assert await send_all(leg, b"slow") == b"ack"
            await leg.close()
            assert loop.time() - started >= 0.3  # answer down, frames up, ack down
            assert relay.captured("up") == b""
        finally:
            await relay.close()


async def test_relay_capture_keeps_only_its_limit(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.OFF) as server:
        relay = await Relay.start("127.0.0.1", server.port, capture_limit=100)
        try:
            leg = await open_leg("127.0.0.1", relay.port, header(DteMode.OFF), pki.web1, "TLSv1.3", 5)
            assert await send_all(leg, b"p" * 5000) == b"ack"
            await leg.close()
        finally:
            await relay.close()
    on_the_wire = header(DteMode.OFF).encode() + (5000).to_bytes(4, "big") + b"p" * 5000
    assert relay.captured("up") == on_the_wire[:100]


async def test_connect_to_closed_port_fails():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectFailed):
        await open_leg("127.0.0.1", port, header(DteMode.OFF), None, "TLSv1.3", 5)


async def test_closing_the_server_breaks_open_legs(pki):
    sink = Sink()
    server = await serve_legs("media1", pki.media1, expecting(DteMode.ON), sink.handle, "TLSv1.3")
    leg = await open_leg("127.0.0.1", server.port, header(DteMode.ON), pki.web1, "TLSv1.3", 5)
    await leg.send_frame(b"before the crash")
    await asyncio.sleep(0.05)
    await server.close()
    with pytest.raises(ConnectionBroken):
        await leg.recv_frame()
    await leg.close()


# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------


async def test_empty_and_oversized_frames_are_rejected_by_the_sender(pki):
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.OFF) as server:
        leg = await open_leg("127.0.0.1", server.port, header(DteMode.OFF), pki.web1, "TLSv1.3", 5)
        with pytest.raises(ValueError, match="send_end"):
            await leg.send_frame(b"")
        with pytest.raises(ValueError, match="exceeds"):
            await leg.send_frame(bytes(17 * 1024 * 1024))
        assert await send_all(leg, b"still fine") == b"ack"
        await leg.close()
    assert bytes(sink.payload) == b"still fine"


@pytest.mark.parametrize("dte", [DteMode.ON, DteMode.OFF])
async def test_a_receiver_that_stops_reading_stops_the_sender_and_loses_nothing(pki, dte):
    reading = asyncio.Event()
    received = bytearray()

    async def slow(leg: Leg) -> None:
        await reading.wait()
        while (frame := await leg.recv_frame()) is not None:
            received.extend(frame)

    server = await serve_legs("media1", pki.media1, expecting(dte), slow, "TLSv1.3")
    try:
        leg = await open_leg("127.0.0.1", server.port, header(dte), pki.web1, "TLSv1.3", 0.3)
        sent = bytearray()
        for n in range(200):  # 200 MiB: far more than the queued frames and socket buffers hold
            frame = bytes([n]) * (1024 * 1024)
            try:
                await leg.send_frame(frame)
            except ChannelTimeout:
                sent += frame  # written into the transport's buffer; only the drain timed out
                break
            sent += frame
        else:
            pytest.fail("the sender was never held back")
        leg.timeout = 5
        reading.set()
        await leg.send_end()
        await leg.close()
        for _ in range(100):
            if len(received) >= len(sent):
                break
            await asyncio.sleep(0.05)
        assert received == sent
    finally:
        reading.set()
        await server.close()


async def test_a_frame_longer_than_the_maximum_breaks_the_leg_after_the_frames_before_it(pki):
    frames: list[bytes] = []
    errors: list[Exception] = []
    done = asyncio.Event()

    async def collect(leg: Leg) -> None:
        try:
            while (frame := await leg.recv_frame()) is not None:
                frames.append(frame)
        except Exception as exc:
            errors.append(exc)
        done.set()

    server = await serve_legs("media1", None, expecting(DteMode.OFF), collect, "TLSv1.3")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(header(DteMode.OFF).encode())
        assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {"accept": True}
        writer.write((2).to_bytes(4, "big") + b"ok" + (0xFFFFFFFF).to_bytes(4, "big") + b"x" * 100)
        await asyncio.wait_for(done.wait(), 5)
        writer.close()
    finally:
        await server.close()
    assert frames == [b"ok"]
    assert isinstance(errors[0], ConnectionBroken) and "announced a frame of 4294967295 bytes" in str(errors[0])


async def test_frames_read_together_with_the_answer_are_not_lost():
    # Everything in one write: the opener's line reader takes the frames into its buffer
    # with the answer, and the leg must start from them.
    frames = [b"one", b"two" * 1000, b"three"]
    wire = b'{"accept": true}\n' + b"".join(len(f).to_bytes(4, "big") + f for f in frames) + bytes(4)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await reader.readuntil(b"\n")
        await asyncio.sleep(0.05)  # the rest, and the end of the connection, reach the reader
        leg = Leg(header(DteMode.OFF), reader, writer, None, 5, structlog.get_logger(), peer="media1")
        assert [await leg.recv_frame() for _ in frames] == frames
        assert await leg.recv_frame() is None
        with pytest.raises(ConnectionBroken, match="closed the stream"):
            await leg.recv_frame()
        assert leg.bytes_received == sum(map(len, frames))
        await leg.close()
    finally:
        server.close()


async def roundtrip(pki: Pki, dte: DteMode, frames: list[bytes]) -> None:
    sink = Sink(echo=True)
    async with receiver(pki.media1, sink, dte=dte) as server:
        leg = await open_leg("127.0.0.1", server.port, header(dte), pki.web1, "TLSv1.3", 5)
        echoed: list[bytes] = []

        async def read_echoes() -> None:
            while (frame := await leg.recv_frame()) is not None:
                echoed.append(frame)

        reading = asyncio.create_task(read_echoes())
        for frame in frames:
            await leg.send_frame(frame)
        await leg.send_end()
        await reading
        await leg.close()
    assert echoed == [*frames, b"ack"]
    assert leg.bytes_sent == sum(map(len, frames))
    assert sink.legs[0].bytes_received == leg.bytes_sent


frame_payloads = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.integers(min_value=1, max_value=2 * 1024 * 1024).map(lambda n: random.Random(n).randbytes(n)),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dte=st.sampled_from(DteMode), frames=st.lists(frame_payloads, max_size=6))
def test_frames_round_trip(pki, dte, frames):
    asyncio.run(roundtrip(pki, dte, frames))


def test_header_round_trips_and_rejects_a_too_long_one():
    original = header(DteMode.ON, job_id=123456)
    assert LegHeader.decode(original.encode().rstrip(b"\n")) == original
    with pytest.raises(ValueError):
        LegHeader(1, "x" * HEADER_MAX, DteMode.ON, "web1", "media1").encode()


# ---------------------------------------------------------------------------------------
# send_file: os.sendfile on plaintext legs, read and encrypt inside TLS
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dte", [DteMode.ON, DteMode.OFF])
async def test_send_file_delivers_a_file_slice_exactly(pki, tmp_path, dte):
    content = os.urandom(5 * 1024 * 1024 + 123)
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    sink = Sink()
    async with receiver(pki.media1, sink, dte=dte) as server:
        leg = await open_leg("127.0.0.1", server.port, header(dte), pki.web1, "TLSv1.3", 5)
        with path.open("rb") as f:
            f.seek(100)
            await leg.send_file(f, len(content) - 200)
            assert f.tell() == len(content) - 100  # positioned after what was sent
        await leg.send_end()
        assert await leg.recv_frame() == b"ack"
        await leg.close()
        await sink.done.wait()
    assert bytes(sink.payload) == content[100:-100]
    assert leg.bytes_sent == len(content) - 200


async def test_send_file_of_a_file_that_shrank_breaks_the_leg(pki, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 1000)
    sink = Sink()
    async with receiver(pki.media1, sink, dte=DteMode.OFF) as server:
        leg = await open_leg("127.0.0.1", server.port, header(DteMode.OFF), pki.web1, "TLSv1.3", 5)
        with path.open("rb") as f, pytest.raises(ConnectionBroken):
            await leg.send_file(f, 5000)
        leg.abort()
