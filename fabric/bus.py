"""The control plane: typed JSON messages over MQTT (aiomqtt), request/reply and events.

One `Bus` per daemon; it reconnects on its own and tells callers promptly when it cannot.

Topic layout (owned here; build topics with `Topics`, never by hand):

    <prefix>/<domain>/<host>/cmd          requests to one daemon                       QoS 1
    <prefix>/<domain>/reply/<client_id>   replies to the requests one bus made         QoS 1
    <prefix>/<domain>/events              job progress / state events, broadcast       QoS 1
    <prefix>/<domain>/announce            a primary has (re)started: register again    QoS 1
    <prefix>/<domain>/<host>/status       retained Message kind "status",              QoS 1
                                          body {"state": "online" | "offline"};
                                          the broker's last will sets "offline"

`prefix` defaults to "fabric" and `domain` to "default". Every payload is one JSON
object, `Message`, encoded by `encode_message` and read by `decode_message` only.

Overlapping subscriptions on one bus (say `.../events` and `.../#`) may make some
brokers deliver a message twice; each delivery runs every matching handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

import aiomqtt
import structlog

from fabric.broker import parse_broker_url

ERROR_KIND = "error"
STATUS_KIND = "status"
ONLINE = "online"
OFFLINE = "offline"

COMMAND_QOS = 1
MIN_BACKOFF_S = 0.05
# Capped low because a broker restart in a scenario should cost a daemon ~1 s, not more.
MAX_BACKOFF_S = 1.0
DEFAULT_REQUEST_TIMEOUT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0


class BusError(Exception):
    """Base of every error the bus raises."""


class BusUnavailable(BusError):
    """Not connected to the broker (yet, or any more); the bus keeps retrying."""


class BusTimeout(BusError, TimeoutError):
    """No reply came within the timeout."""


class RemoteError(BusError):
    """The other side answered with an error reply."""

    def __init__(self, reason: str, reply: Message) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class BadMessage(BusError, ValueError):
    """A payload that is not a fabric Message, or a body that is not JSON."""


@dataclass(frozen=True)
class Message:
    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    sender: str | None = None
    # Where the message arrived; filled in on receipt, never sent.
    topic: str | None = field(default=None, compare=False)

    @property
    def is_error(self) -> bool:
        return self.kind == ERROR_KIND

    def reply(self, kind: str, body: dict[str, Any] | None = None) -> Message:
        """The answer to this message (the bus fills in correlation and sender)."""
        return Message(kind, body or {}, correlation_id=self.correlation_id)


def error_message(reason: str) -> Message:
    return Message(ERROR_KIND, {"reason": reason})


_WIRE_FIELDS = ("kind", "body", "correlation_id", "reply_to", "sender")


def encode_message(message: Message) -> bytes:
    wire = {name: getattr(message, name) for name in _WIRE_FIELDS}
    try:
        return json.dumps(wire, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise BadMessage(f"body of {message.kind!r} is not JSON-serialisable: {exc}") from exc


def decode_message(payload: bytes | bytearray | str, topic: str | None = None) -> Message:
    try:
        wire = json.loads(payload)
    except (TypeError, ValueError) as exc:
        raise BadMessage(f"payload on {topic} is not JSON: {exc}") from exc
    if not isinstance(wire, dict) or not isinstance(wire.get("kind"), str):
        raise BadMessage(f"payload on {topic} is not a Message (needs a string 'kind')")
    body = wire.get("body", {})
    if not isinstance(body, dict):
        raise BadMessage(f"payload on {topic}: 'body' must be an object, got {type(body).__name__}")
    optional = {}
    for name in ("correlation_id", "reply_to", "sender"):
        value = wire.get(name)
        if value is not None and not isinstance(value, str):
            raise BadMessage(f"payload on {topic}: {name!r} must be a string")
        optional[name] = value
    return Message(wire["kind"], body, topic=topic, **optional)


def _check_segment(what: str, value: str) -> str:
    if not value or any(char in value for char in "/+#\0"):
        raise ValueError(f"{what} {value!r} cannot be an MQTT topic level (empty, or has / + # NUL)")
    return value


@dataclass(frozen=True)
class Topics:
    """The topic layout of one domain."""

    prefix: str = "fabric"
    domain: str = "default"

    def __post_init__(self) -> None:
        _check_segment("topic prefix", self.prefix)
        _check_segment("domain", self.domain)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.domain}"

    def cmd(self, host: str) -> str:
        return f"{self.base}/{_check_segment('host', host)}/cmd"

    def reply(self, client_id: str) -> str:
        return f"{self.base}/reply/{_check_segment('client id', client_id)}"

    def events(self) -> str:
        return f"{self.base}/events"

    def announcements(self) -> str:
        """Where a primary says it has (re)started, so its hosts register again."""
        return f"{self.base}/announce"

    def status(self, host: str) -> str:
        return f"{self.base}/{_check_segment('host', host)}/status"

    def all_status(self) -> str:
        return f"{self.base}/+/status"


Handler = Callable[[Message], Awaitable[Message | None]]

_END_OF_STREAM = object()


class EventStream:
    """Messages on a topic filter, in arrival order; ends when closed or the bus stops."""

    def __init__(self, bus: Bus, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        self._bus = bus
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._closed = False

    def _feed(self, message: Message) -> None:
        if not self._closed:
            self._queue.put_nowait(message)

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(_END_OF_STREAM)

    async def get(self, timeout: float | None = None) -> Message:
        """The next message; BusTimeout after `timeout` s, BusUnavailable once ended."""
        try:
            async with asyncio.timeout(timeout):
                item = await self._queue.get()
        except TimeoutError:
            raise BusTimeout(f"no message on {self.topic_filter} within {timeout}s") from None
        if item is _END_OF_STREAM:
            self._queue.put_nowait(_END_OF_STREAM)  # later calls end too
            raise BusUnavailable(f"event stream on {self.topic_filter} is closed")
        return item

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except BusUnavailable:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self._end()
        await self._bus._remove_consumer(self.topic_filter, self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


Consumer = Handler | EventStream


class Bus:
    """One daemon's connection to the control plane."""

    def __init__(
        self,
        url: str,
        client_id: str,
        topic_prefix: str = "fabric",
        *,
        domain: str = "default",
        host: str | None = None,
        log_context: dict[str, Any] | None = None,
        keepalive_s: int = 15,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.url = url
        self._broker_host, self._broker_port = parse_broker_url(url)
        self.client_id = _check_segment("client id", client_id)
        self.host = host or client_id
        self.topics = Topics(topic_prefix, domain)
        self.reply_topic = self.topics.reply(client_id)
        self.status_topic = self.topics.status(self.host)
        self.request_timeout_s = request_timeout_s
        self.connected = asyncio.Event()
        self._keepalive_s = keepalive_s
        self._log = structlog.get_logger(__name__).bind(client_id=client_id, **(log_context or {}))
        self._consumers: dict[str, list[Consumer]] = {}
        self._pending_replies: dict[str, asyncio.Future[Message]] = {}
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._client: aiomqtt.Client | None = None
        # Resolved when the current connection ends, so in-flight publishes stop waiting
        # for a PUBACK that will never come.
        self._connection_lost: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._aborting = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, *, wait: bool = True, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        """Start connecting; with `wait`, return once connected or raise BusUnavailable."""
        if self._runner is not None:
            return
        self._runner = asyncio.create_task(self._run(), name=f"bus:{self.client_id}")
        if not wait:
            return
        try:
            await self.wait_connected(timeout)
        except BaseException:
            await self.stop()
            raise

    async def wait_connected(self, timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            raise BusUnavailable(f"no connection to broker {self.url} within {timeout}s") from None

    async def stop(self) -> None:
        """Say "offline", disconnect cleanly (so no last will), end handlers and streams."""
        if self._runner is None:
            return
        client = self._client
        if client is not None and self.connected.is_set():
            try:
                await client.publish(
                    self.status_topic, self._status_payload(OFFLINE), qos=COMMAND_QOS, retain=True, timeout=1
                )
            except aiomqtt.MqttError:
                pass  # the broker is gone; nobody is listening for the status anyway
        await self._shut_down("bus.stopped")

    async def abort(self) -> None:
        """Drop the connection as a crash would, with no DISCONNECT: the broker sends the will.

        For failure injection inside one process; the bus is stopped afterwards.
        """
        runner = self._runner
        if runner is None:
            return
        self._aborting = True
        client = self._client
        # aiomqtt does not expose its socket; paho's socket() is public on paho's client.
        sock = client._client.socket() if client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            # The runner sees the connection end and returns without reconnecting; waiting
            # for that (rather than cancelling) keeps `async with client` from trying a
            # graceful DISCONNECT on the dead socket.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(runner), timeout=2)
        await self._shut_down("bus.aborted")

    async def _shut_down(self, event: str) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        # Cancelling the runner unwinds `async with client`, which sends DISCONNECT.
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        for task in list(self._handler_tasks):
            task.cancel()
        await asyncio.gather(*self._handler_tasks, return_exceptions=True)
        for consumers in self._consumers.values():
            for consumer in consumers:
                if isinstance(consumer, EventStream):
                    consumer._end()
        self._consumers.clear()
        self._fail_pending(BusUnavailable("bus stopped"))
        self._aborting = False
        self._log.debug(event)

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

    # -- connection loop -------------------------------------------------------------

    def _status_payload(self, state: str) -> bytes:
        return encode_message(Message(STATUS_KIND, {"state": state, "host": self.host}, sender=self.client_id))

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._broker_host,
            self._broker_port,
            identifier=self.client_id,
            will=aiomqtt.Will(self.status_topic, self._status_payload(OFFLINE), qos=COMMAND_QOS, retain=True),
            clean_session=True,
            keepalive=self._keepalive_s,
            timeout=DEFAULT_CONNECT_TIMEOUT_S,
            # paho never sets TCP_NODELAY: a small request then waits on Nagle plus the
            # peer's delayed ACK, about 90 ms a round trip instead of 1 ms.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        # aiomqtt warns above 10 unacknowledged calls; a burst of requests is normal here.
        client.pending_calls_threshold = 1000
        return client

    async def _run(self) -> None:
        backoff = MIN_BACKOFF_S
        was_connected = False
        while True:
            client = self._new_client()
            self._connection_lost = asyncio.get_running_loop().create_future()
            try:
                async with client:
                    self._client = client
                    await client.publish(self.status_topic, self._status_payload(ONLINE), qos=COMMAND_QOS, retain=True)
                    # A clean session forgets subscriptions, so every (re)connect makes them again.
                    topic_filters = dict.fromkeys([self.reply_topic, *self._consumers])
                    await client.subscribe([(topic_filter, COMMAND_QOS) for topic_filter in topic_filters])
                    backoff = MIN_BACKOFF_S
                    was_connected = True
                    self.connected.set()
                    self._log.info("bus.connected", broker=self.url)
                    async for mqtt_message in client.messages:
                        self._dispatch(mqtt_message)
            except aiomqtt.MqttError as exc:
                if was_connected:
                    self._log.warning("bus.disconnected", broker=self.url, error=str(exc))
                elif backoff == MIN_BACKOFF_S:
                    # First failure of an outage at warning; the retries that follow at debug.
                    self._log.warning("bus.unreachable", broker=self.url, error=str(exc))
                else:
                    self._log.debug("bus.connect_failed", broker=self.url, error=str(exc), retry_in_s=backoff)
                was_connected = False
            except Exception:
                # Never let one surprise end the control plane for this daemon.
                self._log.exception("bus.loop_failed", broker=self.url)
                was_connected = False
            finally:
                self._client = None
                self.connected.clear()
                if not self._connection_lost.done():
                    self._connection_lost.set_result(None)
                self._fail_pending(BusUnavailable(f"lost connection to broker {self.url}"))
            if self._aborting:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _fail_pending(self, error: BusError) -> None:
        for future in self._pending_replies.values():
            if not future.done():
                future.set_exception(error)

    # -- incoming --------------------------------------------------------------------

    def _dispatch(self, mqtt_message: aiomqtt.Message) -> None:
        topic = mqtt_message.topic.value
        try:
            message = decode_message(mqtt_message.payload, topic)
        except BadMessage as exc:
            self._log.warning("bus.bad_message", topic=topic, error=str(exc))
            return
        if topic == self.reply_topic:
            future = self._pending_replies.get(message.correlation_id or "")
            if future is not None and not future.done():
                future.set_result(message)
            else:
                self._log.debug("bus.late_reply", kind=message.kind, correlation_id=message.correlation_id)
        for topic_filter, consumers in self._consumers.items():
            if not mqtt_message.topic.matches(topic_filter):
                continue
            for consumer in consumers:
                if isinstance(consumer, EventStream):
                    consumer._feed(message)
                else:
                    task = asyncio.create_task(self._run_handler(consumer, message))
                    self._handler_tasks.add(task)
                    task.add_done_callback(self._handler_tasks.discard)

    async def _run_handler(self, handler: Handler, message: Message) -> None:
        log = self._log.bind(topic=message.topic, kind=message.kind, correlation_id=message.correlation_id)
        try:
            answer = await handler(message)
            if answer is not None and not isinstance(answer, Message):
                raise TypeError(f"handler returned {type(answer).__name__}, not Message or None")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("bus.handler_failed")
            answer = error_message(f"{type(exc).__name__}: {exc}")
        if answer is None or message.reply_to is None:
            return
        reply = replace(answer, correlation_id=message.correlation_id, reply_to=None, sender=self.client_id)
        try:
            payload = encode_message(reply)
        except BadMessage as exc:
            log.error("bus.reply_unencodable", error=str(exc))
            payload = encode_message(replace(error_message(str(exc)), correlation_id=message.correlation_id))
        try:
            await self._publish_payload(message.reply_to, payload)
        except BusUnavailable as exc:
            log.warning("bus.reply_lost", reply_to=message.reply_to, error=str(exc))

    # -- outgoing --------------------------------------------------------------------

    async def _publish_payload(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        client, lost = self._client, self._connection_lost
        if client is None or lost is None or not self.connected.is_set():
            raise BusUnavailable(f"not connected to broker {self.url}")
        sending = asyncio.ensure_future(client.publish(topic, payload, qos=COMMAND_QOS, retain=retain))
        try:
            await asyncio.wait({sending, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not sending.done():
                raise BusUnavailable(f"lost connection to broker {self.url} while publishing to {topic}")
            sending.result()
        except aiomqtt.MqttError as exc:
            raise BusUnavailable(f"could not publish to {topic}: {exc}") from exc
        finally:
            if not sending.done():
                sending.cancel()

    async def publish(self, topic: str, kind: str, body: dict[str, Any] | None = None, *, retain: bool = False) -> None:
        """Send one message (an event, or a command nobody answers); QoS 1."""
        message = Message(kind, body or {}, sender=self.client_id)
        await self._publish_payload(topic, encode_message(message), retain=retain)

    async def request(
        self, topic: str, kind: str, body: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Message:
        """Send a command and wait for its reply.

        Raises BusUnavailable at once when disconnected, BusTimeout when no reply comes
        in time, RemoteError when the reply is an error.
        """
        timeout = self.request_timeout_s if timeout is None else timeout
        correlation_id = uuid.uuid4().hex
        message = Message(
            kind, body or {}, correlation_id=correlation_id, reply_to=self.reply_topic, sender=self.client_id
        )
        payload = encode_message(message)
        reply_future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending_replies[correlation_id] = reply_future
        try:
            async with asyncio.timeout(timeout):
                await self._publish_payload(topic, payload)
                reply = await reply_future
        except TimeoutError:
            raise BusTimeout(f"no reply to {kind!r} on {topic} within {timeout}s") from None
        finally:
            del self._pending_replies[correlation_id]
        if reply.is_error:
            raise RemoteError(str(reply.body.get("reason", "unspecified error")), reply)
        return reply

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Run `handler` as a task for each message; a returned Message answers a request.

        While disconnected this only registers: the bus subscribes on (re)connect.
        """
        await self._add_consumer(topic_filter, handler)

    async def unsubscribe(self, topic_filter: str, handler: Handler | None = None) -> None:
        """Drop one handler, or every consumer of the filter when `handler` is None."""
        if handler is None:
            for consumer in list(self._consumers.get(topic_filter, [])):
                await self._remove_consumer(topic_filter, consumer)
        else:
            await self._remove_consumer(topic_filter, handler)

    async def events(self, topic_filter: str | None = None) -> EventStream:
        """An async iterator over messages on `topic_filter` (default: this domain's events)."""
        stream = EventStream(self, topic_filter or self.topics.events())
        await self._add_consumer(stream.topic_filter, stream)
        return stream

    async def _add_consumer(self, topic_filter: str, consumer: Consumer) -> None:
        self._consumers.setdefault(topic_filter, []).append(consumer)
        # Registered first, so a reconnect racing with us subscribes it either way;
        # subscribing twice to one filter is harmless in MQTT.
        client = self._client
        if client is None:
            return
        try:
            await client.subscribe(topic_filter, qos=COMMAND_QOS)
        except aiomqtt.MqttError as exc:
            self._log.debug("bus.subscribe_deferred", topic_filter=topic_filter, error=str(exc))

    async def _remove_consumer(self, topic_filter: str, consumer: Consumer) -> None:
        consumers = self._consumers.get(topic_filter)
        if not consumers or consumer not in consumers:
            return
        consumers.remove(consumer)
        if consumers:
            return
        del self._consumers[topic_filter]
        client = self._client
        if client is None or topic_filter == self.reply_topic:
            return
        try:
            await client.unsubscribe(topic_filter)
        except aiomqtt.MqttError as exc:
            self._log.debug("bus.unsubscribe_failed", topic_filter=topic_filter, error=str(exc))
