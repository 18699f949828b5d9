"""Reliable links between real OS processes over tcp on 127.0.0.1.

The test process is node "a" (the sender, opened with ``open_node`` inside the
test); node "b" is ``tests/_peer.py`` in its own process, so it can be frozen
(SIGSTOP), killed (SIGKILL) and restarted at the same endpoint, which no
in-process test can show. These tests run in real time: every wait is bounded
by ``trio.fail_after`` and every child process is killed in a ``finally``.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from _peer import err_rule, payload_index

from actors import (
    Ack,
    DeliveryFailed,
    Node,
    NodeConfig,
    PeerError,
    SendHandle,
    open_node,
)
from transport import (
    NodeId,
    PeerState,
    SenderConfig,
    SenderStatistics,
)
from transport.security import (
    Security,
    generate_key_pair,
    write_key_pair,
)

pytestmark = pytest.mark.slow

PEER = Path(__file__).with_name("_peer.py")

#: Starting a Python process that imports trio and zmq takes ~0.5 s; allow
#: for two noisy cores.
STARTUP_TIMEOUT = 20.0

#: Fast failure detection for the tests that break the peer on purpose.
QUICK = SenderConfig(
    retry_timeout=0.1,
    retry_ceiling=0.4,
    heartbeat_interval=0.2,
    suspect_after=0.6,
    down_after=1.5,
    # Killed receivers come back after a process start, which can take
    # seconds on a loaded machine: the sends wait it out, not fail as lost.
    lost_grace=60.0,
    send_timeout=60.0,
)


def free_port() -> int:
    """A port nobody listens on now, below the kernel's ephemeral range.

    Ephemeral ports are avoided (design.md §5): a DEALER that keeps
    reconnecting to a dead local port in that range can be handed the same
    port as its own source and connect to itself (TCP simultaneous open).
    """
    for _ in range(200):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000..32000")


def link_stats(node: Node) -> SenderStatistics:
    """The protocol counters of ``node``'s link to "b"."""
    return node.statistics().links[NodeId("b")].protocol


def endpoint_of(port: int) -> str:
    """The tcp endpoint of ``port`` on the loopback interface."""
    return f"tcp://127.0.0.1:{port}"


@dataclass(frozen=True, slots=True)
class Line:
    """One delivery in a receiver's record."""

    inc: int
    stream: str
    stream_seq: int
    payload: str
    seq: int
    err: bool


def read_record(path: Path) -> tuple[list[Line], list[dict[str, Any]]]:
    """Deliveries and gap events of a record; a torn last line is ignored."""
    lines: list[Line] = []
    gaps: list[dict[str, Any]] = []
    if not path.exists():
        return lines, gaps
    text = path.read_text(encoding="utf-8")
    for raw in text.splitlines(keepends=True):
        if not raw.endswith("\n"):
            break
        entry = json.loads(raw)
        if "gap" in entry:
            gaps.append(entry)
        else:
            lines.append(Line(**entry))
    return lines, gaps


def recorded(path: Path) -> set[str]:
    """The payloads a record holds so far."""
    return {line.payload for line in read_record(path)[0]}


