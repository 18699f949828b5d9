"""Actors, refs and mailboxes: backpressure, ask, concurrency, lifecycle (virtual time)."""

from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    Actor,
    ActorCrashed,
    ActorStopped,
    AskTimeout,
    ChildSpec,
    Reject,
    Status,
    open_supervisor,
    spawn,
)


def _status(holder: Any) -> Status:
    """The current status of a ref or supervisor (a call, so mypy does not narrow it)."""
    return Status(holder.status.value)


def _task_count() -> int:
    """Every live task in this run, to prove that nothing outlived a block."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


class Counter(Actor[str, int]):
    def __init__(self) -> None:
        self.count = 0

    async def receive(self, msg: str) -> int:
        if msg == "slow boom":
            await trio.sleep(1)
        if msg.endswith("boom"):
            raise ValueError(msg)
        self.count += 1
        return self.count


class Slow(Actor[float, float]):
    """Sleeps for the given seconds, then replies with the time it finished."""

    async def receive(self, msg: float) -> float:
        await trio.sleep(msg)
        return trio.current_time()


async def test_ask_replies_and_send_replies_nowhere(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Counter, name="counter")
        assert _status(ref) is Status.RUNNING
        await ref.send("a")
        ref.send_nowait("b")
        assert await ref.ask("c") == 3
        stats = ref.statistics()
        assert (stats.name, stats.processed, stats.mailbox_depth, stats.failures) == (
            "counter",
            3,
            0,
            0,
        )
        nursery.cancel_scope.cancel()
    assert _status(ref) is Status.STOPPED


async def test_send_blocks_on_full_mailbox_and_nowait_raises(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Slow, mailbox_size=2)
        await ref.send(1.0)  # taken at once: in hand until t=1
        await trio.testing.wait_all_tasks_blocked()
        await ref.send(1.0)
        await ref.send(1.0)  # the mailbox now holds 2
        assert ref.statistics().mailbox_depth == 2
        with pytest.raises(trio.WouldBlock):
            ref.send_nowait(1.0)
        await ref.send(1.0)  # waits for room: the first message ends at t=1
        assert trio.current_time() == 1.0
        assert ref.statistics().mailbox_depth == 2
        nursery.cancel_scope.cancel()


async def test_blocked_sender_is_counted(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Slow, mailbox_size=0)
        await ref.send(5.0)
        nursery.start_soon(ref.send, 5.0)
        await trio.sleep(1)
        assert ref.statistics().senders_waiting == 1
        nursery.cancel_scope.cancel()


class Payload:
    """A reply object we can hold a weak reference to."""


class LateReplier(Actor[str, Payload]):
    def __init__(self, made: list[weakref.ref[Payload]]) -> None:
        self.made = made

    async def receive(self, msg: str) -> Payload:
        if msg == "slow":
            await trio.sleep(10)
        reply = Payload()
        self.made.append(weakref.ref(reply))
        return reply


async def test_ask_times_out_cleanly_and_late_reply_is_dropped(
    autojump_clock: trio.abc.Clock,
) -> None:
    made: list[weakref.ref[Payload]] = []
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, lambda: LateReplier(made))
        with pytest.raises(AskTimeout) as info:
            await ref.ask("slow", timeout=2.0)
        assert isinstance(info.value, trio.TooSlowError)
        assert trio.current_time() == 2.0
        # The next ask gets its own reply, after the slow one finished at t=10.
        fast = await ref.ask("fast", timeout=20.0)
        assert trio.current_time() == 10.0
        assert len(made) == 2
        assert made[1]() is fast
        gc.collect()
        assert made[0]() is None, "the late reply is still referenced somewhere"
        nursery.cancel_scope.cancel()


async def test_ask_timeout_covers_waiting_for_room(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Slow, mailbox_size=0)
        await ref.send(10.0)
        with pytest.raises(AskTimeout):
            await ref.ask(0.0, timeout=3.0)
        assert trio.current_time() == 3.0
        assert ref.statistics().senders_waiting == 0
        nursery.cancel_scope.cancel()


class Gauge(Actor[float, None]):
    """Records how many handlers run at once."""

    max_concurrency = 3

    def __init__(self, seen: list[int], finished: list[float]) -> None:
        self.seen = seen
        self.finished = finished
        self.now = 0

    async def receive(self, msg: float) -> None:
        self.now += 1
        self.seen.append(self.now)
        await trio.sleep(msg)
        self.now -= 1
        self.finished.append(trio.current_time())


@pytest.mark.parametrize(("override", "expected"), [(None, 3), (1, 1), (5, 5)])
async def test_max_concurrency_is_honoured(
    autojump_clock: trio.abc.Clock, override: int | None, expected: int
) -> None:
    seen: list[int] = []
    finished: list[float] = []
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, lambda: Gauge(seen, finished), max_concurrency=override)
        for _ in range(10):
            await ref.send(1.0)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert max(seen) == expected
    assert ref.statistics().processed == 10
    # Ten one-second jobs, N at a time: the last one ends at ceil(10 / N) s.
    assert max(finished) == -(-10 // expected) * 1.0


async def test_one_at_a_time_keeps_mailbox_order(autojump_clock: trio.abc.Clock) -> None:
    order: list[int] = []

    class Recorder(Actor[int, None]):
        async def receive(self, msg: int) -> None:
            await trio.sleep(0.1 * max(0, 5 - msg))  # later messages would finish first
            order.append(msg)

    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Recorder)
        for i in range(5):
            await ref.send(i)
        await ref.ask(99, timeout=10)
        nursery.cancel_scope.cancel()
    assert order == [0, 1, 2, 3, 4, 99]


async def test_crash_fails_the_ask_and_queued_messages_survive(
    autojump_clock: trio.abc.Clock,
) -> None:
    instances: list[Counter] = []

    def make() -> Counter:
        instances.append(Counter())
        return instances[-1]

    async with open_supervisor(ChildSpec("c", make)) as sup:
        ref = sup.actor("c")
        boom = trio.Event()

        async def ask_boom() -> None:
            with pytest.raises(ActorCrashed) as info:
                await ref.ask("slow boom")
            assert isinstance(info.value.__cause__, ValueError)
            assert info.value.actor == "c"
            assert _status(ref) is Status.RESTARTING
            boom.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_boom)
            await trio.sleep(0.5)
            ref.send_nowait("x")
            ref.send_nowait("y")
            await boom.wait()
            assert trio.current_time() == 1.0
            assert ref.statistics().mailbox_depth == 2
            assert ref.statistics().in_hand == 0
            # A fresh instance reads the same mailbox; "boom" is not redelivered.
            assert await ref.ask("z") == 3
        assert trio.current_time() == 1.1
        assert len(instances) == 2
        assert instances[0].count == 0
        assert sup.actor("c") is ref
        stats = ref.statistics()
        assert (stats.processed, stats.failures, stats.restarts) == (3, 1, 1)


async def test_stop_fails_pending_asks_and_later_sends(autojump_clock: trio.abc.Clock) -> None:
    outcomes: list[str] = []

    async def ask(ref: Any, msg: float) -> None:
        try:
            await ref.ask(msg, timeout=100)
        except ActorStopped as exc:
            outcomes.append(f"stopped:{exc.actor}")

    async with trio.open_nursery() as askers:
        async with open_supervisor(ChildSpec("slow", Slow, mailbox_size=4)) as sup:
            ref = sup.actor("slow")
            for _ in range(3):  # one in hand, two queued
                askers.start_soon(ask, ref, 50.0)
            await trio.sleep(1)
            assert ref.statistics().in_hand == 1
        assert trio.current_time() == 1.0
    assert outcomes == ["stopped:slow"] * 3
    assert _status(ref) is Status.STOPPED
    with pytest.raises(ActorStopped):
        await ref.send(1.0)
    with pytest.raises(ActorStopped):
        ref.send_nowait(1.0)
    with pytest.raises(ActorStopped):
        await ref.ask(1.0)


class Hooks(Actor[str, str]):
    def __init__(self, log: list[str], stop_takes: float = 0.0) -> None:
        self.log = log
        self.stop_takes = stop_takes

    async def on_start(self) -> None:
        await trio.sleep(1)
        self.log.append(f"start@{trio.current_time()}")

    async def receive(self, msg: str) -> str:
        if msg == "exit":
            self.exit()
        return msg

    async def on_stop(self) -> None:
        await trio.sleep(self.stop_takes)
        self.log.append(f"stop@{trio.current_time()}")


async def test_spawn_returns_once_started_and_on_stop_is_bounded(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, lambda: Hooks(log, stop_takes=100), shutdown=2.0)
        assert _status(ref) is Status.RUNNING
        assert log == ["start@1.0"]
        await ref.stop()
    # on_stop was cancelled at its 2 s bound, so it never logged.
    assert trio.current_time() == 3.0
    assert log == ["start@1.0"]
    assert _status(ref) is Status.STOPPED


async def test_status_is_observable_and_exit_stops_normally(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    seen: list[Status] = []

    async def watch(ref: Any) -> None:
        async with contextlib.aclosing(ref.status.eventual_values()) as values:
            async for status in values:
                seen.append(status)
                if status.is_final:
                    return

    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, lambda: Hooks(log))
        nursery.start_soon(watch, ref)
        await trio.sleep(1)
        assert await ref.ask("exit") == "exit"  # exit() takes effect after the reply
        await ref.status.wait_value(Status.STOPPED)
        assert trio.current_time() == 2.0
    assert seen == [Status.RUNNING, Status.STOPPED]
    assert log == ["start@1.0", "stop@2.0"]


async def test_unsupervised_crash_raises_into_the_nursery(autojump_clock: trio.abc.Clock) -> None:
    with pytest.RaisesGroup(
        pytest.RaisesExc(ActorCrashed, check=lambda e: isinstance(e.__cause__, ValueError))
    ):
        async with trio.open_nursery() as nursery:
            ref = await spawn(nursery, Counter)
            await ref.send("boom")
            await trio.sleep_forever()
    assert _status(ref) is Status.FAILED
    assert isinstance(ref.exception, ValueError)


async def test_start_failure_raises_from_spawn(autojump_clock: trio.abc.Clock) -> None:
    class Broken(Actor[None, None]):
        async def on_start(self) -> None:
            raise OSError("no device")

    async with trio.open_nursery() as nursery:
        with pytest.raises(ActorCrashed, match="failed to start") as info:
            await spawn(nursery, Broken)
        assert isinstance(info.value.__cause__, OSError)


async def test_background_task_crash_crashes_the_actor(autojump_clock: trio.abc.Clock) -> None:
    class Ticker(Actor[None, None]):
        async def on_start(self) -> None:
            self.nursery.start_soon(self.tick)

        async def tick(self) -> None:
            await trio.sleep(3)
            raise RuntimeError("tick failed")

    with pytest.RaisesGroup(pytest.RaisesExc(ActorCrashed)):
        async with trio.open_nursery() as nursery:
            await spawn(nursery, Ticker)
            await trio.sleep_forever()
    assert trio.current_time() == 3.0


async def test_max_concurrency_crash_fails_every_ask_in_hand(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Pool(Actor[float, None]):
        max_concurrency = 3

        async def receive(self, msg: float) -> None:
            await trio.sleep(abs(msg))
            if msg < 0:
                raise ValueError("bad job")

    errors: list[BaseException] = []

    async def ask(ref: Any, msg: float) -> None:
        try:
            await ref.ask(msg)
        except ActorCrashed as exc:
            errors.append(exc)

    async with open_supervisor(ChildSpec("pool", Pool)) as sup, trio.open_nursery() as nursery:
        for job in (-1.0, 2.0, 2.0):
            nursery.start_soon(ask, sup.actor("pool"), job)
    assert trio.current_time() == 1.0
    assert len(errors) == 3
    assert all(isinstance(e.__cause__, ValueError) for e in errors)


async def test_cancelling_the_scope_stops_everything_without_leaks(
    autojump_clock: trio.abc.Clock,
) -> None:
    before = _task_count()
    log: list[str] = []
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            refs = [await spawn(nursery, lambda: Hooks(log)) for _ in range(3)]
            for ref in refs:
                await ref.send("x")
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == 5.0
    assert _task_count() == before
    assert [ref.status.value for ref in refs] == [Status.STOPPED] * 3
    assert log.count("stop@5.0") == 3


async def test_reject_answers_the_asker_without_crashing_the_actor() -> None:
    from actors import Reject

    class Picky(Actor[int, int]):
        async def receive(self, msg: int) -> int:
            if msg < 0:
                raise Reject(400, "negative")
            return msg * 2

    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Picky)
        with pytest.raises(Reject) as info:
            await ref.ask(-1)
        assert (info.value.code, info.value.detail) == (400, "negative")
        assert await ref.ask(21) == 42
        stats = ref.statistics()
        assert stats.failures == 0
        assert stats.restarts == 0
        await ref.stop()


# -- one rule for a message, alone or as an item of a shared entry ----------------

_OPS = ("return", "reject", "crash", "exit", "stop")


class _Scripted(Actor[tuple[int, str], int]):
    """Does to each message what its op says; ``stop`` waits to be stopped."""

    def __init__(self, stopping: trio.Event) -> None:
        self._stopping = stopping

    async def receive(self, msg: tuple[int, str]) -> int:
        index, op = msg
        await trio.sleep(0.001)
        if op == "reject":
            raise Reject(400, f"no {index}")
        if op == "crash":
            raise RuntimeError(f"crash on {index}")
        if op == "exit":
            self.exit()
        elif op == "stop":
            self._stopping.set()
            await trio.sleep_forever()
        return index


class _Log(list[tuple[int, object]]):
    """Outcomes (index, value or error type) in settling order; ``full`` once all are in."""

    def __init__(self, expect: int) -> None:
        super().__init__()
        self.expect = expect
        self.full = trio.Event()

    def add(self, index: int, outcome: object) -> None:
        self.append((index, outcome))
        if len(self) >= self.expect:
            self.full.set()


class _Outcomes:
    """A reply sink for both kinds of send: message ``first + index`` settles into ``log``."""

    def __init__(self, log: _Log, first: int = 0) -> None:
        self._log = log
        self._first = first

    def set_result(self, value: object) -> None:
        self.set_item_result(0, value)

    def fail(self, error: BaseException) -> None:
        self.fail_item(0, error)

    def set_item_result(self, index: int, value: object) -> None:
        self._log.add(self._first + index, value)

    def fail_item(self, index: int, error: BaseException) -> None:
        self._log.add(self._first + index, type(error).__name__)


async def _settle(ops: list[str], as_items: bool) -> list[tuple[int, object]]:
    """Send ``ops`` (then one trailing plain message) and return every outcome in order."""
    stopping = trio.Event()
    spec = ChildSpec("w", lambda: _Scripted(stopping), mailbox_size=len(ops) + 1)
    log = _Log(expect=len(ops) + 1)
    async with (
        open_supervisor(spec, intensity=len(ops) + 1, period=1.0) as sup,
        trio.open_nursery() as nursery,
    ):
        ref = sup.actor("w")

        async def stop_when_asked() -> None:
            await stopping.wait()
            await ref.stop()

        nursery.start_soon(stop_when_asked)
        msgs = list(enumerate(ops))
        if as_items:
            ref.send_items_nowait(msgs, reply=_Outcomes(log))
        else:
            for msg in msgs:
                ref.send_nowait(msg, reply=_Outcomes(log, msg[0]))
        # Behind them in the mailbox: carried-over items must still come first.
        ref.send_nowait((len(ops), "return"), reply=_Outcomes(log, len(ops)))
        with trio.fail_after(600):
            await log.full.wait()
        nursery.cancel_scope.cancel()
    return list(log)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.sampled_from(_OPS), max_size=140))
def test_items_of_a_shared_entry_settle_exactly_as_messages_sent_alone(ops: list[str]) -> None:
    alone = trio.run(_settle, ops, False, clock=trio.testing.MockClock(autojump_threshold=0))
    shared = trio.run(_settle, ops, True, clock=trio.testing.MockClock(autojump_threshold=0))
    assert shared == alone
    assert sorted(index for index, _ in alone) == list(range(len(ops) + 1))
