"""A foreign cellmesh peer, written from docs/protocol.md alone, in plain pyzmq and cbor2.

Nothing here imports cellmesh (``transport`` or ``actors``): this file is the proof that the
specification is enough to talk to a node. Section numbers (§) refer to docs/protocol.md.

- Frames are CBOR arrays whose first element is the kind (§3.1, §3.2); this module builds them
  as plain lists and reads answers back into ``Frame`` values.
- One ZeroMQ message is ``[header, oob1, ..., oobn]`` (§2.1); ``Oob`` marks a byte string that
  travels out of band as tag 52753 (§3.4).
- ``Sender`` is the DEALER side of a link (§5): it numbers link and stream seqs, stamps the
  watermark and stream floor, keeps the credit and resends on a timer with backoff.
- ``Receiver`` is the ROUTER side (§6): one session per peer incarnation, dedup with cached
  final answers, a credit window, and whatever answer the test chooses for each new message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import zmq

# §3.1 frame kinds.
HELLO, DATA, RECEIVED, ACK, ERR, RETRY_LATER, REQ, REQ_ANSWER = 1, 2, 3, 4, 5, 6, 7, 8
BATCH, ACK_RANGE, DATA_ITEMS, ACK_ITEMS = 9, 10, 11, 12
#: The protocol version every HELLO carries (§5.6).
VERSION = 1
U63_MAX = 2**63 - 1
OOB_TAG = 52753
# §6.5 RETRY_LATER reasons, §8 missing statuses, §9 ERR codes.
WINDOW_FULL, BUFFER_FULL = 1, 2
RESENT, IN_FLIGHT, GIVEN_UP, NEVER_SENT, ANSWERED = 1, 2, 3, 4, 5
COMPUTE_FAILED, NO_HANDLER, STALE_SESSION, GAP_FAILED, SHUTTING_DOWN, SKIPPED = 1, 2, 3, 4, 5, 6
#: Answers that end a message at the sender (§1, §5.1).
FINAL = (ACK, ERR, ACK_ITEMS)


def new_incarnation() -> int:
    """A fresh incarnation, greater than every earlier one of this host (§4.1)."""
    return time.time_ns()


@dataclass(frozen=True, slots=True)
class Oob:
    """A byte string sent as an out-of-band part (§3.4)."""

    data: bytes


# ---------------------------------------------------------------------------------------------
# Frames (§3.2): builders return the CBOR array as a list.


def hello(node: str, inc: int, nonce: int, reply: bool, version: int = VERSION) -> list[Any]:
    return [HELLO, node, inc, nonce, reply, version]


def data(
    node: str,
    inc: int,
    seq: int,
    payload: Any,
    *,
    stream: str = "default",
    stream_seq: int | None = None,
    stream_floor: int | None = None,
    frame_no: int | None = None,
    watermark: int | None = None,
) -> list[Any]:
    """A DATA; stream_seq, stream_floor and watermark default to values valid for a first send."""
    stream_seq = seq if stream_seq is None else stream_seq
    return [
        DATA,
        node,
        inc,
        seq,
        stream,
        stream_seq,
        stream_seq if stream_floor is None else stream_floor,
        frame_no,
        payload,
        seq if watermark is None else watermark,
    ]


def data_items(node: str, inc: int, seq: int, items: list[Any], **kw: Any) -> list[Any]:
    frame = data(node, inc, seq, items, **kw)
    frame[0] = DATA_ITEMS
    return frame


def answer_head(node: str, inc: int, peer_inc: int, seq: int, credit: int) -> list[Any]:
    return [node, inc, peer_inc, seq, credit]


def req_answer(
    node: str,
    inc: int,
    query_id: int,
    stream: str | None,
    missing: list[list[int]],
    streams: list[list[Any]] | None = None,
) -> list[Any]:
    return [REQ_ANSWER, node, inc, query_id, stream, missing, streams or []]


def batch(frames: list[Any]) -> list[Any]:
    return [BATCH, frames]


# ---------------------------------------------------------------------------------------------
# Encoding (§3.4): Oob values become tag 52753 references, numbered in encoded byte order.


def encode(message: Any) -> list[bytes]:
    """The ZeroMQ parts of one message: the CBOR header, then every Oob value's bytes."""
    parts: list[bytes] = []

    def walk(value: Any) -> Any:
        # cbor2 writes lists in order and maps in insertion order, so this depth-first walk
        # numbers the references in encoded byte order, as §3.4 requires.
        if isinstance(value, Oob):
            parts.append(value.data)
            return cbor2.CBORTag(OOB_TAG, len(parts))
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    header = cbor2.dumps(walk(message))
    return [header, *parts]


