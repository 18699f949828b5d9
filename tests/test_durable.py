"""Durable receiving (issue 18): state and receive state committed together.

In one process: every ACK the sender gets is covered by a commit already in
the journal; a node reopened on its journal resumes its state; a compute
crash rebuilds the uncommitted state by replay; misuse is refused with an
actionable message.

Across real processes (``tests/_durable_peer.py``; part of the chaos
suite): a durable receiver SIGKILLed 1-3 times at random points while a
sender streams numbered messages, restarted each time with the same node
id, endpoint and journal; and a sender killed and restarted likewise. The
receiver's committed state (read from its journal) must count every
message exactly once.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from collections import Counter as Tally
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from _durable_peer import QUICK, Counter, committed, committed_counts
from test_processes import STARTUP_TIMEOUT, endpoint_of, free_port
from trio_util import AsyncValue

from actors import (
    Ack,
    Actor,
    ActorCrashed,
    Delivery,
    NodeConfig,
    PeerError,
    SendHandle,
    open_node,
)
from actors._journal import AnswerRow, JournalStore
from actors.journal import Durable
from transport import ErrCode, Incarnation, LinkSeq, LocalProtocolError, NodeId, StreamId
from transport.frames import ItemAck
from transport.testing import FaultPlan

PEER = Path(__file__).with_name("_durable_peer.py")

#: Messages per process run. Issue 18 asks for 5,000.
STREAM_N = 5_000


def counter() -> Counter:
    return Counter()


async def test_every_ack_is_covered_by_a_commit_and_a_reopened_node_resumes(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "b.db"
    total = 400
    seen_in_journal: list[bool] = []
    with trio.fail_after(60):
        async with open_node(
            "b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=counter, journal=journal
        ) as b:
            async with open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}) as a:

                async def check(n: int, handle: SendHandle) -> None:
                    assert isinstance(await handle.wait(), Ack)
                    if n % 20 == 0:
                        # Read by another connection the moment the ACK is in:
                        # the commit that covers it must already be there.
                        seen_in_journal.append(committed_counts(journal).get(n) == 1)

                async with trio.open_nursery() as nursery:
                    for n in range(total):
                        await a.wait_window("b")
                        nursery.start_soon(check, n, a.send_nowait("b", n))
            stats = b.statistics().journal
    assert seen_in_journal == [True] * (total // 20)
    assert committed_counts(journal) == dict.fromkeys(range(total), 1)
    assert stats is not None
    # Group commit: far fewer transactions than messages.
    assert 1 <= stats.commits < total
    assert stats.answers == total

    # The node's next process: the same id and journal, a new incarnation.
    async with open_node(
        "b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=counter, journal=journal
    ) as b2:
        again = b2.statistics().journal
        async with open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b2.endpoint}) as a2:
            with trio.fail_after(30):
                assert isinstance(await a2.send("b", total), Ack)
    assert again is not None
    assert again.recovered_sessions == 1
    assert committed_counts(journal) == dict.fromkeys(range(total + 1), 1)


class Fragile(Counter):
    """Crashes once, on number 5 (class-level flag: the restarted instance goes on)."""

    crashed = False

    async def receive(self, msg: Any) -> None:
        assert isinstance(msg, Delivery)
        if msg.payload == 5 and not Fragile.crashed:
            Fragile.crashed = True
            # Half-done work: this instance's state is thrown away.
            self.counts[msg.payload] = 99
            raise RuntimeError("boom")
        await super().receive(msg)


async def test_a_compute_crash_replays_the_uncommitted_messages_on_the_committed_state(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "b.db"
    Fragile.crashed = False
    with trio.fail_after(30):
        async with open_node(
            "b",
            bind="tcp://127.0.0.1:*",
            peers={"a": None},
            compute=Fragile,
            journal=journal,
        ) as b:
            async with open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}) as a:
                # One batch: no commit point inside it, so 0-4 are processed
                # and not committed when 5 crashes the instance.
                outcomes = await a.send_batch("b", list(range(10)))
            stats = b.statistics().journal
    assert Fragile.crashed
    assert [isinstance(o, Ack) for o in outcomes] == [i != 5 for i in range(10)]
    failed = outcomes[5]
    assert isinstance(failed, PeerError)
    assert failed.code == ErrCode.COMPUTE_FAILED
    assert stats is not None
    assert stats.replayed == 5
    assert committed_counts(journal) == {n: 1 for n in range(10) if n != 5}


async def test_answers_lost_with_the_process_are_given_again_from_the_journal(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "b.db"
    bind = endpoint_of(free_port())
    # b's answers are nearly all lost on the wire, so a holds unanswered
    # messages that b has processed and committed when b's process ends.
    lossy = NodeConfig(faults=FaultPlan(drop=0.99, seed=3))
    first = 10
    with trio.fail_after(60):
        async with open_node(
            "a", bind="tcp://127.0.0.1:*", peers={"b": bind}, config=NodeConfig(sender=QUICK)
        ) as a:
            async with open_node(
                "b", bind=bind, peers={"a": None}, compute=counter, journal=journal, config=lossy
            ):
                handles = [a.send_nowait("b", n) for n in range(first)]
                while len(committed_counts(journal)) < first:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            unanswered = sum(1 for h in handles if not h.done)
            assert unanswered, "the faults let every answer through; pick another seed"
            async with open_node(
                "b", bind=bind, peers={"a": None}, compute=counter, journal=journal
            ) as b2:
                # Sent at once, beside the resends, so they reach b's new
                # process while a still waits on old answers (their stream
                # floor is behind): the stream goes on where the journal left
                # it, with no gap for the numbers answered from it.
                handles += [a.send_nowait("b", n) for n in range(first, first + 5)]
                acks = [await h.wait() for h in handles]
                stats = b2.statistics()
    assert all(isinstance(ack, Ack) for ack in acks)
    assert committed(journal)["gaps"] == []
    assert committed_counts(journal) == dict.fromkeys(range(first + 5), 1)
    (session,) = stats.inbound.protocol.sessions
    # Each resend of a message the old process answered got the journal's answer.
    assert session.duplicates >= unanswered
    assert session.delivered == 5
    assert stats.journal is not None
    assert stats.journal.recovered_sessions == 1


async def test_the_store_keeps_one_session_per_peer_and_rolls_back_a_failed_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    a = NodeId("a")
    halo = StreamId("halo")
    store = JournalStore(path, NodeId("b"), Incarnation(1))
    rows = [AnswerRow(a, LinkSeq(s), 0, ItemAck(None)) for s in range(1, 6)]
    store.write(b"\x01", {a: (Incarnation(10), LinkSeq(1))}, rows, {(a, halo): 6})
    # The watermark passes 1-3: their answers are dropped.
    store.write(b"\x02", {a: (Incarnation(10), LinkSeq(4))}, [], {})
    with pytest.raises(sqlite3.Error):
        store.write(object(), {}, [], {})  # type: ignore[arg-type]
    store.close()
    again = JournalStore(path, NodeId("b"), Incarnation(2))
    (session,) = again.recovered.sessions
    assert [c.seq for c in session.answers] == [4, 5]
    assert again.recovered.streams == {a: (10, {halo: 6})}
    assert again.state == b"\x02"
    # A new incarnation of the peer: its stream starts over, lower than before.
    again.write(b"\x03", {a: (Incarnation(11), LinkSeq(1))}, rows[:1], {(a, halo): 2})
    again.close()
    third = JournalStore(path, NodeId("b"), Incarnation(3))
    (session,) = third.recovered.sessions
    assert (session.incarnation, [c.seq for c in session.answers]) == (11, [1])
    assert third.recovered.streams == {a: (11, {halo: 2})}
    third.close()


class Plain(Actor[Any, None]):
    async def receive(self, msg: Any) -> None:
        return None


class Parallel(Counter):
    max_concurrency = 4


async def test_misuse_is_refused_with_what_to_do(tmp_path: Path) -> None:
    journal = tmp_path / "b.db"
    with pytest.raises(LocalProtocolError, match="give open_node a compute"):
        async with open_node("b", bind="tcp://127.0.0.1:*", journal=journal):
            pass
    for factory, words in ((Plain, "snapshot"), (Parallel, "one message")):
        with pytest.raises(ActorCrashed) as info:
            async with open_node(
                "b", bind="tcp://127.0.0.1:*", compute=factory, journal=tmp_path / "x.db"
            ):
                pass
        assert isinstance(info.value.__cause__, LocalProtocolError)
        assert words in str(info.value.__cause__)
    async with open_node("b", bind="tcp://127.0.0.1:*", compute=counter, journal=journal):
        pass
    with pytest.raises(LocalProtocolError, match="belongs to node 'b'"):
        async with open_node("c", bind="tcp://127.0.0.1:*", compute=counter, journal=journal):
            pass
    with pytest.raises(LocalProtocolError, match="not greater"):
        async with open_node(
            "b", bind="tcp://127.0.0.1:*", compute=counter, journal=journal, incarnation=1
        ):
            pass
    assert isinstance(counter(), Durable)


# --- real processes: the chaos runs of issue 18 ---------------------------------------


class _Lines:
    """Lines from a child's stdout pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def readline(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                raise EOFError("the process closed its stdout")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@asynccontextmanager
