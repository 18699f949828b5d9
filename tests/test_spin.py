"""Polling before parking (transport/_spin.py): when it spins, when it must not.

The rules under test: a spin happens only when no other task is runnable,
and never before this scheduler batch's other tasks have run; a spin that
finds nothing disarms it until a park ends by a message within the limit;
an answer found by a spin is taken without parking. Real sockets over
inproc; no test waits on a timer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
import zmq

from actors import Actor, Delivery, NodeConfig, open_node
from transport import LocalProtocolError, Socket, _spin, dealer_socket, router_socket
from transport._socket import SocketPoller
from transport._spin import Spin, _CpuPressure

Ctx = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture(autouse=True)
def _no_cpu_pressure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The spin's rules apart from the machine's load: a machine without PSI
    (polling allowed), so a busy CI host does not decide these tests."""
    monkeypatch.setattr(_spin, "_PRESSURE", _CpuPressure(str(tmp_path / "no-psi")))


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    context: Ctx = zmq.Context()
    yield context
    context.destroy(linger=0)


def _pair(ctx: Ctx, name: str) -> tuple[Socket, Socket]:
    router = router_socket(ctx)
    router.bind(f"inproc://spin-{name}")
    dealer = dealer_socket(ctx, routing_id=b"d")
    dealer.connect(f"inproc://spin-{name}")
    return router, dealer


async def test_a_spin_that_finds_something_returns_it_and_stays_armed() -> None:
    spin = Spin(0.05)
    calls = iter([0, 0, 7])
    assert spin.poll(lambda: next(calls)) == 7
    assert (spin.spins, spin.hits, spin.armed) == (1, 1, True)