def encode_with_raw(frame: list[Any], index: int, raw: bytes) -> list[bytes]:
    """``frame`` encoded with the CBOR bytes ``raw`` as element ``index``.

    For input cbor2 would never write (duplicate keys, bad UTF-8, undefined, foreign tags) and
    for big payloads built as bytes rather than as Python objects.
    """
    marker = "\u2603marker\u2603"
    header = cbor2.dumps([*frame[:index], marker, *frame[index + 1 :]])
    encoded = cbor2.dumps(marker)
    at = header.index(encoded)
    return [header[:at] + raw + header[at + len(encoded) :]]


def zeros_array(n: int) -> bytes:
    """The CBOR of an array of ``n`` zeros: the cheapest header to send, costly to decode."""
    return b"\x9a" + n.to_bytes(4, "big") + b"\x00" * n


class DecodeError(Exception):
    """A message from the node that breaks §3; the tests treat it as a node bug."""


def decode(parts: list[bytes]) -> Any:
    """The header of ``parts`` as Python values, with out-of-band references resolved."""
    if not parts:
        raise DecodeError("no header part")
    used: list[int] = []

    def tag_hook(_decoder: Any, tag: cbor2.CBORTag) -> Any:
        if tag.tag != OOB_TAG:
            raise DecodeError(f"tag {tag.tag} is not allowed (§3.6 bad-tag)")
        if tag.value != len(used) + 1 or tag.value >= len(parts):
            raise DecodeError(f"out-of-band reference {tag.value} out of order (§3.4)")
        used.append(tag.value)
        return parts[tag.value]

    value = cbor2.loads(parts[0], tag_hook=tag_hook)
    if len(used) != len(parts) - 1:
        raise DecodeError(f"{len(parts) - 1 - len(used)} out-of-band parts not referenced")
    return value


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame read from the wire: its kind, the raw array and the named fields of §3.2."""

    kind: int
    raw: list[Any]
    fields: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


_NAMES: dict[int, tuple[str, ...]] = {
    HELLO: ("node", "incarnation", "nonce", "reply", "version"),
    DATA: (
        "node",
        "incarnation",
        "seq",
        "stream",
        "stream_seq",
        "stream_floor",
        "frame_no",
        "payload",
        "watermark",
    ),
    RECEIVED: ("node", "incarnation", "peer_incarnation", "seq", "credit"),
    ACK: ("node", "incarnation", "peer_incarnation", "seq", "credit", "result"),
    ERR: ("node", "incarnation", "peer_incarnation", "seq", "credit", "code", "detail"),
    RETRY_LATER: ("node", "incarnation", "peer_incarnation", "seq", "credit", "reason"),
    REQ: ("node", "incarnation", "query_id", "stream", "missing"),
    REQ_ANSWER: ("node", "incarnation", "query_id", "stream", "missing", "streams"),
    ACK_RANGE: ("node", "incarnation", "peer_incarnation", "first", "last", "credit"),
    ACK_ITEMS: ("node", "incarnation", "peer_incarnation", "seq", "credit", "outcomes"),
}
_NAMES[DATA_ITEMS] = tuple("items" if n == "payload" else n for n in _NAMES[DATA])


def frames_of(message: Any) -> list[Frame]:
    """The frames of a decoded message: one, or those of a batch (§3.3)."""
    if not isinstance(message, list) or not message:
        raise DecodeError(f"a message is an array (§3.1), got {message!r:.80}")
    if message[0] == BATCH:
        return [frame_of(f) for f in message[1]]
    return [frame_of(message)]


def frame_of(raw: Any) -> Frame:
    kind = raw[0]
    names = _NAMES.get(kind)
    if kind == HELLO and len(raw) == len(_NAMES[HELLO]):
        # A node from before HELLO carried a version: read it, so that a test can say
        # exactly what is missing (version None) instead of failing to decode.
        raw = [*raw, None]
    if names is None or len(raw) != len(names) + 1:
        raise DecodeError(f"not a frame of §3.2: {raw!r:.120}")
    return Frame(kind, raw, dict(zip(names, raw[1:], strict=True)))


# ---------------------------------------------------------------------------------------------
# Sockets (§2).


def dealer(ctx: zmq.Context[Any], routing_id: bytes, endpoint: str) -> zmq.Socket[Any]:
    """A DEALER that names itself ``routing_id``, connected to ``endpoint`` (§2.1, §2.2)."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.connect(endpoint)
    return sock