async def durable_process(tmp_path: Path, *args: str) -> AsyncIterator[tuple[trio.Process, _Lines]]:
    """Run ``_durable_peer.py ARGS`` until its READY line; kill it on the way out."""
    errors = tmp_path / f"{args[0]}-{random.random()}.err"
    with errors.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(PEER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            assert proc.stdout is not None
            lines = _Lines(proc.stdout)
            try:
                with trio.fail_after(STARTUP_TIMEOUT):
                    ready = await lines.readline()
            except (EOFError, trio.TooSlowError) as exc:
                raise AssertionError(f"{args[0]} did not start: {errors.read_text()}") from exc
            assert ready.startswith("READY"), ready
            yield proc, lines
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        await pipe.aclose()


async def _stop(proc: trio.Process) -> None:
    """Close its stdin so it closes its node; it must exit cleanly."""
    assert proc.stdin is not None
    await proc.stdin.aclose()
    with trio.fail_after(15):
        assert await proc.wait() == 0


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.parametrize("seed", range(5))
async def test_receiver_killed_and_restarted_counts_every_message_once(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    # 1, 2, 3, 1, 2 kills over the five seeds.
    kills = 1 + seed % 3
    # Kill points: after a random share of the sends were answered.
    marks = sorted(rng.sample(range(STREAM_N // 20, STREAM_N - STREAM_N // 20), kills))
    journal = tmp_path / "b.db"
    effects = tmp_path / "effects.txt"
    port = free_port()
    rx = ("receiver", "--id", "b", "--bind", endpoint_of(port), "--peer", "a")
    rx_args = (*rx, "--journal", str(journal), "--effects", str(effects))
    outcomes: dict[int, Any] = {}
    answered = AsyncValue(0)
    kills_done = 0
    with trio.fail_after(240):
        async with open_node(
            "a",
            bind="tcp://127.0.0.1:*",
            peers={"b": endpoint_of(port)},
            # Faults on a's wire too: resends overtake, duplicates come late.
            config=NodeConfig(
                sender=QUICK, faults=FaultPlan(drop=0.05, duplicate=0.05, delay=0.005, seed=seed)
            ),
        ) as a:

            async def settle(n: int, handle: SendHandle) -> None:
                try:
                    outcomes[n] = await handle.wait()
                except Exception as exc:
                    outcomes[n] = exc
                answered.value += 1

            async def feed() -> None:
                async with trio.open_nursery() as nursery:
                    for n in range(STREAM_N):
                        await a.wait_window("b")
                        nursery.start_soon(settle, n, a.send_nowait("b", n))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                for mark in marks:
                    async with durable_process(tmp_path, *rx_args) as (proc, _):
                        # Past the mark, and this process answered some: each
                        # kill hits a process in the middle of the stream.
                        at = max(mark, answered.value + 20)
                        await answered.wait_value(lambda v, m=at: v >= m)
                        # A random point inside the flow, not just after an ACK.
                        await trio.sleep(rng.uniform(0.0, 0.01))
                        proc.kill()
                        await proc.wait()
                    kills_done += 1
                async with durable_process(tmp_path, *rx_args) as (proc, _):
                    await answered.wait_value(lambda v: v >= STREAM_N)
                    stats = a.statistics().links["b"].protocol
                    await _stop(proc)

    assert kills_done == kills
    # Every send ended in one final answer, an ACK.
    assert sorted(outcomes) == list(range(STREAM_N))
    assert all(isinstance(o, Ack) for o in outcomes.values()), [
        o for o in outcomes.values() if not isinstance(o, Ack)
    ][:3]
    assert (stats.acked, stats.gave_up, stats.in_flight) == (STREAM_N, 0, 0)
    assert stats.peer_restarts >= kills
    # Exactly once in the committed state: none lost, none twice, no gap.
    assert committed(journal)["gaps"] == []
    assert committed_counts(journal) == dict.fromkeys(range(STREAM_N), 1)
    # The side effect outside the state is at least once: a kill may repeat it.
    done = Tally(int(line) for line in effects.read_text().split())
    assert set(done) == set(range(STREAM_N))
    repeated = sum(c - 1 for c in done.values())
    print(
        f"seed {seed}: {kills} kills at {marks}, {stats.resent} resent, "
        f"side effects repeated {repeated}, committed state exact"
    )


@pytest.mark.slow
@pytest.mark.chaos
async def test_a_restarted_sender_never_gets_what_it_saw_acked_processed_again(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    total = 3_000
    journal = tmp_path / "b.db"
    effects = tmp_path / "effects.txt"
    acked = tmp_path / "acked.txt"
    rx_port, tx_port = free_port(), free_port()
    rx = ("receiver", "--id", "b", "--bind", endpoint_of(rx_port), "--peer", "a")
    tx = ("sender", "--id", "a", "--bind", endpoint_of(tx_port), "--peer")
    tx_args = (*tx, f"b={endpoint_of(rx_port)}", "--count", str(total), "--acked", str(acked))
    # Per kill: what the sender had seen ACKed, and the receiver's committed
    # counts right then (every ACK is covered by a commit, so they count it).
    at_kills: list[tuple[set[int], dict[int, int]]] = []

    def acked_now() -> set[int]:
        return {int(n) for n in acked.read_text().split()} if acked.exists() else set()

    with trio.fail_after(240):
        async with durable_process(
            tmp_path, *rx, "--journal", str(journal), "--effects", str(effects)
        ) as (receiver, _):
            for share in (0.3, 0.6):
                async with durable_process(tmp_path, *tx_args) as (sender, _):
                    while len(acked_now()) < share * total:  # noqa: ASYNC110
                        await trio.sleep(rng.uniform(0.001, 0.01))
                    sender.kill()
                    await sender.wait()
                at_kills.append((acked_now(), committed_counts(journal)))
            async with durable_process(tmp_path, *tx_args) as (sender, lines):
                with trio.fail_after(120):
                    assert await lines.readline() == "DONE"
                await _stop(sender)
            await _stop(receiver)

    counts = committed_counts(journal)
    assert set(counts) == set(range(total)), "a message was lost"
    # A new sender session ends the old one: what the old one's stream held
    # undelivered may be reported as a gap ("session-ended"), nothing else.
    assert {gap[3] for gap in committed(journal)["gaps"]} <= {"session-ended"}
    # What a sender incarnation saw ACKed before it was killed is never
    # processed again: its next incarnations do not send it, and the
    # receiver mixes no session into another.
    for seen, then in at_kills:
        assert seen
        again = sorted(n for n in seen if counts[n] != then[n])
        assert not again, again[:10]
    # Only messages in flight at a kill may be processed twice: a new sender
    # session cannot know the answers its predecessor never saw (sends are not
    # durable). At most one window (256) per kill.
    twice = {n for n, c in counts.items() if c > 1}
    assert len(twice) <= 2 * 256
    print(f"sender killed twice: {len(twice)} messages in flight at a kill processed twice")
