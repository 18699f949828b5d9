"""Durable receiving: the journal of a node opened with ``open_node(..., journal=PATH)``.

What it makes exactly-once across a crash (issue 18, design.md §6 "Durability
is a commit, not a log line"): the compute actor's state and the node's
receive state (each peer's session: incarnation, watermark, cached final
answers; each stream's position) are committed together, in one sqlite
transaction, and a final answer leaves the node only after the commit that
covers it. A process that restarts with the same node id and journal
resumes the same sessions: the senders' resends of messages it had
processed are answered from the journal, not processed again (Kafka's
transactions and Flink's checkpoints commit state and input positions
together the same way).

Who does what:

* :class:`DurableCell` runs the compute actor. Its loop is the runtime's
  (``_ActorCell._work``) with three additions: at each *commit point* (the
  mailbox is empty, or a run of ``_DRAIN_RUN`` messages is done; never inside
  a batch's items) it takes ``actor.snapshot()`` and asks the Receiver to
  commit; a new instance is built from the last committed state
  (``restore``); and an instance that replaces a crashed one first replays
  the messages processed since that commit, so its state holds what their
  (not yet sent) answers say.
* The Receiver (actors/_inbound.py) holds the compute actor's outcomes
  instead of answering them; on ``Commit`` it writes them, the sessions'
  marks and the state through :class:`JournalStore`, and only then hands
  them to its protocol core, whose answers the I/O task flushes.
* :class:`JournalStore` is the sqlite file: WAL mode, one transaction per
  commit (group commit: one per run of messages, not one per message).

Why the commit runs inline on the compute task and not in a thread: the
commit must happen between two of the actor's messages and before the
answers reach the core, and a WAL append with ``synchronous=NORMAL`` is a
write into the page cache (no fsync), measured at tens of µs per commit
(bench/links.py, the ``durable`` row; docs/reliability.md). A
``trio.to_thread`` hop costs more than that, and the I/O task could flush
while the actor waits.

Why ``synchronous=NORMAL`` by default: in WAL mode a committed transaction
is in the OS's page cache when the commit returns, so it survives the death
of the process (SIGKILL, a crash) — the failure issue 18 asks about. Only
an OS crash or power loss can lose the last commits, and with them answers
already sent: ``NodeConfig.journal_sync="full"`` fsyncs every commit for
that, at the cost of one disk flush per commit.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast, runtime_checkable

import cbor2
import trio

from transport import (
    Incarnation,
    Limits,
    LinkSeq,
    LocalProtocolError,
    NodeId,
    StreamId,
    StreamSeq,
    decode,
)
from transport.events import CachedAnswer, SessionSnapshot
from transport.frames import AckFrame, AckItems, ItemAck, ItemErr, ItemOutcome

from ._actor import _DRAIN_RUN, Actor, ReplySink, _ActorCell, _Items
from ._outcomes import Reject
from ._spec import ChildSpec

#: How hard each commit is pushed to the disk (module docstring).
JournalSync = Literal["normal", "full"]

#: The journal's layout; a journal of another version is refused, not guessed at.
_SCHEMA = 1

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1), blob BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sessions "
    "(peer TEXT PRIMARY KEY, incarnation INTEGER NOT NULL, watermark INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS answers (peer TEXT NOT NULL, seq INTEGER NOT NULL, "
    "items INTEGER NOT NULL, outcome BLOB NOT NULL, PRIMARY KEY (peer, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS streams (peer TEXT NOT NULL, stream TEXT NOT NULL, "
    "next INTEGER NOT NULL, PRIMARY KEY (peer, stream)) WITHOUT ROWID",
)

# Outcome kinds in the answers table: a plain ACK and an ERR are stored as
# plain values; an answer that carries results is stored as the encoded
# answer frame, so that it decodes to exactly what went on the wire.
_ACK = 0
_ERR = 1
_FRAME = 2


@runtime_checkable
class Durable(Protocol):
    """What a compute actor of a durable node provides: its state as plain data.

    ``snapshot()`` is called at every commit, between two messages; what it
    returns must be CBOR-encodable plain data (None, bool, int, float, str,
    bytes, lists, dicts; a set as a sorted list) and is encoded at once, so
    returning a live object is safe. ``restore(state)`` is called on a new
    instance, before ``on_start``, with the decoded value of the last commit
    (never on the very first start of a node with an empty journal).
    """

    def snapshot(self) -> Any:
        """The actor's state now, as plain data."""
        ...

    def restore(self, state: Any) -> None:
        """Take back the state of the last commit."""
        ...


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    """A durable node's journal.

    Attributes:
        path: the sqlite file.
        sync: ``"normal"`` or ``"full"`` (``NodeConfig.journal_sync``).
        commits: transactions committed by this process.
        answers: final answers written.
        commit_seconds: wall time spent in commits (sqlite and encoding).
        max_commit_seconds: the longest commit.
        replayed: messages processed again after a compute crash, to rebuild
            the state of the answers not committed yet.
        recovered_sessions: peer sessions taken back from the journal at start.
    """

    path: str
    sync: JournalSync
    commits: int
    answers: int
    commit_seconds: float
    max_commit_seconds: float
    replayed: int
    recovered_sessions: int


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a journal held when the node opened it."""

    state: bytes | None
    sessions: tuple[SessionSnapshot, ...]
    #: Per peer: the session incarnation and, per stream, the first stream
    #: seq not processed (committed) yet.
    streams: Mapping[NodeId, tuple[Incarnation, Mapping[StreamId, StreamSeq]]]


@dataclass(frozen=True, slots=True)
class AnswerRow:
    """One final answer to write: the message, its item count, its outcome."""

    peer: NodeId
    seq: LinkSeq
    items: int
    #: ``ItemAck(None)`` and ``ItemErr`` as they are; an answer with results
    #: as the parts of its encoded frame (AckFrame or AckItems).
    outcome: ItemAck | ItemErr | list[bytes]


class JournalStore:
    """The sqlite file of a durable node. Sync: called between the compute actor's messages.

    Args:
        path: the file; created if missing.
        node: this node's id; a journal of another node is refused.
        incarnation: this process's incarnation; it must be greater than
            every incarnation that opened the journal before.
        sync: ``"normal"`` or ``"full"`` (module docstring).
        limits: the codec limits answers with results are decoded with.

    Raises:
        LocalProtocolError: the journal belongs to another node, was written
            by a newer layout, or saw an incarnation at least as great.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        node: NodeId,
        incarnation: Incarnation,
        *,
        sync: JournalSync = "normal",
        limits: Limits | None = None,
    ) -> None:
        if sync not in ("normal", "full"):
            raise LocalProtocolError(f"journal_sync must be 'normal' or 'full', got {sync!r}")
        self._path = os.fspath(path)
        self._sync: JournalSync = sync
        self._limits = limits if limits is not None else Limits()
        # Autocommit mode: every transaction is an explicit BEGIN ... COMMIT.
        # The node calls it from one thread; bench/journal.py also times the
        # same call from a worker thread, which the check would refuse.
        self._db = db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={sync.upper()}")
            self.recovered = self._open(node, incarnation)
        except BaseException:
            db.close()
            raise
        #: The last committed state: what a new compute instance restores.
        self.state: bytes | None = self.recovered.state
        # What the file holds now, so that a commit writes only what changed.
        self._marks: dict[NodeId, tuple[int, int]] = {
            s.peer: (s.incarnation, s.watermark) for s in self.recovered.sessions
        }
        self._positions: dict[tuple[NodeId, StreamId], int] = {
            (peer, stream): nxt
            for peer, (_, streams) in self.recovered.streams.items()
            for stream, nxt in streams.items()
        }
        self._commits = 0
        self._answers = 0
        self._seconds = 0.0
        self._max_seconds = 0.0
        #: Counted by the DurableCell.
        self.replayed = 0

    def _open(self, node: NodeId, incarnation: Incarnation) -> Recovered:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in _TABLES:
                db.execute(table)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema", _SCHEMA) != _SCHEMA:
                raise LocalProtocolError(
                    f"journal {self._path} has layout {meta['schema']}, this cellmesh writes "
                    f"{_SCHEMA}; give the node a new journal file"
                )
            if meta.get("node", node) != node:
                raise LocalProtocolError(
                    f"journal {self._path} belongs to node {meta['node']!r}, not {node!r}; "
                    "each node needs its own journal file"
                )
            last = meta.get("incarnation")
            if last is not None and incarnation <= last:
                raise LocalProtocolError(
                    f"incarnation {incarnation} of {node!r} is not greater than {last}, which "
                    "opened this journal before; leave incarnation to the default (time_ns)"
                )
            recovered = self._read()
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("schema", _SCHEMA), ("node", node), ("incarnation", incarnation)],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return recovered

    def _read(self) -> Recovered:
        db = self._db
        row = db.execute("SELECT blob FROM state WHERE id = 1").fetchone()
        answers: dict[str, list[CachedAnswer]] = {}
        for peer, seq, items, blob in db.execute(
            "SELECT peer, seq, items, outcome FROM answers ORDER BY peer, seq"
        ):
            outcome = self._outcome(cbor2.loads(blob))
            answers.setdefault(peer, []).append(CachedAnswer(LinkSeq(seq), items, outcome))
        sessions = []
        incs: dict[NodeId, Incarnation] = {}
        for peer, inc, watermark in db.execute("SELECT peer, incarnation, watermark FROM sessions"):
            incs[NodeId(peer)] = Incarnation(inc)
            sessions.append(
                SessionSnapshot(
                    NodeId(peer),
                    Incarnation(inc),
                    LinkSeq(watermark),
                    tuple(answers.get(peer, ())),
                )
            )
        streams: dict[NodeId, dict[StreamId, StreamSeq]] = {}
        for peer, stream, nxt in db.execute("SELECT peer, stream, next FROM streams"):
            streams.setdefault(NodeId(peer), {})[StreamId(stream)] = StreamSeq(nxt)
        return Recovered(
            state=None if row is None else bytes(row[0]),
            sessions=tuple(sessions),
            streams={peer: (incs[peer], s) for peer, s in streams.items() if peer in incs},
        )

    def _outcome(self, stored: list[Any]) -> ItemOutcome | tuple[ItemOutcome, ...]:
        kind = stored[0]
        if kind == _ACK:
            return ItemAck(None)
        if kind == _ERR:
            return ItemErr(stored[1], stored[2])
        frame = decode(stored[1], self._limits)
        if isinstance(frame, AckFrame):
            return ItemAck(frame.result)
        if isinstance(frame, AckItems):
            return frame.outcomes
        raise LocalProtocolError(f"journal {self._path} holds an answer of kind {type(frame)}")

    @property
    def path(self) -> str:
        """The sqlite file."""
        return self._path

    def write(
        self,
        state: bytes,
        sessions: Mapping[NodeId, tuple[Incarnation, LinkSeq]],
        answers: Iterable[AnswerRow],
        positions: Mapping[tuple[NodeId, StreamId], int],
    ) -> None:
        """Commit the state, the sessions' marks, new answers and stream positions together.

        Args:
            state: the compute actor's encoded snapshot.
            sessions: every live session's (peer incarnation, watermark): a new
                incarnation drops the peer's old answers and positions, a
                higher watermark the answers below it.
            answers: final answers of the live sessions, not written before.
            positions: per (peer, stream), the first stream seq not processed.

        Raises:
            sqlite3.Error: the write failed; nothing of it is in the file.
        """
        started = time.perf_counter()
        marks = dict(self._marks)
        known = dict(self._positions)
        db = self._db
        db.execute("BEGIN")
        try:
            for peer, (inc, watermark) in sessions.items():
                old = marks.get(peer)
                if old is not None and old == (inc, watermark):
                    continue
                if old is None or old[0] != inc:
                    # A new session of the peer: the old one's answers and
                    # stream positions mean nothing to it.
                    db.execute("DELETE FROM answers WHERE peer = ?", (peer,))
                    db.execute("DELETE FROM streams WHERE peer = ?", (peer,))
                    for key in [k for k in known if k[0] == peer]:
                        del known[key]
                else:
                    db.execute("DELETE FROM answers WHERE peer = ? AND seq < ?", (peer, watermark))
                db.execute(
                    "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (peer, inc, watermark)
                )
                marks[peer] = (inc, watermark)
            moved = {key: nxt for key, nxt in positions.items() if nxt > known.get(key, 0)}
            rows = [(a.peer, a.seq, a.items, _stored(a.outcome)) for a in answers]
            db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)", rows)
            if moved:
                db.executemany(
                    "INSERT OR REPLACE INTO streams VALUES (?, ?, ?)",
                    [(peer, stream, nxt) for (peer, stream), nxt in moved.items()],
                )
            db.execute("INSERT OR REPLACE INTO state VALUES (1, ?)", (state,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._marks = marks
        known.update(moved)
        self._positions = known
        self.state = state
        took = time.perf_counter() - started
        self._commits += 1
        self._answers += len(rows)
        self._seconds += took
        self._max_seconds = max(self._max_seconds, took)

    def close(self) -> None:
        """Close the file (the WAL is checkpointed into it)."""
        self._db.close()

    def statistics(self) -> JournalStatistics:
        """A snapshot of the counters."""
        return JournalStatistics(
            path=self._path,
            sync=self._sync,
            commits=self._commits,
            answers=self._answers,
            commit_seconds=self._seconds,
            max_commit_seconds=self._max_seconds,
            replayed=self.replayed,
            recovered_sessions=len(self.recovered.sessions),
        )


def _stored(outcome: ItemAck | ItemErr | list[bytes]) -> bytes:
    """An answer's outcome as the journal stores it."""
    if isinstance(outcome, ItemAck):
        return cbor2.dumps([_ACK])
    if isinstance(outcome, ItemErr):
        return cbor2.dumps([_ERR, outcome.code, outcome.detail])
    return cbor2.dumps([_FRAME, [bytes(part) for part in outcome]])


def encode_state(actor: object, state: Any) -> bytes:
    """``state`` (from ``actor.snapshot()``) as the journal stores it.

    Raises:
        LocalProtocolError: CBOR cannot encode it.
    """
    try:
        return cbor2.dumps(state)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(
            f"{type(actor).__name__}.snapshot() returned a value CBOR cannot encode ({exc}); "
            "return plain data: None, bool, int, float, str, bytes, lists and dicts"
        ) from exc


class DurableCell(_ActorCell[Any, Any]):
    """The compute actor's cell on a durable node: commits, restores, replays.

    Args:
        spec: the compute actor's spec; its instances must be
            :class:`Durable` and handle one message at a time.
        store: the journal: the last committed state comes from it.
    """

    def __init__(self, spec: ChildSpec[Any, Any], store: JournalStore) -> None:
        factory = spec.factory
        super().__init__(
            ChildSpec(
                spec.name,
                lambda: self._restored(factory),
                spec.restart,
                spec.mailbox_size,
                spec.max_concurrency,
                spec.shutdown,
            )
        )
        self._store = store
        self._commit_to: Callable[[bytes], None] | None = None
        #: Messages processed since the last commit, in order: a new instance
        #: replays them on top of the committed state.
        self._replay: list[Any] = []

    def bind(self, commit: Callable[[bytes], None]) -> None:
        """Set where commits go (the Receiver), once it exists; before, no message arrives."""
        self._commit_to = commit

    def _restored(self, factory: Callable[[], Actor[Any, Any]]) -> Actor[Any, Any]:
        """A new instance, checked, with the last committed state."""
        actor = factory()
        if not isinstance(actor, Durable):
            raise LocalProtocolError(
                f"{type(actor).__name__} runs on a node with a journal: give it "
                "snapshot() -> plain data and restore(state) (actors.journal.Durable)"
            )
        if (self.spec.max_concurrency or actor.max_concurrency) != 1:
            raise LocalProtocolError(
                f"{type(actor).__name__} runs on a node with a journal, which commits "
                "between messages: it must handle one message at a time (max_concurrency 1)"
            )
        state = self._store.state
        if state is not None:
            actor.restore(cbor2.loads(state))
        return actor

    def _commit(self, actor: Actor[Any, Any]) -> None:
        """Commit the state and every outcome held since the last commit."""
        commit_to = self._commit_to
        if commit_to is None:
            return
        state = encode_state(actor, cast(Durable, actor).snapshot())
        commit_to(state)
        self._replay.clear()

    async def _work(self, actor: Actor[Any, Any], in_hand: set[ReplySink]) -> None:
        """The runtime's loop, one message at a time, with commit points and replay."""
        replay = self._replay
        if replay:
            # This instance replaces a crashed one and holds the last
            # committed state: bring it to where the held answers say.
            for msg in list(replay):
                self._store.replayed += 1
                with contextlib.suppress(Reject):
                    await actor.receive(msg)
        # A commit at once: the crashed instance's last outcome (ERR) waits
        # for one, and nothing else may come to trigger it.
        self._commit(actor)
        receive = self._recv_chan.receive
        receive_nowait = self._recv_chan.receive_nowait
        carried = self._carried
        items: _Items[Any] | None = None
        run = 0
        try:
            while True:
                entry: Any
                if carried:
                    entry = carried.popleft()
                else:
                    try:
                        entry = receive_nowait()
                    except trio.WouldBlock:
                        if replay:
                            self._commit(actor)
                        run = 0
                        entry = await receive()
                if type(entry) is _Items:
                    items = entry
                    sink = entry if entry.reply is not None else None
                    msgs = entry.msgs
                    while entry.next < len(msgs):
                        i = entry.next
                        entry.next = i + 1
                        entry.current = i
                        await self._one(actor, msgs[i], sink, in_hand)
                        run += 1
                    items = None
                else:
                    await self._one(actor, entry.msg, entry.reply, in_hand)
                    run += 1
                if self._exit_requested:
                    self._commit(actor)
                    self._request_exit()
                    return
                if run >= _DRAIN_RUN:
                    self._commit(actor)
                    run = 0
                    await trio.lowlevel.checkpoint()
        finally:
            if items is not None and items.next < len(items.msgs):
                carried.append(items)

    async def _one(
        self, actor: Actor[Any, Any], msg: Any, sink: ReplySink | None, in_hand: set[ReplySink]
    ) -> None:
        """Handle one message as the runtime does; remember it for a replay."""
        self._busy += 1
        if sink is None:
            with contextlib.suppress(Reject):
                await actor.receive(msg)
        else:
            in_hand.add(sink)
            try:
                result = await actor.receive(msg)
            except Reject as reject:
                in_hand.discard(sink)
                sink.fail(reject)
            else:
                in_hand.discard(sink)
                sink.set_result(result)
        self._replay.append(msg)
        self._busy -= 1
        self._processed += 1
