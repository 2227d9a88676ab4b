"""The control plane against real brokers (embedded amqtt, and Mosquitto when installed).

Real sockets and real aiomqtt clients throughout; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from fabric.broker import EmbeddedBroker, MosquittoBroker, parse_broker_url
from fabric.bus import (
    OFFLINE,
    ONLINE,
    BadMessage,
    Bus,
    BusTimeout,
    BusUnavailable,
    Message,
    RemoteError,
    Topics,
    decode_message,
    encode_message,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TOPICS = Topics()

needs_mosquitto = pytest.mark.skipif(not MosquittoBroker.available(), reason="mosquitto binary not installed")


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker() as running:
        yield running


async def echo(message: Message) -> Message:
    return message.reply("echoed", {"got": message.body, "kind": message.kind})


async def serve_echo(url: str) -> Bus:
    server = Bus(url, "media1", log_context={"host": "media1", "role": "media"})
    await server.start()
    await server.subscribe(TOPICS.cmd("media1"), echo)
    return server


# -- pure pieces -----------------------------------------------------------------------


def test_parse_broker_url_accepts_host_and_port() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_broker_url("mqtt://broker.example:31883/") == ("broker.example", 31883)


@pytest.mark.parametrize(
    "bad",
    ["", "127.0.0.1:1883", "tcp://127.0.0.1:1883", "mqtts://h:8883", "mqtt://h", "mqtt://:1883",
     "mqtt://h:notaport", "mqtt://h:70000", "mqtt://h:1883/topic", "mqtt://u:p@h:1883"],
)
def test_parse_broker_url_rejects_anything_else(bad: str) -> None:
    with pytest.raises(ValueError, match="mqtt://"):
        parse_broker_url(bad)


def test_message_encoding_round_trips_and_rejects_garbage() -> None:
    message = Message("backup", {"job": 7, "files": ["a", "b"]}, "c1", "fabric/default/reply/x", "primary1")
    decoded = decode_message(encode_message(message), topic="t")
    assert decoded == message
    assert decoded.topic == "t"
    for garbage in (b"not json", b"[1,2]", b'{"body":{}}', b'{"kind":"k","body":[]}', b'{"kind":"k","sender":3}'):
        with pytest.raises(BadMessage):
            decode_message(garbage)
    with pytest.raises(BadMessage, match="JSON"):
        encode_message(Message("k", {"when": object()}))


def test_topic_layout() -> None:
    topics = Topics("fabric", "prod")
    assert topics.cmd("media1") == "fabric/prod/media1/cmd"
    assert topics.reply("client-7") == "fabric/prod/reply/client-7"
    assert topics.events() == "fabric/prod/events"
    assert topics.status("media1") == "fabric/prod/media1/status"
    with pytest.raises(ValueError, match="topic level"):
        topics.cmd("media/1")
    with pytest.raises(ValueError, match="topic level"):
        Topics("fabric", "#")


# -- broker lifecycle ------------------------------------------------------------------


async def test_embedded_broker_starts_fast_on_loopback_and_stops_clean() -> None:
    before = asyncio.all_tasks()
    started = time.perf_counter()
    broker = EmbeddedBroker()
    await broker.start()
    assert time.perf_counter() - started < 1.0
    host, port = parse_broker_url(broker.url)
    assert host == "127.0.0.1" and port > 0
    async with aiomqtt.Client(host, port, identifier="probe"):
        pass
    await broker.stop()
    await asyncio.sleep(0)
    leftover = {task for task in asyncio.all_tasks() - before if not task.done()}
    assert not leftover, leftover
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(host, port, identifier="probe2", timeout=1):
            pass


# -- request / reply -------------------------------------------------------------------


async def test_request_reply_round_trip(broker: EmbeddedBroker) -> None:
    server = await serve_echo(broker.url)
    async with server, Bus(broker.url, "primary1") as client:
        reply = await client.request(TOPICS.cmd("media1"), "backup", {"job": 1}, timeout=2)
    assert reply.kind == "echoed"
    assert reply.body == {"got": {"job": 1}, "kind": "backup"}
    assert reply.sender == "media1"
    assert reply.correlation_id is not None
    assert reply.topic == TOPICS.reply("primary1")


async def test_concurrent_requests_get_their_own_answers(broker: EmbeddedBroker) -> None:
    async def double_slowly(message: Message) -> Message:
        n = message.body["n"]
        # Later requests finish first, so replies come back out of order.
        await asyncio.sleep((20 - n) * 0.005)
        return message.reply("doubled", {"n": n, "double": 2 * n})

    async with Bus(broker.url, "media1") as server, Bus(broker.url, "primary1") as client:
        await server.subscribe(TOPICS.cmd("media1"), double_slowly)
        replies = await asyncio.gather(
            *(client.request(TOPICS.cmd("media1"), "double", {"n": n}, timeout=3) for n in range(20))
        )
    assert [reply.body for reply in replies] == [{"n": n, "double": 2 * n} for n in range(20)]
    assert len({reply.correlation_id for reply in replies}) == 20


async def test_handler_exception_comes_back_as_remote_error(broker: EmbeddedBroker) -> None:
    async def explode(message: Message) -> Message:
        if message.kind == "explode":
            raise ValueError("disk on fire")
        return message.reply("ok")

    async with Bus(broker.url, "media1") as server, Bus(broker.url, "primary1") as client:
        await server.subscribe(TOPICS.cmd("media1"), explode)
        with pytest.raises(RemoteError, match="disk on fire") as caught:
            await client.request(TOPICS.cmd("media1"), "explode", timeout=2)
        assert caught.value.reply.kind == "error"
        assert "ValueError" in caught.value.reason
        # The bus survived its handler's failure.
        assert (await client.request(TOPICS.cmd("media1"), "fine", timeout=2)).kind == "ok"


async def test_request_to_unserved_topic_times_out_on_time(broker: EmbeddedBroker) -> None:
    async with Bus(broker.url, "primary1") as client:
        started = time.perf_counter()
        with pytest.raises(BusTimeout, match="nobody"):
            await client.request(TOPICS.cmd("nobody"), "backup", timeout=0.3)
        elapsed = time.perf_counter() - started
    assert 0.3 <= elapsed < 0.6


async def test_slow_handler_does_not_block_the_next_message(broker: EmbeddedBroker) -> None:
    second_arrived = asyncio.Event()

    async def handler(message: Message) -> Message:
        if message.kind == "first":
            # Only returns if "second" is handled while this one is still running.
            await asyncio.wait_for(second_arrived.wait(), timeout=2)
            return message.reply("first-done")
        second_arrived.set()
        return message.reply("second-done")

    async with Bus(broker.url, "media1") as server, Bus(broker.url, "primary1") as client:
        await server.subscribe(TOPICS.cmd("media1"), handler)
        first = asyncio.create_task(client.request(TOPICS.cmd("media1"), "first", timeout=3))
        await asyncio.sleep(0.05)
        second = await client.request(TOPICS.cmd("media1"), "second", timeout=1)
        assert second.kind == "second-done"
        assert (await first).kind == "first-done"


async def test_events_stream_and_bad_payloads_do_not_kill_the_bus(broker: EmbeddedBroker) -> None:
    host, port = parse_broker_url(broker.url)
    async with Bus(broker.url, "primary1") as listener, Bus(broker.url, "media1") as sender:
        async with await listener.events() as stream:
            async with aiomqtt.Client(host, port, identifier="vandal") as vandal:
                await vandal.publish(TOPICS.events(), b"\xff not json", qos=1)
            for n in range(3):
                await sender.publish(TOPICS.events(), "job.progress", {"job": 9, "pct": n * 50})
            received = [await stream.get(timeout=2) for _ in range(3)]
        assert [m.body["pct"] for m in received] == [0, 50, 100]
        assert all(m.sender == "media1" and m.topic == TOPICS.events() for m in received)
        assert listener.connected.is_set()


# -- broker failure and reconnect ------------------------------------------------------


async def test_broker_loss_fails_fast_and_reconnect_restores_service() -> None:
    broker = EmbeddedBroker()
    await broker.start()
    port = broker.port
    never = asyncio.Event()

    async def serve(message: Message) -> Message:
        if message.kind == "hang":
            await never.wait()
        return message.reply("pong")

    server = Bus(broker.url, "media1")
    client = Bus(broker.url, "primary1")
    try:
        await server.start()
        await client.start()
        await server.subscribe(TOPICS.cmd("media1"), serve)
        assert (await client.request(TOPICS.cmd("media1"), "ping", timeout=2)).kind == "pong"

        # A request waiting for its reply when the broker dies fails at once, not at its timeout.
        in_flight = asyncio.create_task(client.request(TOPICS.cmd("media1"), "hang", timeout=10))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        await broker.stop()
        with pytest.raises(BusUnavailable):
            await in_flight
        assert time.perf_counter() - started < 1.0
        assert not client.connected.is_set()

        started = time.perf_counter()
        with pytest.raises(BusUnavailable):
            await client.request(TOPICS.cmd("media1"), "ping", timeout=5)
        with pytest.raises(BusUnavailable):
            await client.publish(TOPICS.events(), "job.progress", {})
        assert time.perf_counter() - started < 0.1

        await asyncio.sleep(0.5)  # let the backoff grow, as in a real outage
        broker = EmbeddedBroker(port=port)
        await broker.start()
        await client.wait_connected(timeout=3)
        await server.wait_connected(timeout=3)
        # The fresh broker knows no subscriptions: this only works if the server re-subscribed.
        assert (await client.request(TOPICS.cmd("media1"), "ping", timeout=2)).kind == "pong"
    finally:
        await client.stop()
        await server.stop()
        await broker.stop()


async def test_start_without_broker_raises_unavailable_and_cleans_up() -> None:
    broker = EmbeddedBroker()
    await broker.start()
    url = broker.url
    await broker.stop()
    bus = Bus(url, "primary1")
    with pytest.raises(BusUnavailable, match="within"):
        await bus.start(timeout=0.3)
    assert bus._runner is None


# -- status and last will --------------------------------------------------------------

DOOMED_DAEMON = """
import asyncio, sys
from fabric.bus import Bus

