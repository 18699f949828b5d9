"""Supervision: strategies, intensity, backoff, policies, nesting, escalation (virtual time)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from actors import (
    Actor,
    ActorCrashed,
    ActorStopped,
    Backoff,
    ChildSpec,
    Restart,
    Status,
    Strategy,
    SupervisorGaveUp,
    SupervisorSpec,
    open_supervisor,
)
from actors.statistics import (
    SupervisorStatistics,
)


def _status(holder: Any) -> Status:
    """The current status of a ref or supervisor (a call, so mypy does not narrow it)."""
    return Status(holder.status.value)


def _task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


class Probe(Actor[str, str]):
    """Logs its life; crashes on "boom", exits normally on "exit"."""

    def __init__(self, name: str, log: list[str], start_takes: float = 0.0) -> None:
        self.name = name
        self.log = log
        self.start_takes = start_takes

    async def on_start(self) -> None:
        await trio.sleep(self.start_takes)
        self.log.append(f"start {self.name}")

    async def receive(self, msg: str) -> str:
        if msg == "boom":
            raise ValueError(f"{self.name} boom")
        if msg == "exit":
            self.exit()
        return f"{self.name}:{msg}"

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.name}")


def probe(name: str, log: list[str], **options: Any) -> ChildSpec[str, str]:
    return ChildSpec(name, lambda: Probe(name, log), **options)


class FlakyStart(Actor[str, str]):
    """Its on_start fails for the instance numbers in ``fail``."""

    def __init__(self, starts: list[float], fail: range) -> None:
        self.index = len(starts)
        starts.append(trio.current_time())
        self.fail = fail

    async def on_start(self) -> None:
        if self.index in self.fail:
            raise OSError(f"start {self.index} failed")

    async def receive(self, msg: str) -> str:
        if msg == "boom":
            raise ValueError("boom")
        return msg


async def test_backoff_delays_are_exact_and_intensity_gives_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    starts: list[float] = []
    spec = ChildSpec("w", lambda: FlakyStart(starts, range(1, 100)))
    box: list[Any] = []

    async def run() -> None:
        async with open_supervisor(spec, name="root", intensity=3, period=5.0) as sup:
            box.append(sup)
            await sup.actor("w").send("boom")
            await trio.sleep_forever()

    with pytest.raises(SupervisorGaveUp) as info:
        await run()
    sup = box[0]
    ref = sup.actor("w")
    # Crash at 0, then restarts after 0.1, 0.2, 0.4 s that fail in on_start;
    # the 4th restart within 5 s breaks intensity 3.
    assert starts == [0.0, 0.1, pytest.approx(0.3), pytest.approx(0.7)]
    assert trio.current_time() == pytest.approx(0.7)
    error = info.value
    assert (error.supervisor, error.child, error.intensity, error.period) == ("root", "w", 3, 5.0)
    assert isinstance(error.__cause__, OSError)
    stats = ref.statistics()
    assert (stats.restarts, stats.failures, stats.status) == (3, 4, Status.FAILED)
    assert _status(sup) is Status.FAILED


async def test_backoff_has_a_ceiling_and_resets_after_a_calm_period(
    autojump_clock: trio.abc.Clock,
) -> None:
    starts: list[float] = []
    spec = ChildSpec("w", lambda: FlakyStart(starts, range(1, 6)))
    backoff = Backoff(initial=1.0, factor=2.0, maximum=3.0)
    async with open_supervisor(spec, intensity=100, period=10.0, backoff=backoff) as sup:
        ref = sup.actor("w")
        await ref.send("boom")
        await trio.sleep(20)
        assert _status(ref) is Status.RUNNING
        # Delays 1, 2, then capped at 3; at t=12 the restarts at 0 and 1 have
        # left the 10 s window, so the attempt number drops back to 3.
        assert starts == [0.0, 1.0, 3.0, 6.0, 9.0, 12.0, 15.0]
        await trio.sleep(100)  # calm for longer than the period
        await ref.send("boom")
        await ref.status.wait_value(Status.RESTARTING)
        await ref.status.wait_value(Status.RUNNING)
    assert starts[-1] == 121.0


async def test_restarts_spread_wider_than_period_never_give_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    async with open_supervisor(probe("w", log), intensity=1, period=5.0) as sup:
        ref = sup.actor("w")
        for _ in range(4):
            await ref.send("boom")
            await trio.sleep(6)
        assert ref.statistics().restarts == 4
        assert await ref.ask("ok") == "w:ok"


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (Strategy.ONE_FOR_ONE, ["stop b", "start b"]),
        (Strategy.ONE_FOR_ALL, ["stop b", "stop c", "stop a", "start a", "start b", "start c"]),
        (Strategy.REST_FOR_ONE, ["stop b", "stop c", "start b", "start c"]),
    ],
)
async def test_strategies_restart_the_right_siblings_in_order(
    autojump_clock: trio.abc.Clock, strategy: Strategy, expected: list[str]
) -> None:
    log: list[str] = []
    children = [probe(name, log) for name in "abc"]
    async with open_supervisor(*children, strategy=strategy) as sup:
        assert log == ["start a", "start b", "start c"]
        log.clear()
        await sup.actor("b").send("boom")
        await trio.sleep(1)
        assert log == expected
        assert trio.current_time() == 1.0
        restarted = {name for name in "abc" if sup.actor(name).statistics().restarts}
        assert restarted == {entry[-1] for entry in expected}
        for name in "abc":
            assert await sup.actor(name).ask("hi") == f"{name}:hi"
        log.clear()
    assert log == ["stop c", "stop b", "stop a"]  # leaving the block: reverse start order


async def test_group_restart_waits_for_backoff(autojump_clock: trio.abc.Clock) -> None:
    log: list[str] = []
    children = [probe(name, log) for name in "ab"]
    async with open_supervisor(*children, strategy=Strategy.ONE_FOR_ALL) as sup:
        await sup.actor("a").send("boom")
        await sup.actor("b").status.wait_value(Status.RESTARTING)
        await sup.actor("b").status.wait_value(Status.RUNNING)
        assert trio.current_time() == 0.1


async def test_transient_is_restarted_only_after_a_crash(autojump_clock: trio.abc.Clock) -> None:
    log: list[str] = []
    async with open_supervisor(probe("t", log, restart=Restart.TRANSIENT)) as sup:
        ref = sup.actor("t")
        await ref.send("boom")
        await ref.status.wait_value(Status.RESTARTING)
        await ref.status.wait_value(Status.RUNNING)
        assert ref.statistics().restarts == 1
        assert await ref.ask("exit") == "t:exit"
        await ref.status.wait_value(Status.STOPPED)
        assert sup.children() == ()
        with pytest.raises(ActorStopped):
            await ref.send("x")
    assert ref.statistics().restarts == 1


async def test_permanent_is_restarted_after_a_normal_exit(autojump_clock: trio.abc.Clock) -> None:
    log: list[str] = []
    async with open_supervisor(probe("p", log)) as sup:
        ref = sup.actor("p")
        await ref.ask("exit")
        await ref.status.wait_value(Status.RESTARTING)
        await ref.status.wait_value(Status.RUNNING)
        assert trio.current_time() == 0.1
        assert log == ["start p", "stop p", "start p"]


async def test_temporary_crash_is_absorbed_and_not_restarted(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    temp = probe("tmp", log, restart=Restart.TEMPORARY)
    async with open_supervisor(temp, probe("other", log)) as sup:
        ref = sup.actor("tmp")
        await ref.send("boom")
        await ref.status.wait_value(Status.FAILED)
        assert isinstance(ref.exception, ValueError)
        assert sup.children() == ("other",)
        await trio.sleep(10)
        assert ref.statistics().restarts == 0
        assert await sup.actor("other").ask("x") == "other:x"
    assert _status(sup) is Status.STOPPED


async def test_nested_supervisor_is_restarted_and_refs_survive(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    inner = SupervisorSpec("inner", (probe("w", log),), intensity=0)
    async with open_supervisor(inner, name="root") as root:
        sub = root.supervisor("inner")
        ref = sub.actor("w")
        await ref.send("boom")  # inner gives up at once; root restarts it
        ref.send_nowait("queued")
        await sub.status.wait_value(Status.RESTARTING)
        await ref.status.wait_value(Status.RUNNING)
        assert trio.current_time() == 0.1
        assert root.supervisor("inner") is sub
        assert sub.actor("w") is ref
        assert await ref.ask("after") == "w:after"
        assert ref.statistics().processed == 2  # "queued" survived the restart
        stats = root.statistics()
        assert isinstance(stats.children[0], SupervisorStatistics)
        assert (stats.children[0].restarts, stats.children[0].failures) == (1, 1)
        assert stats.children[0].children[0].name == "w"


async def test_escalation_reaches_the_top_as_a_clean_exception(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    inner = SupervisorSpec("inner", (probe("w", log),), intensity=0)
    middle = SupervisorSpec("middle", (inner,), intensity=0)
    before = _task_count()

    async def run() -> None:
        async with open_supervisor(middle, name="root", intensity=0) as root:
            await root.supervisor("middle").supervisor("inner").actor("w").send("boom")
            await trio.sleep_forever()

    with pytest.raises(SupervisorGaveUp) as info:
        await run()
    chain = [info.value, info.value.__cause__]
    chain.append(chain[-1].__cause__)  # type: ignore[union-attr]
    chain.append(chain[-1].__cause__)  # type: ignore[union-attr]
    assert [getattr(e, "supervisor", None) for e in chain[:3]] == ["root", "middle", "inner"]
    assert isinstance(chain[3], ValueError)
    assert trio.current_time() == 0.0
    assert _task_count() == before
    assert log == ["start w", "stop w"]


async def test_body_exception_comes_out_unwrapped(autojump_clock: trio.abc.Clock) -> None:
    log: list[str] = []
    with pytest.raises(KeyError, match="missing"):
        async with open_supervisor(probe("a", log)) as sup:
            raise KeyError("missing")
    assert _status(sup.actor("a")) is Status.STOPPED
    assert log == ["start a", "stop a"]


async def test_static_child_start_failure_raises(autojump_clock: trio.abc.Clock) -> None:
    log: list[str] = []
    starts: list[float] = []
    broken = ChildSpec("broken", lambda: FlakyStart(starts, range(1)))
    with pytest.raises(ActorCrashed, match="failed to start") as info:
        async with open_supervisor(probe("a", log), broken):
            pytest.fail("the body must not run")
    assert isinstance(info.value.__cause__, OSError)
    assert log == ["start a", "stop a"]


async def test_start_child_lookup_and_stop_child(autojump_clock: trio.abc.Clock) -> None:
    log: list[str] = []
    starts: list[float] = []
    async with open_supervisor() as sup:
        ref = await sup.start_child(ChildSpec("a", lambda: Probe("a", log, start_takes=2.0)))
        assert trio.current_time() == 2.0  # returned once on_start was done
        assert _status(ref) is Status.RUNNING
        assert sup.actor("a") is ref
        with pytest.raises(ValueError, match="already has"):
            await sup.start_child(probe("a", log))
        with pytest.raises(ActorCrashed):
            await sup.start_child(ChildSpec("bad", lambda: FlakyStart(starts, range(1))))
        assert sup.children() == ("a",)
        with pytest.raises(KeyError):
            sup.actor("bad")
        with pytest.raises(KeyError):
            sup.supervisor("a")
        nested = await sup.start_child(SupervisorSpec("sub", (probe("x", log),)))
        assert _status(nested.actor("x")) is Status.RUNNING
        await sup.stop_child("a")
        assert _status(ref) is Status.STOPPED
        assert sup.children() == ("sub",)
        assert log == ["start a", "start x", "stop a"]
    with pytest.raises(ActorStopped):
        await sup.start_child(probe("late", log))
    assert _status(nested.actor("x")) is Status.STOPPED


async def test_status_shows_restarting_then_starting(autojump_clock: trio.abc.Clock) -> None:
    log: list[str] = []
    spec = ChildSpec("s", lambda: Probe("s", log, start_takes=1.0))
    async with open_supervisor(spec) as sup:
        ref = sup.actor("s")
        assert trio.current_time() == 1.0
        await ref.send("boom")
        await ref.status.wait_value(Status.RESTARTING)
        await ref.status.wait_value(Status.STARTING)
        assert trio.current_time() == 1.1
        await ref.status.wait_value(Status.RUNNING)
        assert trio.current_time() == 2.1


async def test_cancelling_the_enclosing_scope_stops_the_tree_promptly(
    autojump_clock: trio.abc.Clock,
) -> None:
    log: list[str] = []
    before = _task_count()
    tree = SupervisorSpec("sub", (probe("x", log), probe("y", log)), Strategy.ONE_FOR_ALL)
    with trio.move_on_after(3) as scope:
        async with open_supervisor(probe("a", log), tree) as sup:
            sub = sup.supervisor("sub")
            for name in ("x", "y"):
                await sub.actor(name).send("busy")
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == 3.0
    assert _task_count() == before
    assert sorted(entry for entry in log if entry.startswith("stop")) == [
        "stop a",
        "stop x",
        "stop y",
    ]
    statuses = {sup.status.value, sub.status.value, sub.actor("x").status.value}
    assert statuses == {Status.STOPPED}
