"""The Trio-driven zmq sockets, over real tcp (127.0.0.1) and ipc sockets."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
import zmq

from transport import (
    DEALER_OPTIONS,
    ROUTER_OPTIONS,
    Socket,
    Unroutable,
    dealer_socket,
    router_socket,
)

Ctx = zmq.Context[zmq.Socket[bytes]]

TCP = "tcp://127.0.0.1:*"
DEALER_ID = b"dealer-1"
BURST = 10_000


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    context: Ctx = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "tcp":
        return TCP
    return f"ipc://{tmp_path}/router.sock"


async def _connected_pair(ctx: Ctx, endpoint: str, **overrides: int) -> tuple[Socket, Socket]:
    """A ROUTER and a DEALER that has said hello, so the ROUTER can route to it."""
    router = router_socket(ctx, **overrides)
    dealer = dealer_socket(ctx, routing_id=DEALER_ID, **overrides)
    dealer.connect(router.bind(endpoint))
    with trio.fail_after(5):
        await dealer.send_multipart([b"hello"])
        assert await router.recv_multipart() == [DEALER_ID, b"hello"]
    return router, dealer


async def _owner_loop(sock: Socket, prefix: list[bytes], n: int) -> list[int]:
    """One owner task sending ``n`` numbered messages and receiving ``n``, via
    the nowait calls and wait_ready, the way the node's socket actors do."""
    received: list[int] = []
    sent = 0
    while True:
        while sent < n:
            try:
                sock.send_multipart_nowait([*prefix, b"%d" % sent])
            except trio.WouldBlock:
                break
            sent += 1
        while True:
            try:
                parts = sock.recv_multipart_nowait()
            except trio.WouldBlock:
                break
            received.append(int(parts[-1]))
        if sent == n and len(received) == n:
            return received
        await sock.wait_ready(readable=len(received) < n, writable=sent < n)


async def _convenience_loop(sock: Socket, prefix: list[bytes], n: int, chunk: int) -> list[int]:
    """Both directions with the async calls: send a chunk, then take a chunk."""
    received: list[int] = []
    for start in range(0, n, chunk):
        for i in range(start, min(start + chunk, n)):
            await sock.send_multipart([*prefix, b"%d" % i])
        for _ in range(start, min(start + chunk, n)):
            received.append(int((await sock.recv_multipart())[-1]))
    return received


async def test_burst_both_ways_with_owner_tasks(ctx: Ctx, endpoint: str) -> None:
    # Small HWMs force both sockets to stall on POLLOUT and sleep on the
    # edge-triggered fd many times: a missed edge would hang this test.
    router, dealer = await _connected_pair(ctx, endpoint, sndhwm=50, rcvhwm=50)
    results: dict[str, list[int]] = {}

    async def run(name: str, sock: Socket, prefix: list[bytes]) -> None:
        results[name] = await _owner_loop(sock, prefix, BURST)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "router", router, [DEALER_ID])
            nursery.start_soon(run, "dealer", dealer, [])

    assert results["router"] == list(range(BURST))
    assert results["dealer"] == list(range(BURST))
    for sock in (router, dealer):
        stats = sock.statistics()
        assert stats.messages_sent == BURST + (sock is dealer)
        assert stats.messages_received == BURST + (sock is router)
    # The burst must have made the owners sleep on the edge-triggered fd (the
    # path a missed edge would hang). Which side sleeps depends on timing: one
    # side may always find its socket ready, so count both.
    assert router.statistics().fd_waits + dealer.statistics().fd_waits > 0
    router.close()
    dealer.close()