async def main() -> None:
    bus = Bus(sys.argv[1], "doomed")
    await bus.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def next_state(stream, timeout: float = 5.0) -> str:
    message = await stream.get(timeout=timeout)
    assert message.kind == "status"
    return message.body["state"]


async def test_status_online_then_offline_on_clean_stop(broker: EmbeddedBroker) -> None:
    async with Bus(broker.url, "primary1") as observer:
        async with await observer.events(TOPICS.status("media1")) as stream:
            async with Bus(broker.url, "media1"):
                assert await next_state(stream) == ONLINE
            assert await next_state(stream) == OFFLINE


async def test_abort_drops_the_connection_so_the_will_speaks(broker: EmbeddedBroker) -> None:
    async with Bus(broker.url, "primary1") as observer:
        async with await observer.events(TOPICS.status("media1")) as stream:
            crashing = Bus(broker.url, "media1")
            await crashing.start()
            assert await next_state(stream) == ONLINE
            started = time.perf_counter()
            await crashing.abort()
            assert time.perf_counter() - started < 1.0
            assert not crashing.connected.is_set()
            assert await next_state(stream) == OFFLINE
            # Aborted means gone: it must not come back online by itself.
            with pytest.raises(BusTimeout):
                await stream.get(timeout=0.3)
            with pytest.raises(BusUnavailable):
                await crashing.request(TOPICS.cmd("primary1"), "ping")