def router(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    """A ROUTER bound at ``endpoint``, handing a restarted peer its connection (§2.2)."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A socket closed a moment ago on this endpoint (a restart) frees it in ZeroMQ's I/O
    # thread, not at once: retry for a bounded while.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            sock.bind(endpoint)
            return sock
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                sock.close(0)
                raise
            time.sleep(0.02)


def recv_parts(sock: zmq.Socket[Any], timeout: float) -> list[bytes] | None:
    """One multipart message, or None after ``timeout`` seconds."""
    if sock.poll(int(max(timeout, 0) * 1000), zmq.POLLIN):
        return sock.recv_multipart()
    return None


class Link:
    """A bare DEALER that talks to a node: send any message or raw parts, read frames back."""

    def __init__(
        self, ctx: zmq.Context[Any], node_id: str, endpoint: str, routing_id: bytes | None = None
    ) -> None:
        self.node = node_id
        self.sock = dealer(ctx, node_id.encode() if routing_id is None else routing_id, endpoint)
        self.backlog: list[Frame] = []

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: Any) -> None:
        self.sock.send_multipart(encode(message))

    def send_parts(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def read(self, timeout: float) -> list[Frame]:
        """Every frame that arrives within ``timeout`` seconds (after the backlog)."""
        frames, self.backlog = self.backlog, []
        deadline = time.monotonic() + timeout
        while (parts := recv_parts(self.sock, deadline - time.monotonic())) is not None:
            frames.extend(frames_of(decode(parts)))
        return frames

    def expect(self, match: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        """The first frame that ``match`` accepts; the others stay in the backlog."""
        deadline = time.monotonic() + timeout
        kept: list[Frame] = []
        pending, self.backlog = self.backlog, []
        try:
            while True:
                while pending:
                    frame = pending.pop(0)
                    if match(frame):
                        return frame
                    kept.append(frame)
                parts = recv_parts(self.sock, deadline - time.monotonic())
                if parts is None:
                    raise TimeoutError(f"no matching frame in {timeout} s; got {kept!r:.600}")
                pending = frames_of(decode(parts))
        finally:
            self.backlog = kept + pending + self.backlog

    def probe(self, timeout: float = 5.0) -> Frame:
        """A DATA beyond any fresh window and its RETRY_LATER (§6.2 step 6).

        Proof that the node still answers this peer, without a delivery and without HELLO.
        It starts a new session (a fresh incarnation) that holds nothing.
        """
        inc = new_incarnation()
        self.send(data(self.node, inc, 2**20, "probe", stream_seq=1, watermark=1))
        return self.expect(lambda f: f.kind == RETRY_LATER and f.peer_incarnation == inc, timeout)

    def ping(self, inc: int, nonce: int, timeout: float = 5.0) -> Frame:
        """A HELLO request and its reply: proof that the node still answers this peer."""
        self.send(hello(self.node, inc, nonce, False))
        return self.expect(lambda f: f.kind == HELLO and f.nonce == nonce, timeout)


# ---------------------------------------------------------------------------------------------
# The sender role (§5).


@dataclass(slots=True)
class Outgoing:
    seq: int
    stream: str
    stream_seq: int
    payload: Any
    kind: int = DATA
    frame_no: int | None = None
    transmissions: int = 0
    held: bool = False
    due: float = 0.0
    rto: float = 0.2
    answer: Frame | None = None
    first_sent: float = 0.0
    answered_at: float = 0.0


class Sender:
    """The sender side of a link, as §5 and §11.1 describe it, driven by ``pump``.

    It uses no jitter and no RTT estimate: the RTO stays at ``retry_timeout`` for a first
    resend and doubles up to ``retry_ceiling`` (§5.3), which §11.1 allows.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        node_id: str,
        endpoint: str,
        *,
        incarnation: int | None = None,
        initial_credit: int = 256,
        retry_timeout: float = 0.2,
        retry_ceiling: float = 2.0,
    ) -> None:
        self.link = Link(ctx, node_id, endpoint)
        self.node = node_id
        self.inc = new_incarnation() if incarnation is None else incarnation
        self.initial_credit = initial_credit
        self.retry_timeout = retry_timeout
        self.retry_ceiling = retry_ceiling
        self.credit = initial_credit
        self.next_seq = 1
        self.stream_next: dict[str, int] = {}
        self.messages: dict[int, Outgoing] = {}
        self.peer_inc: int | None = None
        self.frames_seen: list[Frame] = []
        self.nonce = 0

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def watermark(self) -> int:
        """The lowest seq without a final outcome, or the next seq (§5.4)."""
        open_seqs = [m.seq for m in self.messages.values() if m.answer is None]
        return min(open_seqs, default=self.next_seq)

    def stream_floor(self, stream: str) -> int:
        open_seqs = [
            m.stream_seq for m in self.messages.values() if m.stream == stream and m.answer is None
        ]
        return min(open_seqs, default=self.stream_next.get(stream, 1))

    def submit(
        self,
        payload: Any,
        stream: str = "default",
        *,
        items: bool = False,
        frame_no: int | None = None,
    ) -> int:
        """Queue one message (a DATA_ITEMS when ``items``); returns its link seq."""
        seq = self.next_seq
        self.next_seq += 1
        stream_seq = self.stream_next.get(stream, 1)
        self.stream_next[stream] = stream_seq + 1
        kind = DATA_ITEMS if items else DATA
        self.messages[seq] = Outgoing(
            seq, stream, stream_seq, payload, kind, frame_no, rto=self.retry_timeout
        )
        return seq

    def frame(self, msg: Outgoing) -> list[Any]:
        frame = data(
            self.node,
            self.inc,
            msg.seq,
            msg.payload,
            stream=msg.stream,
            stream_seq=msg.stream_seq,
            stream_floor=self.stream_floor(msg.stream),
            frame_no=msg.frame_no,
            watermark=self.watermark,
        )
        frame[0] = msg.kind
        return frame

    def transmit_due(self, now: float) -> None:
        """Resend what is due and send new DATA within the credit, as one batch (§5.5)."""
        frames = []
        outstanding = any(m.transmissions and m.answer is None for m in self.messages.values())
        for msg in sorted(self.messages.values(), key=lambda m: m.seq):
            if msg.answer is not None or msg.due > now:
                continue
            if msg.transmissions == 0 and msg.seq > self.credit and outstanding:
                continue
            if msg.transmissions == 0:
                msg.first_sent = now
                outstanding = True
            msg.transmissions += 1
            if msg.held:
                msg.due = now + self.retry_ceiling
            else:
                msg.due = now + msg.rto
                msg.rto = min(msg.rto * 2, self.retry_ceiling)
            frames.append(self.frame(msg))
        if len(frames) == 1:
            self.link.send(frames[0])
        elif frames:
            self.link.send(batch(frames))

    def take(self, frame: Frame, now: float) -> None:
        """Apply one frame from the receiver (§4.2, §5.1, §5.4, §8)."""
        self.frames_seen.append(frame)
        inc = frame.incarnation
        if self.peer_inc is not None and inc < self.peer_inc:
            return
        if self.peer_inc is not None and inc > self.peer_inc:
            self.restarted(now)
        self.peer_inc = inc
        if frame.kind == HELLO:
            if not frame.reply:
                self.link.send(hello(self.node, self.inc, frame.nonce, True))
            return
        if frame.kind == REQ:
            self.link.send(self.answer_req(frame))
            return
        if frame.peer_incarnation != self.inc:
            return
        if frame.kind != ERR or frame.code != STALE_SESSION:
            self.credit = max(self.credit, frame.credit)
        if frame.kind == ACK_RANGE:
            for seq in range(
                max(frame.first, self.watermark), min(frame.last, self.next_seq - 1) + 1
            ):
                self.finish(seq, frame, now)
            return
        msg = self.messages.get(frame.seq)
        if msg is None or msg.answer is not None:
            return
        if frame.kind in FINAL:
            self.finish(frame.seq, frame, now)
        elif frame.kind == RECEIVED:
            msg.held = True
            msg.due = now + self.retry_ceiling
        elif frame.kind == RETRY_LATER and frame.reason == BUFFER_FULL and msg.held:
            msg.held = False
            msg.due = now + msg.rto

    def finish(self, seq: int, frame: Frame, now: float) -> None:
        msg = self.messages.get(seq)
        if msg is not None and msg.answer is None:
            msg.answer = frame
            msg.answered_at = now

    def restarted(self, now: float) -> None:
        """The receiver restarted: resend everything unanswered at once, reset credit (§4.3)."""
        for msg in self.messages.values():
            if msg.answer is None and msg.transmissions:
                msg.held = False
                msg.rto = self.retry_timeout
                msg.due = now
        self.credit = self.watermark + self.initial_credit - 1

    def answer_req(self, req: Frame) -> list[Any]:
        """The REQ_ANSWER of §8."""
        if req.missing:
            missing = []
            last = self.stream_next.get(req.stream, 1) - 1
            for k in req.missing:
                msgs = [m for m in self.messages.values() if m.stream == req.stream]
                match = [m for m in msgs if m.stream_seq == k]
                if not msgs or k == 0 or k > last or not match:
                    status = NEVER_SENT
                elif match[0].answer is not None:
                    status = ANSWERED
                else:
                    status = IN_FLIGHT
                    match[0].due = 0.0
                missing.append([k, status])
            return req_answer(self.node, self.inc, req.query_id, req.stream, missing)
        streams = []
        for stream, nxt in self.stream_next.items():
            if req.stream is not None and stream != req.stream:
                continue
            in_flight = sum(
                1 for m in self.messages.values() if m.stream == stream and m.answer is None
            )
            streams.append([stream, nxt - 1, in_flight, 0])
        return req_answer(self.node, self.inc, req.query_id, req.stream, [], streams)

    def pump(self, timeout: float) -> None:
        """Send what is due and take answers for ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self.transmit_due(now)
            if now >= deadline:
                return
            wake = min([m.due for m in self.messages.values() if m.answer is None] + [deadline])
            parts = recv_parts(self.link.sock, min(max(wake - now, 0.0), deadline - now))
            if parts is not None:
                for frame in frames_of(decode(parts)):
                    self.take(frame, time.monotonic())

    def run(self, timeout: float = 10.0) -> dict[int, Frame]:
        """Pump until every submitted message has a final answer; returns them by seq."""
        deadline = time.monotonic() + timeout
        while any(m.answer is None for m in self.messages.values()):
            if time.monotonic() >= deadline:
                missing = [m.seq for m in self.messages.values() if m.answer is None]
                raise TimeoutError(f"no final answer for seqs {missing} in {timeout} s")
            self.pump(0.02)
        return {seq: m.answer for seq, m in self.messages.items() if m.answer is not None}


# ---------------------------------------------------------------------------------------------
# The receiver role (§6).

#: What the test's policy answers a new message with: ("ack", result), ("err", code, detail),
#: ("hold",) for RECEIVED now and a final answer later via ``Receiver.complete``,
#: ("retry", reason), ("drop",) to stay silent, or ("once", answer) to send a final answer
#: without keeping it.
Policy = Callable[[Frame], tuple[Any, ...]]


@dataclass(slots=True)
class Session:
    incarnation: int
    watermark: int
    floor: int
    entries: dict[int, list[Any] | None] = field(default_factory=dict)
    delivered: list[Frame] = field(default_factory=list)


class Receiver:
    """The receiver side of links from a node, as §6 and §11.2 describe it."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        node_id: str,
        endpoint: str,
        peers: Iterable[str],
        policy: Policy,
        *,
        incarnation: int | None = None,
        window: int = 256,
    ) -> None:
        self.sock = router(ctx, endpoint)
        self.node = node_id
        self.inc = new_incarnation() if incarnation is None else incarnation
        self.peers = {p.encode() for p in peers}
        self.policy = policy
        self.window = window
        self.sessions: dict[str, Session] = {}
        self.newest: dict[str, int] = {}
        self.log: list[Frame] = []
        self.routes: dict[str, bytes] = {}

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def credit(self, session: Session) -> int:
        return min(session.floor + self.window - 1, U63_MAX)

    def head(self, session: Session, seq: int) -> list[Any]:
        return answer_head(self.node, self.inc, session.incarnation, seq, self.credit(session))

    def answer_for(self, session: Session, seq: int) -> list[Any]:
        entry = session.entries[seq]
        if entry is None:
            return [RECEIVED, *self.head(session, seq)]
        kind, *rest = entry
        return [kind, *self.head(session, seq), *rest]

    def advance(self, session: Session) -> None:
        while session.entries.get(session.floor) is not None:
            session.floor += 1

    def complete(self, peer: str, seq: int, answer: tuple[Any, ...]) -> None:
        """Give a held message its final answer and send it."""
        session = self.sessions[peer]
        session.entries[seq] = self.final(answer)
        self.advance(session)
        self.send(peer, self.answer_for(session, seq))

    @staticmethod
    def final(answer: tuple[Any, ...]) -> list[Any]:
        if answer[0] == "ack":
            return [ACK, answer[1]]
        if answer[0] == "err":
            return [ERR, answer[1], answer[2]]
        if answer[0] == "items":
            return [ACK_ITEMS, answer[1]]
        raise ValueError(f"not a final answer: {answer!r}")

    def send(self, peer: str, frame: list[Any]) -> None:
        self.sock.send_multipart([self.routes[peer], *encode(frame)])

    def on_data(self, peer: str, frame: Frame) -> None:
        """§4.2 and §6.2, in order."""
        if not 1 <= frame.watermark <= frame.seq:
            return
        newest = self.newest.get(peer, -1)
        if frame.incarnation < newest:
            self.send(
                peer,
                [
                    ERR,
                    *answer_head(self.node, self.inc, frame.incarnation, frame.seq, 0),
                    STALE_SESSION,
                    f"incarnation {frame.incarnation} of {peer} was replaced by {newest}",
                ],
            )
            return
        session = self.sessions.get(peer)
        if session is None or session.incarnation < frame.incarnation:
            session = Session(frame.incarnation, frame.watermark, frame.watermark)
            self.sessions[peer] = session
            self.newest[peer] = frame.incarnation
        if frame.watermark > session.watermark:
            session.entries = {s: e for s, e in session.entries.items() if s >= frame.watermark}
            session.watermark = frame.watermark
            session.floor = max(session.floor, frame.watermark)
            self.advance(session)
        if frame.seq < session.watermark:
            return
        if frame.seq in session.entries:
            self.send(peer, self.answer_for(session, frame.seq))
            return
        if frame.seq >= session.floor + self.window:
            self.send(peer, [RETRY_LATER, *self.head(session, frame.seq), WINDOW_FULL])
            return
        answer = self.policy(frame)
        if answer[0] == "drop":
            return
        if answer[0] == "once":
            # A final answer sent but not kept: a resend is taken as new (a test's bad answer).
            self.send(
                peer,
                [
                    *self.final(answer[1])[:1],
                    *self.head(session, frame.seq),
                    *self.final(answer[1])[1:],
                ],
            )
            return
        if answer[0] == "retry":
            self.send(peer, [RETRY_LATER, *self.head(session, frame.seq), answer[1]])
            return
        session.delivered.append(frame)
        if answer[0] == "hold":
            session.entries[frame.seq] = None
        else:
            session.entries[frame.seq] = self.final(answer)
            self.advance(session)
        self.send(peer, self.answer_for(session, frame.seq))

    def serve(self, timeout: float, until: Callable[[], bool] | None = None) -> None:
        """Answer the node's frames for ``timeout`` seconds, or until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (until and until()):
            parts = recv_parts(self.sock, min(0.02, deadline - time.monotonic()))
            if parts is None:
                continue
            routing_id, *rest = parts
            if routing_id not in self.peers:
                continue
            peer = routing_id.decode()
            self.routes[peer] = routing_id
            for frame in frames_of(decode(rest)):
                self.log.append(frame)
                if frame.node != peer:
                    continue
                if frame.kind == HELLO and not frame.reply:
                    if frame.incarnation > self.newest.get(peer, -1):
                        self.newest[peer] = frame.incarnation
                    self.send(peer, hello(self.node, self.inc, frame.nonce, True))
                elif frame.kind in (DATA, DATA_ITEMS):
                    self.on_data(peer, frame)

    def data_frames(self) -> list[Frame]:
        return [f for f in self.log if f.kind in (DATA, DATA_ITEMS)]


def replace(frame: list[Any], index: int, value: Any) -> list[Any]:
    """A copy of ``frame`` with element ``index`` set to ``value``."""
    copy = list(frame)
    copy[index] = value
    return copy