@pytest.mark.parametrize("eventfd_wake", [True, False], ids=["eventfd", "cancel"])
async def test_drains_of_one_and_of_many_take_all_and_stop_only_when_empty(
    ctx: Ctx, eventfd_wake: bool
) -> None:
    # A drain may end on an EVENTS read (single messages) or on a failing
    # recv (bursts), and wait_ready may vouch for the next recv: every mix of
    # drain sizes must take every message, and WouldBlock must mean empty.
    router = Socket(ctx.socket(zmq.ROUTER), eventfd_wake=eventfd_wake)
    dealer = dealer_socket(ctx, routing_id=DEALER_ID)
    dealer.connect(router.bind(TCP))
    sizes = [1, 1, 5, 1, 1, 3, 2, 1, 20, 1, 1]
    got: list[int] = []
    drains: list[int] = []
    with trio.fail_after(10):
        sent = 0
        for size in sizes:
            for _ in range(size):
                await dealer.send_multipart([b"%d" % sent])
                sent += 1
            taken = 0
            while len(got) < sent:
                await router.wait_ready()
                while True:
                    try:
                        parts = router.recv_multipart_nowait()
                    except trio.WouldBlock:
                        assert not router.zmq_socket.getsockopt(zmq.EVENTS) & zmq.POLLIN
                        break
                    got.append(int(parts[-1]))
                    taken += 1
            drains.append(taken)
    assert got == list(range(sum(sizes)))
    assert drains == sizes
    assert router.statistics().messages_received == sum(sizes)
    router.close()
    dealer.close()


async def test_burst_both_ways_with_async_calls(ctx: Ctx, endpoint: str) -> None:
    router, dealer = await _connected_pair(ctx, endpoint)
    results: dict[str, list[int]] = {}

    async def run(name: str, sock: Socket, prefix: list[bytes]) -> None:
        results[name] = await _convenience_loop(sock, prefix, BURST, chunk=500)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "router", router, [DEALER_ID])
            nursery.start_soon(run, "dealer", dealer, [])

    assert results["router"] == list(range(BURST))
    assert results["dealer"] == list(range(BURST))
    router.close()
    dealer.close()


async def test_blocked_recv_is_cancelled_promptly_and_loses_nothing(ctx: Ctx) -> None:
    router, dealer = await _connected_pair(ctx, TCP)
    start = trio.current_time()
    with trio.move_on_after(0.05) as scope:
        await router.recv_multipart()
    assert scope.cancelled_caught
    assert trio.current_time() - start < 1.0

    await dealer.send_multipart([b"after"])
    with trio.fail_after(5):
        assert await router.recv_multipart() == [DEALER_ID, b"after"]
    router.close()
    dealer.close()


async def test_cancelled_before_waiting_raises_even_if_ready(ctx: Ctx) -> None:
    router, dealer = await _connected_pair(ctx, TCP)
    await dealer.send_multipart([b"queued"])
    with trio.fail_after(5):
        await router.wait_ready()
    with trio.CancelScope() as scope:
        scope.cancel()
        await router.recv_multipart()
    assert scope.cancelled_caught
    # Cancellation took nothing: the message is still there.
    assert router.recv_multipart_nowait() == [DEALER_ID, b"queued"]
    router.close()
    dealer.close()


def _blocked_calls() -> list[Callable[[Socket], Awaitable[object]]]:
    return [
        lambda sock: sock.recv_multipart(),
        lambda sock: sock.wait_ready(),
        lambda sock: sock.wait_ready(readable=False, writable=False),
        # IMMEDIATE=1 and no peer: the DEALER has nowhere to queue.
        lambda sock: sock.send_multipart([b"nowhere"]),
    ]


@pytest.mark.parametrize("call", _blocked_calls(), ids=["recv", "wait_ready", "wait_wake", "send"])
async def test_close_while_another_task_waits(
    ctx: Ctx, call: Callable[[Socket], Awaitable[object]]
) -> None:
    sock = dealer_socket(ctx)
    sock.connect("tcp://127.0.0.1:1")
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await call(sock)
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            sock.close()
    assert len(outcome) == 1
    assert "closed" in str(outcome[0])

    sock.close()  # idempotent
    assert sock.closed
    with pytest.raises(trio.ClosedResourceError):
        sock.recv_multipart_nowait()
    with pytest.raises(trio.ClosedResourceError):
        sock.send_multipart_nowait([b"x"])
    with pytest.raises(trio.ClosedResourceError):
        await sock.wait_ready()


