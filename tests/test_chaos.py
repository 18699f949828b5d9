"""The chaos suite: real node processes under every fault at once.

Two workloads, both over real OS processes on 127.0.0.1:

1. The 4-node Life (and heat) demo of :mod:`actors.grid` under seeded drop,
   duplicate and delay faults on every process's wire (DATA *and* answers),
   each alone and all combined, and with one tile frozen by SIGSTOP. The
   tiled result must equal the serial numpy run bit for bit: a lost halo
   would hang the run, a wrong or doubled one would change the grid.
2. A message-stream workload: two sender nodes in this process, two ordered
   streams each, with faults on their wire, sending to one receiver process
   (``tests/_peer.py``) that is frozen, killed with SIGKILL and restarted
   twice while the senders keep sending. About a third of the sends are
   batches (``send_batch_nowait``, 1..8 items as one DATA_ITEMS), so batches
   go through the same faults, freeze and kills. Every invariant is checked
   against the receiver's own record of what it processed, item by item.

Every test adds its figures to a module tally, printed at the end; run
``pytest -m chaos -s tests/test_chaos.py`` to see them (docs/reliability.md
quotes one such run).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from _peer import err_rule, payload_index
from test_processes import QUICK, Line, PeerProcess, free_port, read_record, receiver

from actors import (
    Ack,
    BatchHandle,
    DeliveryFailed,
    Node,
    NodeConfig,
    PeerError,
    SendError,
    SendHandle,
    open_node,
)
from actors.grid import Decomposition, Job, Pause, run_demo
from transport import (
    NodeId,
)
from transport.testing import (
    FaultPlan,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter[str]]:
    """Figures summed over the module's tests, printed once at the end."""
    counts: Counter[str] = Counter()
    yield counts
    print(f"\nCHAOS TOTAL {json.dumps(dict(sorted(counts.items())))}")


# --- 1. the grid demo under faults -----------------------------------------------------

#: Rates high enough that every run hits each fault hundreds of times.
DROP, DUP, DELAY_MS = 0.1, 0.2, 8.0

DEMO_CASES: dict[str, tuple[Job, list[Pause]]] = {
    "drop": (Job(drop=DROP), []),
    "dup": (Job(dup=DUP), []),
    "delay": (Job(delay_ms=DELAY_MS), []),
    "combined": (Job(drop=DROP, dup=DUP, delay_ms=DELAY_MS), []),
    "combined-heat": (Job(model="heat", drop=DROP, dup=DUP, delay_ms=DELAY_MS), []),
    "combined-sigstop": (
        Job(drop=DROP, dup=DUP, delay_ms=DELAY_MS),
        [Pause("t0-1", 10, 1.5)],
    ),
}
DEMO_NODES = 4


def halo_messages(size: int, frames: int) -> int:
    """How many halo sends a run makes: one per neighbouring node per frame."""
    decomp = Decomposition.for_nodes((size, size), DEMO_NODES)
    return frames * sum(
        len({decomp.node_id(other) for other in decomp.neighbours(tile).values()})
        for tile in decomp.tile_ids()
    )


