"""Where a daemon's data legs really go: straight to the receiver, or through a fault relay.

`fabric run` hands every daemon a route; with relays in it, links can be cut, broken
after N bytes, and watched on the wire, without any daemon knowing.
"""

from __future__ import annotations

import asyncio
from typing import Callable
from dataclasses import dataclass, field

import structlog

from fabric.relay import Relay

log = structlog.get_logger(__name__)


def link_key(a: str, b: str) -> frozenset[str]:
    """A link is a pair of hosts; its faults hit both directions."""
    return frozenset((a, b))


@dataclass
class LinkFaults:
    cut: bool = False
    cut_after: int | None = None
    on_break: Callable[[], None] | None = None


@dataclass
class RelayNetwork:
    """One relay per (sender, receiver, receiver port); faults kept per link."""

    capture: bool = False
    relays: dict[tuple[str, str, int], Relay] = field(default_factory=dict)
    faults: dict[frozenset[str], LinkFaults] = field(default_factory=dict)
    host_faults: dict[str, LinkFaults] = field(default_factory=dict)  # every link of one host
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def route(self, sender: str, receiver: str, port: int) -> tuple[str, int]:
        async with self._lock:
            key = (sender, receiver, port)
            relay = self.relays.get(key)
            if relay is None:
                relay = await Relay.start("127.0.0.1", port, capture=self.capture)
                self.relays[key] = relay
                self._apply(relay, self.faults.get(link_key(sender, receiver)))
                for host in (sender, receiver):
                    self._apply(relay, self.host_faults.get(host))
            return "127.0.0.1", relay.port

    def relays_of(self, a: str, b: str) -> list[Relay]:
        pair = link_key(a, b)
        return [r for (s, t, _), r in self.relays.items() if link_key(s, t) == pair]

    def captured(self, sender: str, receiver: str) -> bytes:
        """Every byte the sender put on the wire towards the receiver, over all its legs."""
        return b"".join(r.captured("up") for (s, t, _), r in self.relays.items() if (s, t) == (sender, receiver))

    async def cut(self, a: str, b: str, after: int | None = None) -> None:
        faults = self.faults.setdefault(link_key(a, b), LinkFaults())
        if after is None:
            faults.cut = True
        else:
            faults.cut_after = after
        for relay in self.relays_of(a, b):
            self._apply(relay, faults)
        log.info("link cut", link=f"{a}<->{b}", after=after)

    def break_host_after(self, host: str, after: int, on_break: Callable[[], None]) -> None:
        """The next leg to or from `host` breaks after `after` bytes, then `on_break` runs
        (once, whichever leg it is): a host dying mid-transfer."""
        fired = False

        def once() -> None:
            nonlocal fired
            self.host_faults.pop(host, None)
            for (s, t, _), relay in self.relays.items():
                if host in (s, t):
                    relay.cut_after_cancel()
            if not fired:
                fired = True
                on_break()

        faults = LinkFaults(cut_after=after, on_break=once)
        self.host_faults[host] = faults
        for (s, t, _), relay in self.relays.items():
            if host in (s, t):
                self._apply(relay, faults)

    async def heal(self, a: str, b: str) -> None:
        self.faults.pop(link_key(a, b), None)
        for relay in self.relays_of(a, b):
            await relay.heal()
        log.info("link healed", link=f"{a}<->{b}")

    @staticmethod
    def _apply(relay: Relay, faults: LinkFaults | None) -> None:
        if faults is None:
            return
        if faults.cut:
            relay.cut()
        if faults.cut_after is not None:
            relay.cut_after(faults.cut_after, faults.on_break)

    async def close(self) -> None:
        for relay in self.relays.values():
            await relay.close()
        self.relays.clear()