async def test_wake_interrupts_wait_ready(ctx: Ctx, autojump_clock: trio.abc.Clock) -> None:
    async with dealer_socket(ctx) as sock:
        woke_at: list[float] = []

        async def owner() -> None:
            await sock.wait_ready()
            woke_at.append(trio.current_time())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(owner)
                await trio.sleep(3)
                assert woke_at == []
                sock.wake()
        assert woke_at == [3.0]

        # A wake with nobody waiting is remembered: the next wait returns now.
        sock.wake()
        sock.wake()
        with trio.fail_after(10):
            await sock.wait_ready(readable=False)
        assert trio.current_time() == 3.0
        # ...and consumed by that return, however many wakes came before.
        with trio.move_on_after(2) as scope:
            await sock.wait_ready()
        assert scope.cancelled_caught
        assert trio.current_time() == 5.0
        assert sock.statistics().wakes == 3


@pytest.mark.parametrize("eventfd_wake", [True, False], ids=["eventfd", "cancel"])
async def test_both_wake_paths_wake_once_per_wake_and_see_messages(
    ctx: Ctx, autojump_clock: trio.abc.Clock, eventfd_wake: bool
) -> None:
    # The eventfd (Linux) and the cancel-scope fallback must behave alike: a
    # wake ends one wait and is then used up (the eventfd is read back); the
    # next test: a message still ends a wait, and close() ends one with an error.
    sock = Socket(ctx.socket(zmq.DEALER), eventfd_wake=eventfd_wake)
    async with sock:
        sock.zmq_socket.setsockopt(zmq.LINGER, 0)
        woke_at: list[float] = []

        async def owner(waits: int) -> None:
            for _ in range(waits):
                with trio.move_on_after(10):
                    await sock.wait_ready()
                woke_at.append(trio.current_time())

        with trio.fail_after(100):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(owner, 3)
                for _ in range(2):
                    await trio.sleep(1)
                    sock.wake()
        # Two wakes end two waits at once; the third wait runs to its timeout.
        assert woke_at == [1.0, 2.0, 12.0]


@asynccontextmanager
async def _said_hello(ctx: Ctx, eventfd_wake: bool) -> AsyncIterator[tuple[Socket, Socket, bytes]]:
    """A ROUTER, a DEALER on the chosen wake path that has said hello, and its routing id."""
    router = router_socket(ctx)
    port = router.bind(TCP)
    sock = Socket(ctx.socket(zmq.DEALER), eventfd_wake=eventfd_wake)
    async with router, sock:
        sock.zmq_socket.setsockopt(zmq.LINGER, 0)
        sock.connect(port)
        with trio.fail_after(10):
            await sock.send_multipart([b"hello"])
            routing_id, hello = await router.recv_multipart()
        assert hello == b"hello"
        yield router, sock, routing_id


@pytest.mark.parametrize("eventfd_wake", [True, False], ids=["eventfd", "cancel"])
async def test_both_wake_paths_see_messages_and_close(ctx: Ctx, eventfd_wake: bool) -> None:
    async with _said_hello(ctx, eventfd_wake) as (router, sock, routing_id):
        with trio.fail_after(10):
            await router.send_multipart([routing_id, b"pong"])
            for _ in range(100):
                await sock.wait_ready()
                try:
                    assert sock.recv_multipart_nowait() == [b"pong"]
                    break
                except trio.WouldBlock:
                    continue
            else:
                pytest.fail("the reply never woke the owner")

        outcome: list[BaseException] = []

        async def closed_under() -> None:
            try:
                await sock.wait_ready()
            except trio.ClosedResourceError as exc:
                outcome.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closed_under)
                await trio.testing.wait_all_tasks_blocked()
                sock.close()
        assert len(outcome) == 1