async def test_last_will_marks_a_killed_daemon_offline(broker: EmbeddedBroker) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED_DAEMON, broker.url,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with Bus(broker.url, "primary1") as observer:
            async with await observer.events(TOPICS.status("doomed")) as stream:
                assert await next_state(stream, timeout=10) == ONLINE
                child.send_signal(signal.SIGKILL)  # no DISCONNECT packet: only the will speaks
                await child.wait()
                assert await next_state(stream) == OFFLINE
            # Retained: someone looking later still sees it offline.
            async with await observer.events(TOPICS.status("doomed")) as late:
                assert await next_state(late) == OFFLINE
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


# -- Mosquitto -------------------------------------------------------------------------


@needs_mosquitto
async def test_round_trip_and_will_against_mosquitto() -> None:
    started = time.perf_counter()
    async with MosquittoBroker() as mosquitto:
        assert time.perf_counter() - started < 2.0
        assert parse_broker_url(mosquitto.url)[0] == "127.0.0.1"
        server = await serve_echo(mosquitto.url)
        async with server, Bus(mosquitto.url, "primary1") as client:
            reply = await client.request(TOPICS.cmd("media1"), "backup", {"job": 2}, timeout=2)
            assert reply.body == {"got": {"job": 2}, "kind": "backup"}
            replies = await asyncio.gather(
                *(client.request(TOPICS.cmd("media1"), "n", {"n": n}, timeout=2) for n in range(20))
            )
            assert [r.body["got"]["n"] for r in replies] == list(range(20))
            async with await client.events(TOPICS.status("media1")) as stream:
                assert await next_state(stream) == ONLINE
    assert not mosquitto.running
