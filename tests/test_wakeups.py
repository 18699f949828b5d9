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


class _Steps(trio.abc.Instrument):
    """Task steps by the last two parts of the task's name."""

    def __init__(self) -> None:
        self.steps: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[".".join(task.name.split(".")[-2:])] += 1


class _Compute(Actor[Any, Any]):
    """Records what it gets; ``reject`` is refused, ``crash`` crashes it."""

    def __init__(
        self,
        seen: list[bytes],
        steps: _Steps,
        arrived: list[trio.Event],
        before: list[Counter[str]],
    ) -> None:
        self._seen = seen
        self._steps = steps
        self._arrived = arrived
        self._before = before

    async def receive(self, msg: Any) -> Any:
        if not isinstance(msg, Delivery):
            return None
        payload = bytes(msg.payload)
        self._seen.append(payload)
        if payload == b"reject":
            raise Reject(700, "refused on purpose")
        if payload == b"crash":
            raise RuntimeError("crashed on purpose")
        if self._arrived:
            # Keep what ran before this step; from here on, count what follows.
            self._before.append(Counter(self._steps.steps))
            self._steps.steps.clear()
            self._arrived.pop().set()
        return None


@asynccontextmanager
async def _pair(
    tmp_path: Path,
    steps: _Steps,
    arrived: list[trio.Event],
    seen: list[bytes],
    before: list[Counter[str]] | None = None,
) -> AsyncIterator[Node]:
    kept = before if before is not None else []
    async with (
        open_node(
            "b",
            bind=f"ipc://{tmp_path}/b.sock",
            peers={"a": None},
            compute=lambda: _Compute(seen, steps, arrived, kept),
        ) as b,
        open_node("a", bind=f"ipc://{tmp_path}/a.sock", peers={"b": b.endpoint}) as a,
    ):
        yield a


async def _lone_send_counts(a: Node, steps: _Steps, arrived: list[trio.Event]) -> Counter[str]:
    """Steps of the owner tasks from a lone send until its ACK is back."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    steps.steps.clear()
    event = trio.Event()
    arrived.append(event)
    handle = a.send_nowait("b", b"lone")
    await event.wait()
    # The compute step cleared the counts: what follows is the answer's way back.
    await handle.wait()
    return Counter(steps.steps)


async def test_a_lone_send_and_its_ack_need_no_owner_wakeup(tmp_path: Path) -> None:
    steps = _Steps()
    arrived: list[trio.Event] = []
    seen: list[bytes] = []
    before: list[Counter[str]] = []
    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(20):
            async with _pair(tmp_path, steps, arrived, seen, before) as a:
                await a.send("b", b"warm-up")
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                steps.steps.clear()
                event = trio.Event()
                arrived.append(event)
                handle = a.send_nowait("b", b"lone")
                await event.wait()
                # The message reached b's compute actor with no step of a's
                # link task: it left from this task...
                assert before[0][RECEIVER] >= 1
                assert before[0][LINK_OWNER] == 0
                # (the compute step cleared the counts)
                await handle.wait()
                # ...and its ACK left from the compute actor's task: b's
                # Receiver never ran between the compute step and the ACK.
                assert steps.steps[RECEIVER] == 0
                # a's link task ran to receive the ACK.
                assert steps.steps[LINK_OWNER] >= 1
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert seen == [b"warm-up", b"lone"]


async def test_a_stream_still_goes_in_batches_and_answers_come_back(tmp_path: Path) -> None:
    steps = _Steps()
    arrived: list[trio.Event] = []
    seen: list[bytes] = []
    with trio.fail_after(20):
        async with _pair(tmp_path, steps, arrived, seen) as a:
            await a.send("b", b"warm-up")
            socket = a._links["b"].socket
            assert socket is not None
            sent_before = socket.statistics().messages_sent
            handles = [a.send_nowait("b", b"%d" % i) for i in range(200)]
            for handle in handles:
                await handle.wait()
            sent = socket.statistics().messages_sent - sent_before
    assert seen == [b"warm-up", *(b"%d" % i for i in range(200))]
    # The first went alone, from this task; the link's owner sent the other
    # 199 several to a ZeroMQ message (a Batch), not one by one.
    assert sent <= 10, sent


async def test_the_fast_answer_path_survives_errors_and_a_crash(tmp_path: Path) -> None:
    # ERRs, a crash with messages queued behind it, and a burst: afterwards a
    # lone message's ACK again leaves from the compute actor's task, so the
    # count of messages with the compute actor went back to zero.
    steps = _Steps()
    arrived: list[trio.Event] = []
    seen: list[bytes] = []
    trio.lowlevel.add_instrument(steps)
    try:
        with trio.fail_after(30):
            async with _pair(tmp_path, steps, arrived, seen) as a:
                payloads = [b"ok", b"reject", b"ok", b"crash", b"ok", b"ok"] * 5
                handles = [a.send_nowait("b", p) for p in payloads]
                outcomes: list[str] = []
                for handle in handles:
                    try:
                        await handle.wait()
                        outcomes.append("ack")
                    except PeerError as exc:
                        outcomes.append(f"err {exc.code}")
                assert outcomes.count("err 700") == 5
                assert outcomes.count("ack") == 20
                counts = await _lone_send_counts(a, steps, arrived)
                assert counts[RECEIVER] == 0
    finally:
        trio.lowlevel.remove_instrument(steps)