@pytest.mark.parametrize("eventfd_wake", [True, False], ids=["eventfd", "cancel"])
async def test_another_tasks_call_wakes_the_owner_only_when_it_leaves_input(
    ctx: Ctx, eventfd_wake: bool
) -> None:
    # A task other than the owner may send on the socket. That call can take
    # the fd's edge with it, so the owner must be woken if input is waiting,
    # and need not be if there is none (the owner's fd fires for later input).
    async with _said_hello(ctx, eventfd_wake) as (router, sock, routing_id):
        returns: list[int] = []
        got: list[list[bytes]] = []
        got_one = trio.Event()
        stop = trio.Event()

        async def owner() -> None:
            while not stop.is_set():
                await sock.wait_ready()
                returns.append(len(got))
                while True:
                    try:
                        got.append(sock.recv_multipart_nowait())
                    except trio.WouldBlock:
                        break
                    got_one.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(owner)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert returns == []
                # Nothing to read: sending from this task leaves the owner
                # asleep, not even woken to look and sleep again (each sleep
                # on the fd counts in fd_waits).
                sleeps = sock.statistics().fd_waits
                for i in range(3):
                    sock.send_multipart_nowait([b"from another task %d" % i])
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert returns == []
                assert sock.statistics().fd_waits == sleeps
                for i in range(3):
                    expected = [routing_id, b"from another task %d" % i]
                    assert await router.recv_multipart() == expected
                # A reply, then another foreign send that may eat its edge: the
                # owner still gets the reply.
                await router.send_multipart([routing_id, b"reply"])
                sock.send_multipart_nowait([b"one more"])
                await got_one.wait()
                assert got == [[b"reply"]]
                stop.set()
                sock.wake()
        assert len(returns) >= 1


async def test_wake_does_not_end_a_convenience_recv(
    ctx: Ctx, autojump_clock: trio.abc.Clock
) -> None:
    async with dealer_socket(ctx) as sock:
        with trio.move_on_after(2) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sock.recv_multipart)
                await trio.sleep(1)
                sock.wake()
        assert scope.cancelled_caught
        assert trio.current_time() == 2.0
        # The wake was meant for wait_ready and is still pending for it.
        with trio.fail_after(10):
            await sock.wait_ready()
        assert trio.current_time() == 2.0


async def test_second_waiter_is_refused_not_hung(ctx: Ctx) -> None:
    async with dealer_socket(ctx) as sock:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sock.recv_multipart)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await sock.wait_ready()
                nursery.cancel_scope.cancel()


async def test_router_mandatory_raises_unroutable(ctx: Ctx) -> None:
    async with router_socket(ctx) as router:
        router.bind(TCP)
        with pytest.raises(Unroutable) as info:
            router.send_multipart_nowait([b"nobody", b"x"])
        assert info.value.routing_id == b"nobody"
        with pytest.raises(Unroutable):
            await router.send_multipart([memoryview(b"ghost"), b"x"])
        assert router.statistics().messages_sent == 0


async def test_router_handover_lets_a_restarted_peer_take_over(ctx: Ctx) -> None:
    router, old = await _connected_pair(ctx, TCP)
    # The old DEALER is still connected (a frozen peer, not yet timed out)
    # when its restarted self connects with the same routing id.
    new = dealer_socket(ctx, routing_id=DEALER_ID)
    new.connect(router.zmq_socket.getsockopt(zmq.LAST_ENDPOINT).decode())  # type: ignore[union-attr]
    with trio.fail_after(5):
        await new.send_multipart([b"i am back"])
        assert await router.recv_multipart() == [DEALER_ID, b"i am back"]
        await router.send_multipart([DEALER_ID, b"welcome"])
        assert await new.recv_multipart() == [b"welcome"]
    with pytest.raises(trio.WouldBlock):
        old.recv_multipart_nowait()
    for sock in (router, old, new):
        sock.close()