class _LineReader:
    """Lines from a child's stdout pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                raise EOFError("the peer process closed its stdout")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()


class PeerProcess:
    """A running ``_peer.py receiver`` and the controls a test needs."""

    def __init__(
        self, proc: trio.Process, reader: _LineReader, endpoint: str, incarnation: int
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.endpoint = endpoint
        self.incarnation = incarnation

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): sockets stay open, nothing is read."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a frozen process (SIGCONT)."""
        self.proc.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL: the process dies with whatever it held; wait until it is gone."""
        self.proc.kill()
        with trio.fail_after(10):
            await self.proc.wait()

    async def stop(self) -> dict[str, Any]:
        """Close its stdin so it shuts its node down; return its final statistics."""
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()
        with trio.fail_after(15):
            while True:
                line = await self.reader.readline()
                if line.startswith("STATS "):
                    stats: dict[str, Any] = json.loads(line.removeprefix("STATS "))
                    break
            assert await self.proc.wait() == 0
        return stats


_RUNS = itertools.count()


@asynccontextmanager
async def receiver(
    tmp_path: Path, port: int, record: Path, *options: str
) -> AsyncIterator[PeerProcess]:
    """Start node "b" (peer "a") at ``port``; kill it on the way out, whatever happened."""
    errors = tmp_path / f"peer-{next(_RUNS)}.err"
    command = [
        sys.executable,
        str(PEER),
        "receiver",
        "--id",
        "b",
        "--bind",
        endpoint_of(port),
        "--peer",
        "a",
        "--record",
        str(record),
        *options,
    ]
    with errors.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
        try:
            assert proc.stdout is not None
            reader = _LineReader(proc.stdout)
            try:
                with trio.fail_after(STARTUP_TIMEOUT):
                    ready = await reader.readline()
            except (EOFError, trio.TooSlowError) as exc:
                raise AssertionError(f"peer did not start: {errors.read_text()}") from exc
            word, endpoint, incarnation = ready.split()
            assert word == "READY"
            yield PeerProcess(proc, reader, endpoint, int(incarnation))
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    # SIGKILL also ends a process frozen with SIGSTOP.
                    proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        await pipe.aclose()


def payloads_by_stream(lines: Iterable[Line]) -> dict[str, list[Line]]:
    """Record lines grouped by stream, in record (delivery) order."""
    out: dict[str, list[Line]] = defaultdict(list)
    for line in lines:
        out[line.stream].append(line)
    return out


async def test_ten_thousand_sends_with_a_thousand_in_flight_each_acked_once(
    tmp_path: Path,
) -> None:
    record = tmp_path / "record.jsonl"
    streams = ("n", "s", "e", "w")
    total = 10_000
    config = NodeConfig(
        sender=SenderConfig(max_in_flight=1000, initial_credit=1000, send_timeout=60.0)
    )
    port = free_port()
    with trio.fail_after(90):
        async with (
            receiver(tmp_path, port, record, "--window", "1000") as peer,
            open_node(
                "a", bind="tcp://127.0.0.1:*", peers={"b": peer.endpoint}, config=config
            ) as a,
        ):
            start = trio.current_time()
            handles: list[SendHandle] = []
            peak = 0
            for i in range(total):
                # The first thousand without a checkpoint fill the window;
                # after that the I/O task sends as the sender goes (a BATCH
                # per 64) and the window is full only when b lags.
                if i >= 1000:
                    await a.wait_window("b")
                handles.append(a.send_nowait("b", f"{streams[i % 4]}:{i}", stream=streams[i % 4]))
                peak = max(peak, link_stats(a).in_flight)
            acks = [await h.wait() for h in handles]
            elapsed = trio.current_time() - start
            stats = link_stats(a)
            peer_stats = await peer.stop()

    assert len(acks) == total
    assert all(isinstance(ack, Ack) for ack in acks)
    assert sorted(ack.seq for ack in acks) == list(range(1, total + 1))
    assert [ack.result["i"] for ack in acks] == list(range(total))
    assert peak == 1000, "the window never reached 1,000 messages in flight"
    assert (stats.acked, stats.erred, stats.gave_up, stats.in_flight) == (total, 0, 0, 0)

    lines, gaps = read_record(record)
    assert gaps == []
    counts = Counter(line.payload for line in lines)
    assert set(counts) == {f"{streams[i % 4]}:{i}" for i in range(total)}
    assert set(counts.values()) == {1}
    for stream, got in payloads_by_stream(lines).items():
        assert [line.stream_seq for line in got] == list(range(1, total // 4 + 1))
        assert [payload_index(line.payload) for line in got] == [
            i for i in range(total) if streams[i % 4] == stream
        ]
    [session] = peer_stats["sessions"]
    assert (session["delivered"], session["peer"]) == (total, "a")
    print(f"10k sends, 1k in flight, across processes: {elapsed:.2f} s, resent {stats.resent}")


async def test_err_answers_carry_the_receivers_code_and_detail(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    every = 7
    total = 300
    port = free_port()
    with trio.fail_after(60):
        async with (
            receiver(tmp_path, port, record, "--err-every", str(every)) as peer,
            open_node("a", bind="tcp://127.0.0.1:*", peers={"b": peer.endpoint}) as a,
        ):
            handles = []
            for i in range(total):
                await a.wait_window("b")
                handles.append(a.send_nowait("b", f"x:{i}", stream="x"))
            outcomes: list[Ack | PeerError] = []
            for handle in handles:
                try:
                    outcomes.append(await handle.wait())
                except PeerError as exc:
                    outcomes.append(exc)
            stats = link_stats(a)

    erred = 0
    for i, outcome in enumerate(outcomes):
        expected = err_rule(f"x:{i}", every)
        if expected is None:
            assert isinstance(outcome, Ack), f"x:{i} should be ACKed, got {outcome!r}"
            assert outcome.result == {"i": i, "inc": peer.incarnation}
        else:
            erred += 1
            assert isinstance(outcome, PeerError), f"x:{i} should be ERR, got {outcome!r}"
            assert (outcome.code, outcome.detail) == expected
            assert outcome.seq == handles[i].seq
    assert erred == len(range(0, total, every))
    assert {o.code for o in outcomes if isinstance(o, PeerError)} == set(range(400, 410))
    assert (stats.acked, stats.erred, stats.gave_up) == (total - erred, erred, 0)
    # ERR means "received": every message was handed to the compute layer once.
    lines, _ = read_record(record)
    assert [line.payload for line in lines] == [f"x:{i}" for i in range(total)]
    assert [line.err for line in lines] == [
        err_rule(f"x:{i}", every) is not None for i in range(total)
    ]


async def test_batches_across_processes_get_one_outcome_per_item(tmp_path: Path) -> None:
    # The same rule as above, sent as batches of 25 (one DATA_ITEMS each):
    # each item is handed over once, in order, and answered on its own.
    record = tmp_path / "record.jsonl"
    every = 7
    total = 300
    size = 25
    port = free_port()
    with trio.fail_after(60):
        async with (
            receiver(tmp_path, port, record, "--err-every", str(every)) as peer,
            open_node("a", bind="tcp://127.0.0.1:*", peers={"b": peer.endpoint}) as a,
        ):
            handles = []
            for start in range(0, total, size):
                await a.wait_window("b")
                batch = [f"x:{i}" for i in range(start, start + size)]
                handles.append(a.send_batch_nowait("b", batch, stream="x"))
            outcomes = [outcome for handle in handles for outcome in await handle.wait()]
            stats = link_stats(a)

    assert len(outcomes) == total
    for i, outcome in enumerate(outcomes):
        expected = err_rule(f"x:{i}", every)
        if expected is None:
            assert isinstance(outcome, Ack), f"x:{i} should be ACKed, got {outcome!r}"
            assert outcome.result == {"i": i, "inc": peer.incarnation}
        else:
            assert isinstance(outcome, PeerError), f"x:{i} should be ERR, got {outcome!r}"
            assert (outcome.code, outcome.detail) == expected
        assert outcome.seq == handles[i // size].seq
    # One protocol message per batch, each answered once.
    assert (stats.acked, stats.erred, stats.gave_up) == (total // size, 0, 0)
    lines, gaps = read_record(record)
    assert gaps == []
    assert [line.payload for line in lines] == [f"x:{i}" for i in range(total)]
    assert [line.stream_seq for line in lines] == [i // size + 1 for i in range(total)]


# A known bug, not a slow machine: in 2-3 runs of 8 (at ab9dfc3 as now) the
# receiver stops answering for good after its SIGCONT, and the last sends
# never complete. With ZMTP heartbeats off (HEARTBEAT_IVL 0) 0 runs of 8
# fail: the sender's DEALER drops the frozen connection after 1.5 s and
# redials; the suspect is ROUTER_HANDOVER meeting the old connection's late
# teardown on the receiver. Kept running so an XPASS shows when it is fixed.
@pytest.mark.xfail(
    reason="known bug: a SIGSTOPped receiver sometimes stops answering after SIGCONT "
    "(ZMTP heartbeat drop + ROUTER_HANDOVER); see the comment above",
    strict=False,
)
async def test_frozen_peer_is_suspected_then_down_and_every_send_still_completes(
    tmp_path: Path,
) -> None:
    record = tmp_path / "record.jsonl"
    port = free_port()
    handles: list[SendHandle] = []
    with trio.fail_after(60):
        async with (
            receiver(tmp_path, port, record) as peer,
            open_node(
                "a",
                bind="tcp://127.0.0.1:*",
                peers={"b": peer.endpoint},
                config=NodeConfig(sender=QUICK),
            ) as a,
        ):
            stop_feeding = trio.Event()

            async def feed() -> None:
                i = 0
                while not stop_feeding.is_set():
                    await a.wait_window("b")
                    handles.append(a.send_nowait("b", f"f:{i}", stream="f"))
                    i += 1
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                await a.wait_state("b", PeerState.UP)
                await trio.sleep(0.5)
                before = len(handles)
                peer.pause()
                stopped = trio.current_time()
                with trio.fail_after(3):
                    await a.wait_state("b", PeerState.SUSPECT)
                suspect_after = trio.current_time() - stopped
                with trio.fail_after(4):
                    await a.wait_state("b", PeerState.DOWN)
                down_after = trio.current_time() - stopped
                await trio.sleep_until(stopped + 3.0)
                during = len(handles) - before
                peer.resume()
                resumed = trio.current_time()
                with trio.fail_after(5):
                    await a.wait_state("b", PeerState.UP)
                up_after = trio.current_time() - resumed
                await trio.sleep(0.5)
                stop_feeding.set()
            with trio.fail_after(20):
                acks = [await h.wait() for h in handles]
            stats = link_stats(a)

    assert during > 50, "the sender did not keep sending while the peer was frozen"
    assert len(acks) == len(handles)
    assert all(isinstance(ack, Ack) for ack in acks)
    assert stats.resent > 0
    assert (stats.gave_up, stats.in_flight, stats.peer_restarts) == (0, 0, 0)
    # Sent in the first half of the freeze: unanswered past their retry
    # timeout, so transmitted more than once.
    frozen = acks[before + 5 : before + during // 2]
    assert frozen
    assert all(ack.attempts > 1 for ack in frozen)
    lines, gaps = read_record(record)
    assert gaps == []
    assert [line.payload for line in lines] == [f"f:{i}" for i in range(len(handles))]
    assert [line.stream_seq for line in lines] == list(range(1, len(handles) + 1))
    # Liveness counts from the last answer heard, at most a heartbeat (and a
    # feed interval) before the SIGSTOP.
    early = QUICK.heartbeat_interval
    assert QUICK.suspect_after - early <= suspect_after < QUICK.suspect_after + 1.0
    assert QUICK.down_after - early <= down_after < QUICK.down_after + 1.0
    print(
        f"frozen 3 s: SUSPECT after {suspect_after:.2f} s, DOWN after {down_after:.2f} s, "
        f"UP {up_after:.2f} s after SIGCONT; {during} sent while frozen, resent {stats.resent}"
    )


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "curve"])
async def test_killed_and_restarted_peer_loses_nothing_and_processes_nothing_twice(
    tmp_path: Path, secure: bool
) -> None:
    # Over CURVE too: the restarted process proves its key again, is admitted
    # by ZAP and takes its routing id back (ROUTER_HANDOVER) like a plaintext one.
    security: Security | None = None
    keyed: tuple[str, ...] = ()
    if secure:
        keys = {name: generate_key_pair() for name in ("a", "b")}
        for name, pair in keys.items():
            write_key_pair(tmp_path, name, pair)
        security = Security(keys["a"], {"b": keys["b"].public})
        keyed = ("--keys", str(tmp_path))
    record = tmp_path / "record.jsonl"
    total = 600
    streams = ("p", "q")
    # The first incarnation records this one and then never answers it: the
    # kill lands between processing a message and confirming it.
    stalled_at = 151
    stalled = f"{streams[stalled_at % 2]}:{stalled_at}"
    port = free_port()
    handles: dict[str, SendHandle] = {}
    fed = trio.Event()
    with trio.fail_after(90):
        async with open_node(
            "a",
            bind="tcp://127.0.0.1:*",
            peers={"b": endpoint_of(port)},
            config=NodeConfig(sender=replace(QUICK, max_in_flight=128)),
            security=security,
        ) as a:

            async def feed() -> None:
                for i in range(total):
                    await a.wait_window("b")
                    payload = f"{streams[i % 2]}:{i}"
                    handles[payload] = a.send_nowait("b", payload, stream=streams[i % 2])
                fed.set()

            async with trio.open_nursery() as nursery:
                stall = "--stall-on", str(stalled_at)
                async with receiver(tmp_path, port, record, *stall, *keyed) as first:
                    nursery.start_soon(feed)
                    # The record is written by another process: polling it is
                    # the only way to see its progress.
                    with trio.fail_after(20):
                        while stalled not in recorded(record):  # noqa: ASYNC110
                            await trio.sleep(0.02)
                    # No checkpoint between the snapshot and the kill: the
                    # answers known here are exactly those given before it.
                    submitted = set(handles)
                    settled = {p for p, h in handles.items() if h.done}
                    await first.kill()
                await trio.sleep(0.5)
                async with receiver(tmp_path, port, record, *keyed) as second:
                    with trio.fail_after(40):
                        await fed.wait()
                        acks = {p: await h.wait() for p, h in handles.items()}
                    stats = link_stats(a)
                    second_stats = await second.stop()

    lines, gaps = read_record(record)
    assert gaps == []
    by_inc: dict[int, list[Line]] = defaultdict(list)
    for line in lines:
        by_inc[line.inc].append(line)
    assert set(by_inc) == {first.incarnation, second.incarnation}
    seen = {inc: Counter(line.payload for line in got) for inc, got in by_inc.items()}
    # Within one incarnation nothing is processed twice, and each stream is
    # handed over in order.
    for inc, got in by_inc.items():
        assert set(seen[inc].values()) == {1}, f"incarnation {inc} processed a payload twice"
        for stream_lines in payloads_by_stream(got).values():
            stream_seqs = [line.stream_seq for line in stream_lines]
            assert stream_seqs == sorted(stream_seqs)
    # Nothing lost: every payload was processed by some incarnation, and the
    # one whose ACK the sender holds did process it.
    assert set(acks) == {f"{streams[i % 2]}:{i}" for i in range(total)}
    for payload, ack in acks.items():
        assert ack.result["i"] == payload_index(payload)
        assert payload in seen[ack.result["inc"]]
    # Answers given before the kill stand: never re-sent to the new incarnation.
    assert all(acks[p].result["inc"] == first.incarnation for p in settled)
    assert not settled & set(seen[second.incarnation])
    # A payload may be processed by both incarnations: the first processed
    # it but died before its ACK reached the sender, so the sender (rightly,
    # design.md §3.1) sent it again to the new incarnation. Only messages in
    # flight at the kill (submitted, no final answer yet) can be in that case.
    twice = set(seen[first.incarnation]) & set(seen[second.incarnation])
    assert stalled in twice
    assert twice <= submitted - settled
    assert all(acks[p].result["inc"] == second.incarnation for p in twice)
    # The sender saw one restart; the new incarnation opened a fresh session
    # for "a" and delivered exactly what it recorded.
    assert (stats.peer_restarts, stats.peer_incarnation) == (1, second.incarnation)
    assert (stats.acked, stats.gave_up, stats.in_flight) == (total, 0, 0)
    [session] = second_stats["sessions"]
    assert session["peer"] == "a"
    assert session["delivered"] == len(by_inc[second.incarnation])
    print(
        f"kill/restart: {len(settled)} answered before the kill, "
        f"{len(submitted - settled)} in flight, {len(twice)} processed by both incarnations"
    )


async def test_peer_that_never_comes_up_fails_each_send_at_its_deadline() -> None:
    port = free_port()
    timeouts = (0.3, 0.6, 1.0)
    failures: dict[float, tuple[DeliveryFailed, float]] = {}
    with trio.fail_after(10):
        async with open_node(
            "a",
            bind="tcp://127.0.0.1:*",
            peers={"b": endpoint_of(port)},
            config=NodeConfig(sender=QUICK),
        ) as a:

            async def one(timeout: float) -> None:
                start = trio.current_time()
                with pytest.raises(DeliveryFailed) as info:
                    await a.send("b", f"t:{timeout}", timeout=timeout)
                failures[timeout] = (info.value, trio.current_time() - start)

            async with trio.open_nursery() as nursery:
                for timeout in timeouts:
                    nursery.start_soon(one, timeout)
            stats = link_stats(a)
            state = a.state("b")

    for timeout, (error, elapsed) in failures.items():
        assert timeout <= elapsed < timeout + 0.5, (timeout, elapsed)
        assert error.held is False
        assert error.peer == "b"
    assert (stats.gave_up, stats.acked, stats.in_flight) == (len(timeouts), 0, 0)
    assert state is not PeerState.UP


async def test_seed_question_1_no_reconnect_needed_after_the_server_comes_back(
    tmp_path: Path,
) -> None:
    """Seed question 1, answered by running it.

    "What happens when the server goes offline and the client times out on
    send? When I bring the server back online things are still broken. Do I
    need to reconnect the client?" With cellmesh: the send that timed out ends
    in DeliveryFailed, and the same node object (no reconnect, no new socket
    by the user) sends again as soon as the server is back.
    """
    record = tmp_path / "record.jsonl"
    port = free_port()
    with trio.fail_after(60):
        async with open_node(
            "a",
            bind="tcp://127.0.0.1:*",
            peers={"b": endpoint_of(port)},
            config=NodeConfig(sender=QUICK),
        ) as client:
            async with receiver(tmp_path, port, record) as server:
                first = await client.send("b", "q:0", timeout=10)
                assert first.result == {"i": 0, "inc": server.incarnation}
                await server.kill()
            # The server is offline: the client's send times out.
            start = trio.current_time()
            with pytest.raises(DeliveryFailed):
                await client.send("b", "q:1", timeout=0.5)
            assert 0.5 <= trio.current_time() - start < 1.0
            async with receiver(tmp_path, port, record) as server_again:
                back = trio.current_time()
                # The same client object, nothing reconnected by hand.
                ack = await client.send("b", "q:2", timeout=10)
                recovery = trio.current_time() - back
                assert ack.result == {"i": 2, "inc": server_again.incarnation}
                more = [await client.send("b", f"q:{i}", timeout=10) for i in range(3, 23)]
                assert [m.result["i"] for m in more] == list(range(3, 23))
                assert client.state("b") is PeerState.UP
                stats = link_stats(client)

    assert (stats.peer_restarts, stats.gave_up) == (1, 1)
    lines, _ = read_record(record)
    payloads = Counter(line.payload for line in lines)
    assert payloads["q:0"] == 1
    assert payloads["q:2"] == 1
    # The timed-out message may or may not have reached the server (that is
    # what DeliveryFailed says), but never twice.
    assert payloads["q:1"] <= 1
    assert all(payloads[f"q:{i}"] == 1 for i in range(3, 23))
    print(f"seed Q1: first send after the server came back took {recovery:.2f} s")