async def test_a_spin_that_finds_nothing_disarms_until_a_short_park() -> None:
    spin = Spin(0.0001)
    began = time.perf_counter()
    assert spin.poll(lambda: 0) is None
    assert time.perf_counter() - began < 0.05, "a spin outlived its limit by far"
    assert (spin.spins, spin.hits, spin.armed) == (1, 0, False)
    # Disarmed: the probe is not even called.
    assert spin.poll(lambda: 1 // 0) is None
    # A park ended by a wake, or one longer than the limit, leaves it off.
    spin.parked(time.perf_counter(), by_message=False)
    spin.parked(time.perf_counter() - 1.0, by_message=True)
    assert not spin.armed
    spin.parked(time.perf_counter(), by_message=True)
    assert spin.armed


async def test_no_spin_while_another_task_is_runnable() -> None:
    spin = Spin(0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
        # The new task is runnable and has not run: polling would hold it up.
        assert spin.poll(lambda: 1 // 0) is None
    assert spin.spins == 0
    assert spin.armed


def test_cpu_pressure_stops_polling_while_others_wait_for_a_cpu(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"

    def report(waited_us: int) -> None:
        psi.write_text(
            f"some avg10=0.00 avg60=0.00 avg300=0.00 total={waited_us}\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        )

    report(1_000_000)
    pressure = _CpuPressure(str(psi))
    assert pressure.available
    assert not pressure.contended(10.0)  # the first sample only sets the base
    report(1_020_000)  # 20 ms of waiting in 100 ms: 20%, below 30%
    assert not pressure.contended(10.1)
    report(1_060_000)  # 40 ms in 100 ms
    assert pressure.contended(10.2)
    assert pressure.contended(10.22), "sampled at most every 50 ms: the answer holds"
    report(1_060_100)
    assert not pressure.contended(10.3)
    assert not _CpuPressure(str(tmp_path / "missing")).contended(1.0)


async def test_no_spin_while_the_machine_is_contended(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=0 avg60=0 avg300=0 total=0\n")
    pressure = _CpuPressure(str(psi))
    assert not pressure.contended(time.perf_counter() - 1.0)
    psi.write_text("some avg10=0 avg60=0 avg300=0 total=900000\n")  # 0.9 s of 1 s
    monkeypatch.setattr(_spin, "_PRESSURE", pressure)
    spin = Spin(0.05)
    assert spin.poll(lambda: 1 // 0) is None
    assert spin.spins == 0


async def test_a_spin_limit_of_zero_never_polls() -> None:
    spin = Spin(0.0)
    assert not spin.armed
    spin.parked(time.perf_counter(), by_message=True)
    assert spin.poll(lambda: 1 // 0) is None


async def test_the_poller_takes_a_waiting_message_without_parking(ctx: Ctx) -> None:
    router, dealer = _pair(ctx, "poller")
    poller = SocketPoller()
    poller.add(router)
    try:
        dealer.send_multipart_nowait([b"hello"])
        with trio.fail_after(5):
            ready: list[object] = []
            while not ready:
                ready = await poller.wait(spin=0.05)
        assert ready == [router]
        assert router.recv_multipart_nowait() == [b"d", b"hello"]
        stats = poller.statistics()
        assert stats.spin_hits >= 1
        assert stats.sleeps == 0
    finally:
        poller.close()
        router.close()
        dealer.close()


async def test_a_task_woken_in_the_same_batch_runs_before_the_poller_spins(ctx: Ctx) -> None:
    """The bug this guards: Trio's count of runnable tasks misses the rest of the
    current batch, so a spin held up a task of that batch about to wake the owner.
    Trio orders a batch at random: eight rounds put the owner first in some."""
    router, dealer = _pair(ctx, "batch")
    poller = SocketPoller()
    poller.add(router)
    try:
        for _ in range(8):
            go = trio.Event()

            async def helper(go: trio.Event = go) -> None:
                await go.wait()
                poller.wake()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(helper)
                await trio.testing.wait_all_tasks_blocked()
                go.set()
                # The helper and this task now share the next batch.
                await trio.lowlevel.cancel_shielded_checkpoint()
                assert await poller.wait(spin=0.05) == []
        # Every wake came before a spin could start: no spin, no park.
        stats = poller.statistics()
        assert (stats.spins, stats.sleeps) == (0, 0)
    finally:
        poller.close()
        router.close()
        dealer.close()


async def test_socket_wait_ready_spins_into_a_waiting_message(ctx: Ctx) -> None:
    router, dealer = _pair(ctx, "socket")
    try:
        dealer.send_multipart_nowait([b"one"])
        with trio.fail_after(5):
            while True:
                try:
                    assert router.recv_multipart_nowait() == [b"d", b"one"]
                    break
                except trio.WouldBlock:
                    await router.wait_ready(spin=0.05)
        # Idle now: one spin misses, disarms, and the next wait parks until
        # the message (a wake here) comes.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(router.wait_ready, spin=0.0001))
            await trio.testing.wait_all_tasks_blocked()
            router.wake()
        assert router.statistics().fd_waits >= 1
    finally:
        router.close()
        dealer.close()


@pytest.mark.parametrize("spin", [-0.001, 2.0, float("nan")])
async def test_a_node_refuses_a_spin_out_of_range(spin: float) -> None:
    with pytest.raises(LocalProtocolError, match=r"NodeConfig\.spin must be"):
        async with open_node("a", bind="tcp://127.0.0.1:*", config=NodeConfig(spin=spin)):
            pass


async def test_a_lockstep_exchange_is_answered_by_spins_and_spin_zero_never_polls() -> None:
    """Two real nodes over tcp: with the default spin, most round trips are
    caught polling; with spin=0 the I/O task only ever parks."""

    class Echo(Actor[Delivery, bytes]):
        async def receive(self, msg: Delivery) -> bytes:
            return bytes(msg.payload)

    for spin, polls in ((NodeConfig().spin, True), (0.0, False)):
        config = NodeConfig(spin=spin)
        async with open_node(
            "b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=Echo, config=config
        ) as b:
            assert b.endpoint is not None
            async with open_node(
                "a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}, config=config
            ) as a:
                with trio.fail_after(20):
                    for i in range(200):
                        await a.send("b", b"%d" % i)
                stats = a.statistics().io
        if polls:
            assert stats.spins > 0
        else:
            assert stats.spins == 0
            assert stats.sleeps > 0