async def test_multipart_frames_are_preserved(ctx: Ctx, endpoint: str) -> None:
    router, dealer = await _connected_pair(ctx, endpoint)
    parts = [b"", b"a", b"x" * 100_000, b"", bytes(range(256))]
    with trio.fail_after(5):
        await dealer.send_multipart(parts)
        assert await router.recv_multipart() == [DEALER_ID, *parts]
        await router.send_multipart([DEALER_ID, *parts])
        assert await dealer.recv_multipart() == parts
    router.close()
    dealer.close()


async def test_numpy_arrays_round_trip(ctx: Ctx) -> None:
    router, dealer = await _connected_pair(ctx, TCP)
    small = np.arange(10, dtype=np.int32)
    # 1 MiB: above zmq.COPY_THRESHOLD, so it goes out without a copy.
    big = np.linspace(0.0, 1.0, 1 << 17, dtype=np.float64)
    with trio.fail_after(5):
        await dealer.send_multipart([b"tile", small, big, memoryview(b"mv")])
        _, header, got_small, got_big, got_mv = await router.recv_multipart()
    assert header == b"tile"
    np.testing.assert_array_equal(np.frombuffer(got_small, dtype=np.int32), small)
    np.testing.assert_array_equal(np.frombuffer(got_big, dtype=np.float64), big)
    assert got_mv == b"mv"
    router.close()
    dealer.close()


def test_default_options_and_overrides_are_applied(ctx: Ctx) -> None:
    dealer = dealer_socket(ctx, routing_id=b"n1", sndhwm=7, RCVHWM=9)
    router = router_socket(ctx)
    try:
        raw = dealer.zmq_socket
        assert raw.getsockopt(zmq.ROUTING_ID) == b"n1"
        assert raw.getsockopt(zmq.SNDHWM) == 7
        assert raw.getsockopt(zmq.RCVHWM) == 9
        for option in (zmq.LINGER, zmq.IMMEDIATE, zmq.MAXMSGSIZE, zmq.HEARTBEAT_IVL):
            assert raw.getsockopt(option) == DEALER_OPTIONS[option]
        for option in (zmq.LINGER, zmq.RECONNECT_IVL_MAX, zmq.HEARTBEAT_TTL, zmq.SNDHWM):
            assert router.zmq_socket.getsockopt(option) == ROUTER_OPTIONS[option]
        assert ROUTER_OPTIONS[zmq.ROUTER_MANDATORY] == 1
        assert ROUTER_OPTIONS[zmq.ROUTER_HANDOVER] == 1
    finally:
        dealer.close()
        router.close()
    with pytest.raises(ValueError, match="no_such_option"):
        dealer_socket(ctx, no_such_option=1)


def test_bind_reports_the_real_endpoint(ctx: Ctx, tmp_path: Path) -> None:
    router = router_socket(ctx)
    try:
        tcp = router.bind(TCP)
        assert tcp.startswith("tcp://127.0.0.1:")
        assert int(tcp.rsplit(":", 1)[1]) > 0
        ipc = router.bind(f"ipc://{tmp_path}/r.sock")
        assert ipc == f"ipc://{tmp_path}/r.sock"
    finally:
        router.close()
    dealer = dealer_socket(ctx)
    with pytest.raises(ValueError, match="at least one part"):
        dealer.send_multipart_nowait([])
    dealer.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts fds in /proc")
def test_sockets_closed_or_dropped_release_their_wake_fds(ctx: Ctx) -> None:
    # Each socket holds an epoll set and an eventfd for wake(): close() frees
    # them, and so does dropping a socket that was never closed.
    def open_fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    Socket(ctx.socket(zmq.DEALER)).close()  # zmq's own fds, opened once per context
    gc.collect()  # earlier tests' garbage may still hold fds
    before = open_fds()
    for _ in range(50):
        sock = Socket(ctx.socket(zmq.DEALER))
        sock.close()
    for _ in range(50):
        dropped = Socket(ctx.socket(zmq.DEALER))
        dropped.zmq_socket.close(linger=0)
        del dropped
    gc.collect()
    # A leak would add 50 or 100; nothing here opens fds that stay open.
    assert open_fds() <= before
