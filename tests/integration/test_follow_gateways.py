"""Envoy daemons follow the gateways (issue 19) on real TLS gateways without Ray: two
``GatewayServer``s on 127.0.0.1 in front of one real partition (test_envoy_daemon's ``Fleet``
plus a second gateway), real `vigo-envoy run` subprocesses.

1. An envoy joined with ONE gateway learns the other from its check-in answer (`vigo-envoy
   status` shows the list) and moves there at once when its gateway goes away; every run is
   stored once.
2. A gateway that stops answering while its TCP connection stays up (a frozen relay in front
   of it: the kernel keeps acknowledging, so only a missed answer can tell) is left after the
   run's check-in budget, for the other gateway, which gets the queued reports at once.

The kernel's side of a vanished host (TCP keepalive, TCP_USER_TIMEOUT) needs a host that really
vanishes: tests/hosts/test_follow_topology.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import EXAMPLE_STACK, SECRET
from tests.integration.test_envoy_daemon import (
    Envoy,
    Fleet,
    assert_stored_exactly_once,
    free_port,
    no_traceback,
    wait_for,
)
from tests.serverharness import ADMIN_TOKEN
from vigo.agent.link import STABLE_S
from vigo.server.gateway import GatewayServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONNECTED = re.compile(r"daemon: connected to (\S+)")


class TwoGateways(Fleet):
    """``Fleet``'s gateway (``a``) plus a second one (``b``) on the same partition."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.b: GatewayServer | None = None
        self.b_port = free_port()

    @property
    def b_address(self) -> str:
        return f"127.0.0.1:{self.b_port}"

    def start_b(self) -> None:
        material = self.partition.gateway_material()

        async def go() -> GatewayServer:
            gw = GatewayServer(self.backend, ca_pem=material["ca_pem"], cert_pem=material["cert_pem"],
                               key_pem=material["key_pem"], cfg=self.cfg.gateway, host="127.0.0.1",
                               port=self.b_port, admin_token=lambda: ADMIN_TOKEN,
                               revocations=material["revocations"])
            await gw.start()
            return gw

        self.b = self.call(go())

    def announce(self, addresses: list[str]) -> None:
        """What control would tell both gateways: these serve now."""
        for gw in (self.gateway, self.b):
            if gw is not None:
                gw.gateways = list(addresses)

    def close(self) -> None:
        if self.b is not None:
            self.call(self.b.stop())
        super().close()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[TwoGateways]:
    f = TwoGateways(tmp_path / "server")
    try:
        f.admin("secrets.set", {"name": "api_token", "value": SECRET})
        f.push(EXAMPLE_STACK)
        f.start()
        f.start_b()
        yield f
    finally:
        f.close()


@pytest.fixture
def make_envoy(tmp_path: Path) -> Iterator[Callable[..., Envoy]]:
    """Subprocess envoy daemons (test_envoy_daemon's ``Envoy``), killed at the end."""
    made: list[Envoy] = []

    def make(name: str, **kwargs: Any) -> Envoy:
        made.append(Envoy(tmp_path / "envoys", name, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for envoy in made:
            envoy.stop_if_running()


class Relay:
    """A TCP relay on 127.0.0.1 in front of a gateway; ``freeze()`` stops moving bytes in both
    directions and keeps every connection open (a gateway that went silent, as far as the
    envoy can tell without its kernel's help)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target_port: int) -> None:
        self.loop, self.target_port = loop, target_port
        self.port = free_port()
        self.frozen = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if self.frozen.is_set():
                        await asyncio.Event().wait()  # hold it: nothing moves, nothing closes
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def freeze(self) -> None:
        self.loop.call_soon_threadsafe(self.frozen.set)


def test_an_envoy_joined_with_one_gateway_learns_the_other_and_moves_there_at_once(two: TwoGateways, make_envoy):
    two.announce([two.address, two.b_address])
    envoy = make_envoy("learner", interval_s=1.0)
    envoy.join(two.address, two.token())
    envoy.start()
    wait_for(lambda: envoy.runs() and CONNECTED.findall(envoy.log_text()), 30, "a first run, connected")
    status = wait_for(lambda: (s := envoy.status()).get("gateways") and s, 30, "the gateway list learned")
    assert status["servers"] == [two.address]  # the joined address, as given
    assert sorted(status["gateways"]["list"]) == sorted([two.address, two.b_address])
    assert sorted(status["dial_order"]) == sorted([two.address, two.b_address])
    assert status["link"]["server"] == two.address  # joined through a; it stays while a works

    time.sleep(STABLE_S)  # a connection that served a while (a shorter one waits the backoff)
    runs_before = len(envoy.runs())
    two.stop()  # gateway a goes away; its connections close
    gone = time.monotonic()
    wait_for(lambda: two.b_address in CONNECTED.findall(envoy.log_text()), 10, "the daemon on gateway b",
             every=0.05)
    moved_s = time.monotonic() - gone
    assert moved_s < 3.0, f"took {moved_s:.1f} s to move to the other gateway"
    wait_for(lambda: len(envoy.runs()) >= runs_before + 3 and not envoy.queued(), 30, "runs flushed through b")
    assert envoy.terminate() == 0
    assert_stored_exactly_once(two.stored(envoy.id), envoy.run_ids())
    assert "trying the next gateway now" in envoy.log_text()
    no_traceback(envoy)
    print(f"\ngateway a stopped -> daemon connected to b: {moved_s:.2f} s")


def test_a_gateway_that_goes_silent_is_left_after_the_checkin_budget(two: TwoGateways, make_envoy):
    relay = Relay(two.loop, two.port)
    two.call(relay.start())
    two.announce([relay.address, two.b_address])  # as the envoy reaches them
    budget = 2.0
    envoy = make_envoy("silent", interval_s=1.0, config={"run_checkin_budget_s": budget, "keepalive_s": 30.0})
    envoy.join(relay.address, two.token())
    envoy.start()
    wait_for(lambda: envoy.status().get("gateways") and relay.address in CONNECTED.findall(envoy.log_text()),
             30, "connected through the relay, the list learned")
    time.sleep(STABLE_S)
    runs_before = len(envoy.runs())
    relay.freeze()
    frozen = time.monotonic()
    wait_for(lambda: two.b_address in CONNECTED.findall(envoy.log_text()), 20, "the daemon on gateway b",
             every=0.05)
    moved_s = time.monotonic() - frozen
    # The next run (within the 1 s interval) waits its check-in budget, then the daemon drops
    # the link and dials b at once: no reconnect backoff, no flush timeout on top.
    assert moved_s < 1.0 + budget + 2.0, f"took {moved_s:.1f} s to leave the silent gateway"
    wait_for(lambda: len(envoy.runs()) >= runs_before + 3 and not envoy.queued(), 30, "runs flushed through b")
    log = envoy.log_text()
    assert f"no checkin answer within {budget:g} s" in log
    assert envoy.terminate() == 0
    assert_stored_exactly_once(two.stored(envoy.id), envoy.run_ids())
    no_traceback(envoy)
    print(f"\ngateway went silent -> daemon connected to the other: {moved_s:.2f} s (budget {budget:g} s)")
