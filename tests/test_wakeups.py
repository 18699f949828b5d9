"""A lone message and its answer leave from the task that made them.

A link's owner task sends while messages stream (several to one Batch); a
lone message goes out from the sender's own task, and its ACK from the
compute actor's task, with no wake-up of a socket's owner task in between.
Counted with a Trio instrument over real ZeroMQ sockets (ipc).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from actors import Actor, Delivery, Node, PeerError, Reject, open_node

LINK_OWNER = "PeerLink._own_socket"
RECEIVER = "Receiver._serve"


class _Probe(trio.abc.Instrument):
    """Counts task steps by the last two parts of the task's name, and what b saw.

    b's compute actor, when a lone send is awaited (:meth:`lone_send`), keeps
    the counts so far in ``before`` and clears them: the counts then tell what
    ran on the message's way there, and on its answer's way back.
    """

    def __init__(self) -> None:
        self.steps: Counter[str] = Counter()
        self.seen: list[bytes] = []
        self.before: list[Counter[str]] = []
        self.arrived: list[trio.Event] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[".".join(task.name.split(".")[-2:])] += 1

    async def lone_send(self, a: Node) -> tuple[Counter[str], Counter[str]]:
        """Task steps from a lone send until b's compute step, and from there until the ACK."""
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        self.steps.clear()
        event = trio.Event()
        self.arrived.append(event)
        handle = a.send_nowait("b", b"lone")
        await event.wait()
        await handle.wait()
        return self.before[-1], Counter(self.steps)


class _Compute(Actor[Any, Any]):
    """Records what it gets; ``reject`` is refused, ``crash`` crashes it."""

    def __init__(self, probe: _Probe) -> None:
        self._probe = probe

    async def receive(self, msg: Any) -> Any:
        if not isinstance(msg, Delivery):
            return None
        probe = self._probe
        payload = bytes(msg.payload)
        probe.seen.append(payload)
        if payload == b"reject":
            raise Reject(700, "refused on purpose")
        if payload == b"crash":
            raise RuntimeError("crashed on purpose")
        if probe.arrived:
            probe.before.append(Counter(probe.steps))
            probe.steps.clear()
            probe.arrived.pop().set()
        return None


@asynccontextmanager
async def _pair(tmp_path: Path) -> AsyncIterator[tuple[Node, _Probe]]:
    """Node a sending to node b (ipc), with the probe counting task steps."""
    probe = _Probe()
    trio.lowlevel.add_instrument(probe)
    try:
        with trio.fail_after(30):
            async with (
                open_node(
                    "b",
                    bind=f"ipc://{tmp_path}/b.sock",
                    peers={"a": None},
                    compute=lambda: _Compute(probe),
                ) as b,
                open_node("a", bind=f"ipc://{tmp_path}/a.sock", peers={"b": b.endpoint}) as a,
            ):
                yield a, probe
    finally:
        trio.lowlevel.remove_instrument(probe)


async def test_a_lone_send_and_its_ack_need_no_owner_wakeup(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, probe):
        await a.send("b", b"warm-up")
        there, back = await probe.lone_send(a)
    # The message reached b's compute actor with no step of a's link task:
    # it left from the sending task...
    assert there[RECEIVER] >= 1
    assert there[LINK_OWNER] == 0
    # ...and its ACK left from the compute actor's task: b's Receiver never
    # ran between the compute step and the ACK; a's link task ran to take it.
    assert back[RECEIVER] == 0
    assert back[LINK_OWNER] >= 1
    assert probe.seen == [b"warm-up", b"lone"]


async def test_a_stream_still_goes_in_batches_and_answers_come_back(tmp_path: Path) -> None:
    async with _pair(tmp_path) as (a, probe):
        await a.send("b", b"warm-up")
        socket = a._links["b"].socket
        assert socket is not None
        sent_before = socket.statistics().messages_sent
        handles = [a.send_nowait("b", b"%d" % i) for i in range(200)]
        for handle in handles:
            await handle.wait()
        sent = socket.statistics().messages_sent - sent_before
    assert probe.seen == [b"warm-up", *(b"%d" % i for i in range(200))]
    # The first went alone, from this task; the link's owner sent the other
    # 199 several to a ZeroMQ message (a Batch), not one by one.
    assert sent <= 10, sent


async def test_the_fast_answer_path_survives_errors_and_a_crash(tmp_path: Path) -> None:
    # ERRs, a crash with messages queued behind it, and a burst: afterwards a
    # lone message's ACK again leaves from the compute actor's task, so the
    # count of messages with the compute actor went back to zero.
    async with _pair(tmp_path) as (a, probe):
        payloads = [b"ok", b"reject", b"ok", b"crash", b"ok", b"ok"] * 5
        handles = [a.send_nowait("b", p) for p in payloads]
        outcomes: list[str] = []
        for handle in handles:
            try:
                await handle.wait()
                outcomes.append("ack")
            except PeerError as exc:
                outcomes.append(f"err {exc.code}")
        _, back = await probe.lone_send(a)
    assert outcomes.count("err 700") == 5
    assert outcomes.count("ack") == 20
    assert back[RECEIVER] == 0