@pytest.mark.parametrize("case", list(DEMO_CASES))
async def test_grid_run_under_faults_equals_the_serial_run(
    case: str, tmp_path: Path, tally: Counter[str]
) -> None:
    base, pauses = DEMO_CASES[case]
    job = replace(base, size=64, frames=30, seed=11)
    start = trio.current_time()
    outcome = await run_demo(
        job, nodes=DEMO_NODES, out=tmp_path, pauses=pauses, show=False, timeout=120
    )
    elapsed = trio.current_time() - start

    tally["demo_mismatches"] += 0 if outcome.match else 1
    assert outcome.match, (case, outcome.sha256, outcome.serial_sha256)
    resent = sum(n["resent"] for n in outcome.per_node.values())
    duplicates = sum(n["duplicates_dropped"] for n in outcome.per_node.values())
    # Each fault must really have happened, or the case proves nothing.
    if job.drop:
        assert resent > 0, "drop faults caused no resend"
    if job.dup:
        assert duplicates > 0, "duplicate faults reached no receiver"
    for pause in pauses:
        assert elapsed >= pause.seconds, "the run finished while a node was frozen"
    # Each pause was carried out before its node finished its frames.
    assert len(outcome.paused) == len(pauses)
    for done in outcome.paused:
        assert int(done.split("@")[1].split(":")[0]) < job.frames
    halos = halo_messages(job.size, job.frames)
    tally["demo_runs"] += 1
    tally["demo_halo_messages_checked"] += halos
    tally["demo_resent"] += resent
    tally["demo_duplicates_dropped"] += duplicates
    tally["demo_sigstop_pauses"] += len(pauses)
    print(
        f"CHAOS demo {case}: match={outcome.match} {halos} halos, resent {resent}, "
        f"duplicates dropped {duplicates}, {elapsed:.1f} s"
    )


# --- 2. message streams, a faulty wire, a receiver frozen, killed, restarted --------------

#: Each sender's streams; names are unique across senders, so a record line
#: (which names the stream, not the peer) still says whose message it is.
SENDERS: dict[str, tuple[str, str]] = {"a": ("a0", "a1"), "c": ("c0", "c1")}
#: Payloads (single messages plus batch items) each sender sends.
PER_SENDER = 500
#: The share of sends that are batches, and their largest size.
BATCH_SHARE, MAX_BATCH = 0.35, 8
ERR_EVERY = 9
#: The first incarnation records this index and never answers it, so the
#: first kill lands between processing a message and confirming it; the
#: second lands wherever the flow is once the record holds SECOND_KILL_AT.
STALL_ON, SECOND_KILL_AT = 230, 560
KILLS = 2
#: The first incarnation is frozen for this long once it has recorded FREEZE_AT.
FREEZE_AT, FREEZE_FOR = 100, 1.0
WIRE = FaultPlan(drop=0.1, duplicate=0.1, delay=0.01)


def config(index: int) -> NodeConfig:
    """A sender with quick retries and its own seeded faults on everything it sends."""
    return NodeConfig(
        sender=replace(QUICK, max_in_flight=64),
        faults=replace(WIRE, seed=100 + index),
        seed=index,
    )


async def outcome_of(handle: SendHandle) -> Ack | SendError:
    """The send's one final outcome, as a value."""
    try:
        return await handle.wait()
    except SendError as exc:
        return exc


async def outcomes_of(handle: SendHandle | BatchHandle) -> list[Ack | SendError]:
    """One final outcome per item (a single send is one item), as values."""
    if isinstance(handle, SendHandle):
        return [await outcome_of(handle)]
    try:
        return list(await handle.wait())
    except SendError as exc:
        # A batch fails as a whole: the same failure for every item.
        return [exc] * handle.count


def stalled_in(lines: list[Line]) -> bool:
    """Whether the receiver recorded the message it will never answer."""
    return any(payload_index(line.payload) == STALL_ON for line in lines)


async def wait_recorded(record: Path, count: int, *, or_stalled: bool = False) -> None:
    """Wait until the receiver's record holds ``count`` deliveries (or the stall)."""
    # The record is written by another process: polling it is the only way
    # to see its progress.
    with trio.fail_after(30):
        while True:
            lines = read_record(record)[0]
            if len(lines) >= count or (or_stalled and stalled_in(lines)):
                return
            await trio.sleep(0.02)


async def wait_stalled(record: Path) -> None:
    """Wait until the receiver recorded the message it will never answer."""
    with trio.fail_after(30):
        while not stalled_in(read_record(record)[0]):  # noqa: ASYNC110
            await trio.sleep(0.02)


def fault_counts(node: Node) -> Counter[str]:
    """What ``node``'s fault injector did to its DATA towards "b"."""
    stats = node.statistics().links[NodeId("b")].faults
    return Counter(dropped=stats.dropped, duplicated=stats.duplicated, delayed=stats.delayed)


async def test_streams_survive_faults_freeze_and_receiver_restarts(
    tmp_path: Path, tally: Counter[str]
) -> None:
    record = tmp_path / "record.jsonl"
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    options = ("--peer", "c", "--err-every", str(ERR_EVERY))
    #: payload -> the handle of the send that carried it, and its item index.
    handles: dict[str, tuple[SendHandle | BatchHandle, int]] = {}
    #: Payloads of each batch, in item order, by the batch's (stream, stream_seq).
    batch_items: dict[tuple[str, int], list[str]] = {}
    messages: Counter[str] = Counter()
    # Per kill: the payloads whose final answer was known just before it, and
    # the ones submitted without one.
    settled_before: list[set[str]] = []
    in_flight_at: list[set[str]] = []
    incarnations: list[PeerProcess] = []
    #: The next payload index; shared by both senders, so every payload is unique.
    next_index = [0]
    fed = {name: trio.Event() for name in SENDERS}

    async def feed(node: Node, streams: tuple[str, str]) -> None:
        rng = random.Random(f"batches-{node.id}")
        k = 0
        while k < PER_SENDER:
            stream = streams[messages[node.id] % 2]
            is_batch = rng.random() < BATCH_SHARE
            size = rng.randint(1, MAX_BATCH) if is_batch else 1
            await node.wait_window("b")
            # No checkpoint from here to the send: a batch's indices are consecutive.
            first = next_index[0]
            if first <= STALL_ON < first + MAX_BATCH:
                # The payload the first receiver stalls on travels inside a
                # batch, so its kill cuts a batch short, halfway through.
                is_batch, size = True, min(MAX_BATCH, STALL_ON - first + 3)
            size = min(size, PER_SENDER - k)
            next_index[0] += size
            payloads = [f"{stream}:{i}" for i in range(first, first + size)]
            handle: SendHandle | BatchHandle
            if is_batch:
                handle = node.send_batch_nowait("b", payloads, stream=stream)
                batch_items[stream, handle.stream_seq] = payloads
            else:
                handle = node.send_nowait("b", payloads[0], stream=stream)
            for item, payload in enumerate(payloads):
                handles[payload] = (handle, item)
            messages[node.id] += 1
            k += size
            # A light pace, so the sends span every phase below.
            await trio.sleep(0.001)
        fed[node.id].set()

    def snapshot() -> None:
        settled = {p for p, (h, _) in handles.items() if h.done}
        settled_before.append(settled)
        in_flight_at.append(set(handles) - settled)

    with trio.fail_after(150):
        async with (
            open_node("a", bind="tcp://127.0.0.1:*", peers={"b": endpoint}, config=config(0)) as a,
            open_node("c", bind="tcp://127.0.0.1:*", peers={"b": endpoint}, config=config(1)) as c,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(feed, a, SENDERS["a"])
            nursery.start_soon(feed, c, SENDERS["c"])
            stall = ("--stall-on", str(STALL_ON))
            async with receiver(tmp_path, port, record, *options, *stall) as first:
                incarnations.append(first)
                # The compute actor takes one delivery at a time, so once it
                # stalls the record grows no more: if the stalled payload's
                # stream outran the others, freeze the stalled process instead.
                await wait_recorded(record, FREEZE_AT, or_stalled=True)
                first.pause()
                await trio.sleep(FREEZE_FOR)
                first.resume()
                await wait_stalled(record)
                # No checkpoint between the snapshot and the SIGKILL: the
                # answers known here are exactly those given before it.
                snapshot()
                await first.kill()
            await trio.sleep(0.3)
            async with receiver(tmp_path, port, record, *options) as second:
                incarnations.append(second)
                await wait_recorded(record, SECOND_KILL_AT)
                snapshot()
                await second.kill()
            await trio.sleep(0.3)
            async with receiver(tmp_path, port, record, *options) as third:
                incarnations.append(third)
                with trio.fail_after(60):
                    for event in fed.values():
                        await event.wait()
                    answers = {
                        id(h): await outcomes_of(h) for h, item in handles.values() if not item
                    }
                    outcomes = {p: answers[id(h)][item] for p, (h, item) in handles.items()}
                link_stats = {n.id: n.statistics().links[NodeId("b")].protocol for n in (a, c)}
                faults = fault_counts(a) + fault_counts(c)
                third_stats = await third.stop()

    total = PER_SENDER * len(SENDERS)
    lines, gaps = read_record(record)
    incs = [p.incarnation for p in incarnations]
    by_inc: dict[int, list[Line]] = defaultdict(list)
    for line in lines:
        by_inc[line.inc].append(line)
    assert set(by_inc) == set(incs), "an incarnation processed nothing: the kills missed"
    seen = {inc: Counter(line.payload for line in got) for inc, got in by_inc.items()}
    processed = set[str]().union(*seen.values())

    # Every send ended in exactly one outcome, the one the receiver's rule
    # decides: ERR for every ERR_EVERY-th index, ACK for the rest; none timed out.
    assert set(outcomes) == set(handles)
    assert len(outcomes) == total
    assert len(batch_items) > 20, "too few batches to prove anything"
    assert not [o for o in outcomes.values() if isinstance(o, DeliveryFailed)]
    for payload, got in outcomes.items():
        rule = err_rule(payload, ERR_EVERY)
        if rule is None:
            assert isinstance(got, Ack), (payload, got)
            assert got.result["i"] == payload_index(payload)
        else:
            assert isinstance(got, PeerError), (payload, got)
            assert (got.code, got.detail) == rule
    # The protocol counters agree: no send settled twice, none left open.
    for name, stats in link_stats.items():
        # Counted per protocol message: a batch is one, whatever its items got.
        assert stats.acked + stats.erred == messages[name], name
        assert (stats.gave_up, stats.in_flight) == (0, 0), name
        assert stats.peer_restarts == KILLS, name

    # Nothing lost: every message was processed, and the incarnation whose
    # ACK the sender holds is one that processed it.
    lost = set(outcomes) - processed
    tally["losses_found"] += len(lost)
    assert not lost
    for payload, got in outcomes.items():
        if isinstance(got, Ack):
            assert payload in seen[got.result["inc"]]

    # Nothing processed twice by one incarnation; each stream handed over in
    # order, and without holes except where a Gap event says so out loud.
    doubled = sum(n - 1 for counts in seen.values() for n in counts.values())
    tally["duplicates_found"] += doubled
    assert doubled == 0, "an incarnation processed a payload twice"
    gap_seqs: dict[tuple[int, str], set[int]] = defaultdict(set)
    for gap in gaps:
        stream, first_seq, last_seq, _ = gap["gap"]
        gap_seqs[gap["inc"], stream].update(range(first_seq, last_seq + 1))
    for inc, inc_lines in by_inc.items():
        streams: dict[str, list[int]] = defaultdict(list)
        order: dict[str, list[tuple[int, int]]] = defaultdict(list)
        items_of: dict[tuple[str, int], list[str]] = defaultdict(list)
        for line in inc_lines:
            streams[line.stream].append(line.stream_seq)
            order[line.stream].append((line.stream_seq, payload_index(line.payload)))
            items_of[line.stream, line.stream_seq].append(line.payload)
        for (stream, stream_seq), got_items in items_of.items():
            # A batch's items reach the compute layer in item order, from the
            # first; only a kill may cut the run of them short.
            sent_items = batch_items.get((stream, stream_seq), got_items)
            assert got_items == sent_items[: len(got_items)], (inc, stream, stream_seq)
            if inc == incs[-1]:
                assert got_items == sent_items, (stream, stream_seq)
        for stream, seqs in streams.items():
            # Ordered by stream seq, then by item; nothing twice.
            assert order[stream] == sorted(set(order[stream])), f"{stream} out of order in {inc}"
            seqs = sorted(set(seqs))
            # The first incarnation saw each stream from its start.
            low = 1 if inc == incs[0] else seqs[0]
            holes = set(range(low, seqs[-1] + 1)) - set(seqs)
            assert holes <= gap_seqs[inc, stream], f"{stream} skipped {holes} silently"
    # A gap may only cover messages an earlier incarnation processed.
    by_place: dict[tuple[str, int], list[str]] = defaultdict(list)
    for p, (h, _) in handles.items():
        by_place[h.stream, h.stream_seq].append(p)
    for (inc, stream), covered in gap_seqs.items():
        for seq in covered:
            for payload in by_place[stream, seq]:
                assert payload not in seen[inc]
                assert any(payload in seen[i] for i in incs if i < inc), (payload, inc)

    # Final answers given before a kill stand: those messages are never sent
    # to (nor processed by) a later incarnation. A message may be processed
    # by two incarnations only if it was in flight at the kill between them
    # (processed, but the answer died with the process): at-least-once
    # across receiver restarts, exactly-once within one.
    reprocessed: set[str] = set()
    for k, settled in enumerate(settled_before):
        later = set[str]().union(*(seen[inc] for inc in incs[k + 1 :]))
        assert not settled & later
        twice = set(seen[incs[k]]) & later
        assert twice <= in_flight_at[k]
        reprocessed |= twice
    stalled = {p for p in handles if payload_index(p) == STALL_ON}
    # The batch the stalled payload is in died unanswered with the first
    # incarnation, which had processed its items in order up to the stall and
    # none after it; a later incarnation processed all of them again.
    ((stall_handle, _),) = {handles[p] for p in stalled}
    assert isinstance(stall_handle, BatchHandle)
    assert stall_handle.count > 1
    stall_batch = [p for p, (h, _) in handles.items() if h is stall_handle]
    assert set(stall_batch) <= in_flight_at[0]
    first_seen = set(seen[incs[0]])
    for payload in stall_batch:
        assert (payload in first_seen) == (payload_index(payload) <= STALL_ON), payload
        assert any(payload in seen[inc] for inc in incs[1:]), payload
    assert stalled <= reprocessed
    for payload in reprocessed:
        got = outcomes[payload]
        if isinstance(got, Ack):
            # The answer that counts is the last incarnation's.
            assert got.result["inc"] == max(i for i in incs if payload in seen[i])

    sessions = {s["peer"]: s for s in third_stats["sessions"]}
    assert set(sessions) == set(SENDERS)
    # The protocol counts messages; a batch's items share one (stream, stream_seq).
    last_messages = {(line.stream, line.stream_seq) for line in by_inc[incs[-1]]}
    assert sum(s["delivered"] for s in sessions.values()) == len(last_messages)
    assert faults["dropped"] > 0
    assert faults["duplicated"] > 0
    assert faults["delayed"] > 0

    resent = sum(s.resent for s in link_stats.values())
    duplicates = sum(s["duplicates"] for s in sessions.values())
    tally["stream_messages_checked"] += total
    tally["stream_batches"] += len(batch_items)
    tally["stream_batch_items"] += sum(len(items) for items in batch_items.values())
    tally["stream_errs_checked"] += sum(isinstance(o, PeerError) for o in outcomes.values())
    tally["stream_faults_dropped"] += faults["dropped"]
    tally["stream_faults_duplicated"] += faults["duplicated"]
    tally["stream_faults_delayed"] += faults["delayed"]
    tally["stream_resent"] += resent
    tally["stream_sigkills"] += KILLS
    tally["stream_sigstops"] += 1
    tally["stream_reprocessed_across_restarts"] += len(reprocessed)
    tally["stream_gap_events"] += len(gaps)
    print(
        f"CHAOS streams: {total} sends, {len(incs)} receiver incarnations, faults "
        f"{dict(faults)}, resent {resent}, duplicates dropped by the last incarnation "
        f"{duplicates}, {len(reprocessed)} processed again after a kill, {len(gaps)} gap events, "
        f"{len(batch_items)} batches"
    )
