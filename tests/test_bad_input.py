"""Bad input from the network: the node keeps serving, loses nothing, counts it.

The live test runs node "b" over real sockets while node "a" keeps 2,000
sends in flight to it and raw ZeroMQ DEALERs (driven by the test, not by a
node) throw everything the wire can carry at b's ROUTER. Each bad message is
judged by :func:`decode` here first, so the test knows the exact reason key
b must count it under. The property test drives :class:`LinkReceiver`
directly with arbitrary frame sequences from arbitrary origins.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cbor2
import trio
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_util import AsyncValue
from zmq.utils.monitor import parse_monitor_message

from actors import Actor, Delivery, Gap, Node, NodeConfig, SendHandle, open_node
from transport import (
    ErrCode,
    Incarnation,
    Limits,
    LinkReceiver,
    LinkSeq,
    NodeId,
    ReceiverConfig,
    RemoteProtocolError,
    Socket,
    StreamId,
    StreamSeq,
    dealer_socket,
    decode,
    encode,
)
from transport.events import Admitted
from transport.frames import (
    AckFrame,
    Batch,
    Data,
    ErrFrame,
    Frame,
    Hello,
    MissingItem,
    MissingStatus,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
    StreamStatus,
)

#: Small enough that an oversized message costs the test almost nothing.
LIMITS = Limits(max_message_bytes=64 * 1024, max_header_bytes=32 * 1024)
#: libzmq's own cap on b's sockets (``zmq.MAXMSGSIZE`` in ``ROUTER_OPTIONS``).
ZMQ_MAXMSGSIZE = 64 * 1024 * 1024
SENDS = 2000
FLOOD = 3000
EVIL = NodeId("evil")
C = NodeId("c")
A = NodeId("a")

Parts = list[bytes]


class Recorder(Actor[Any, Any]):
    """b's compute actor: records every delivery (and any gap) and ACKs it."""

    def __init__(self, seen: list[tuple[str, str, int, Any]]) -> None:
        self.seen = seen

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Gap):
            self.seen.append(("gap", msg.stream, msg.first, msg.reason))
            return None
        assert isinstance(msg, Delivery)
        self.seen.append((msg.peer, msg.stream, msg.stream_seq, msg.payload))
        return None


def verdict(parts: Sequence[bytes]) -> str | None:
    """The reason b's codec refuses ``parts`` for, or None if they decode."""
    try:
        decode(parts, LIMITS)
    except RemoteProtocolError as exc:
        return exc.reason
    return None


def evil_frames(inc: Incarnation) -> list[Frame]:
    """One valid frame of every kind, all naming "evil" as their sender."""
    seq, one = LinkSeq(1), StreamSeq(1)
    return [
        Hello(EVIL, inc, 1, False),
        Data(EVIL, inc, seq, StreamId("s"), one, one, 3, {"k": [1, 2.5, "x", b"y"]}, seq),
        Received(EVIL, inc, inc, seq, seq),
        AckFrame(EVIL, inc, inc, seq, seq, [1, 2]),
        ErrFrame(EVIL, inc, inc, seq, seq, ErrCode.COMPUTE_FAILED, "no"),
        RetryLater(EVIL, inc, inc, seq, seq, RetryReason.WINDOW_FULL),
        Req(EVIL, inc, 4, StreamId("s"), (one,)),
        ReqAnswer(
            EVIL,
            inc,
            4,
            StreamId("s"),
            (MissingItem(one, MissingStatus.RESENT),),
            (StreamStatus(StreamId("s"), one, 0, 0),),
        ),
        Batch((Hello(EVIL, inc, 2, False), Received(EVIL, inc, inc, seq, seq))),
    ]


def garbage(rng: random.Random) -> Iterator[Parts]:
    """Random bytes, truncated and bit-flipped encodings, in one seeded stream."""
    for _ in range(300):
        n_parts = rng.choice((1, 1, 1, 2, 3))
        yield [rng.randbytes(rng.randrange(0, 120)) for _ in range(n_parts)]
    # A big out-of-band payload makes the encodings carry an extra part too.
    frames = [*evil_frames(Incarnation(99)), _data(EVIL, 99, 1, b"z" * 5000)]
    for frame in frames:
        header, *rest = wire(frame)
        for cut in range(len(header)):
            yield [header[:cut], *rest]
        for _ in range(40):
            flipped = bytearray(header)
            bit = rng.randrange(len(flipped) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
            yield [bytes(flipped), *rest]
        if rest:
            # Out-of-band parts missing, or one too many.
            yield [header]
            yield [header, *rest, b"extra"]


def wire(frame: Frame) -> Parts:
    """``frame`` encoded (with no size limit) as the bytes of its parts."""
    return [bytes(part) for part in encode(frame)]


def crafted() -> list[tuple[str, Parts]]:
    """Hand-made bad messages, each with the reason it must be counted under."""
    hello = [1, "evil", 1, 1, False, 1]
    return [
        # Over max_message_bytes with an out-of-band part, and a header over
        # max_header_bytes: both refused from their size alone.
        ("too-large", wire(_data(EVIL, 99, 1, b"x" * 70_000))),
        ("too-large", [cbor2.dumps([2, "evil", 1, 1, "s", 1, 1, None, ["y" * 100] * 400, 1])]),
        ("unknown-kind", [cbor2.dumps([42, "evil", 1])]),
        ("unknown-kind", [cbor2.dumps([0])]),
        ("unknown-kind", [cbor2.dumps(["data", "evil", 1])]),
        ("unknown-kind", [cbor2.dumps([-1, "evil"])]),
        ("nested-batch", [cbor2.dumps([9, [hello, [9, [hello]]]])]),
        ("bad-field", [cbor2.dumps([9, []])]),
        # A datetime tag: no CBOR tag but ours may build an object.
        ("bad-tag", [cbor2.dumps(cbor2.CBORTag(1, 1_700_000_000))]),
        ("malformed", [cbor2.dumps(hello) + b"\x00"]),
        ("truncated", [b""]),
    ]


def _data(node: str, inc: int, seq: int, payload: Any, watermark: int = 1) -> Data:
    return Data(
        NodeId(node),
        Incarnation(inc),
        LinkSeq(seq),
        StreamId("s"),
        StreamSeq(seq),
        StreamSeq(1),
        None,
        payload,
        LinkSeq(watermark),
    )


def hello_reply(frames: list[Frame], nonce: int) -> bool:
    return any(isinstance(f, Hello) and f.reply and f.nonce == nonce for f in frames)


def flatten(frame: Frame) -> list[Frame]:
    return list(frame.frames) if isinstance(frame, Batch) else [frame]


async def answers_until(sock: Socket, done: Callable[[list[Frame]], bool]) -> list[Frame]:
    """Collect decoded frames from ``sock`` until ``done(frames)`` holds."""
    got: list[Frame] = []
    while not done(got):
        got.extend(flatten(decode(await sock.recv_multipart())))
    return got


async def wait_counts(b: Node, expected_inbound: Counter[str], expected_core: Counter[str]) -> None:
    """Wait until b has counted (at least) every rejection the test expects.

    Unknown routing ids get no answer at all, so there is nothing to wait on
    but b's own counters; the caller bounds this with ``fail_after``.
    """
    while True:
        inbound = b.statistics().inbound
        if Counter(inbound.rejected) >= expected_inbound and (
            Counter(inbound.protocol.rejected) >= expected_core
        ):
            return
        await trio.sleep(0.01)


async def test_node_serves_peers_while_raw_clients_throw_bad_input() -> None:
    seen: list[tuple[str, str, int, Any]] = []
    config = NodeConfig(limits=LIMITS)
    expected_inbound: Counter[str] = Counter()
    expected_core: Counter[str] = Counter()
    ctx: zmq.Context[Any] = zmq.Context()
    # How many of a's sends have their answer: the attackers pace themselves
    # on it, so the bad input is spread over the whole of a's traffic.
    progress = AsyncValue(0)
    handles: list[SendHandle] = []
    sockets: list[Socket] = []

    async def during(fraction: float) -> None:
        await progress.wait_value(lambda done: done >= int(fraction * SENDS))

    with trio.fail_after(60):
        async with (
            open_node(
                "b",
                bind="tcp://127.0.0.1:*",
                peers={"a": None, "evil": None, "c": None},
                compute=lambda: Recorder(seen),
                config=config,
            ) as b,
            open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}, config=config) as a,
        ):

            def raw(routing_id: bytes | None, **options: int) -> Socket:
                sock = dealer_socket(ctx, routing_id=routing_id, **options)
                sock.connect(b.endpoint)
                sockets.append(sock)
                return sock

            async def send_from_a() -> None:
                done = 0
                for i in range(SENDS):
                    await a.wait_window("b")
                    handles.append(a.send_nowait("b", i.to_bytes(4, "big"), stream="s"))
                    while done < len(handles) and handles[done].done:
                        done += 1
                    progress.value = done
                for handle in handles[done:]:
                    await handle.wait()
                    progress.value += 1

            async def evil() -> None:
                sock = raw(b"evil")
                for reason, parts in crafted():
                    assert verdict(parts) == reason
                # Mutations that still decode to a valid frame are not bad input.
                bad = [
                    p
                    for p in [*garbage(random.Random(7)), *(p for _, p in crafted())]
                    if verdict(p)
                ]
                for n, parts in enumerate(bad):
                    if n % 50 == 0:
                        await during(0.6 * n / len(bad))
                    expected_inbound[verdict(parts) or ""] += 1
                    await sock.send_multipart(parts)
                # Well-formed, but refused by the protocol core.
                inc = Incarnation(99)
                refused: list[tuple[Frame, str, int]] = [
                    (ReqAnswer(EVIL, inc, 123_456, None, (), ()), "unknown-query", 1),
                    (AckFrame(EVIL, inc, inc, LinkSeq(1), LinkSeq(1)), "unexpected-frame", 1),
                    (Hello(EVIL, inc, 5, True), "unexpected-frame", 1),
                    (_data("evil", 99, 3, b"w", watermark=4), "bad-data", 1),
                    (_data("a", a.incarnation + 1, 1, b"forged"), "impersonation", 1),
                    # Each frame of a batch is judged on its own.
                    (Batch((Hello(A, inc, 6, False), Hello(A, inc, 7, False))), "impersonation", 2),
                ]
                for frame, why, count in refused:
                    expected_core[why] += count
                    await sock.send_multipart(encode(frame, limits=LIMITS))
                # Everything sent before this HELLO was read once its reply is back;
                # nothing else was answered.
                await sock.send_multipart(encode(Hello(EVIL, inc, 4242, False)))
                got = await answers_until(sock, lambda fs: hello_reply(fs, 4242))
                assert [f for f in got if not isinstance(f, Hello)] == []
                # Closed first: with ROUTER_HANDOVER, two live DEALERs of one
                # routing id keep taking the route from each other.
                sock.close()
                await during(0.7)
                await giant()

            async def giant() -> None:
                # Over libzmq's MAXMSGSIZE: b's zmq drops the connection after
                # reading the size, before allocating; the node never sees it.
                sock = dealer_socket(ctx, routing_id=b"evil")
                sockets.append(sock)
                events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                monitor = Socket(sock.zmq_socket.get_monitor_socket(events))
                sockets.append(monitor)
                sock.connect(b.endpoint)

                async def next_event() -> int:
                    return int(parse_monitor_message(await monitor.recv_multipart())["event"])

                assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
                await sock.send_multipart([bytes(ZMQ_MAXMSGSIZE + 1)])
                assert await next_event() == zmq.EVENT_DISCONNECTED
                # The DEALER reconnects by itself and is served again. (A message
                # sent before the new handshake could die with the old pipe: this
                # raw client has no retransmission to make up for that.)
                assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
                await sock.send_multipart(encode(Hello(EVIL, Incarnation(99), 4343, False)))
                await answers_until(sock, lambda fs: hello_reply(fs, 4343))

            async def c_stale_and_impersonating() -> None:
                sock = raw(b"c")
                await during(0.2)
                await sock.send_multipart(encode(_data("c", 10, 1, b"c10"), limits=LIMITS))
                got = await answers_until(sock, lambda fs: any(isinstance(f, AckFrame) for f in fs))
                assert [(f.peer_incarnation, f.seq) for f in got if isinstance(f, AckFrame)] == [
                    (10, 1)
                ]
                # A late DATA of an older life of c: refused, answered, never delivered.
                await sock.send_multipart(encode(_data("c", 5, 2, b"c5"), limits=LIMITS))
                got = await answers_until(sock, lambda fs: any(isinstance(f, ErrFrame) for f in fs))
                [err] = [f for f in got if isinstance(f, ErrFrame)]
                assert (err.code, err.peer_incarnation, err.seq) == (ErrCode.STALE_SESSION, 5, 2)
                # Claiming to be "a" from c's connection: a newer incarnation of
                # a would end a's live session if it were believed.
                await during(0.4)
                forged = Incarnation(a.incarnation + 1)
                forgeries: list[Frame] = [
                    _data("a", forged, 1, b"forged"),
                    Hello(A, forged, 1, False),
                    ReqAnswer(A, forged, 1, None, (), ()),
                ]
                for frame in forgeries:
                    expected_core["impersonation"] += 1
                    await sock.send_multipart(encode(frame, limits=LIMITS))

            async def strangers() -> None:
                # Unknown routing ids, and none at all (libzmq then picks one).
                for rid in (b"mallory", b"a-", b"\x00evil", None):
                    sock = raw(rid)
                    for frame in (_data("a", 1, 1, b"m"), Hello(A, Incarnation(1), 1, False)):
                        expected_inbound["unknown-peer"] += 1
                        await sock.send_multipart(encode(frame, limits=LIMITS))
                flood = raw(b"mallory-flood", sndhwm=FLOOD)
                message = encode(_data("mallory", 1, 1, b"f" * 64), limits=LIMITS)
                for n in range(FLOOD):
                    if n % 100 == 0:
                        await during(0.1 + 0.5 * n / FLOOD)
                    expected_inbound["unknown-peer"] += 1
                    await flood.send_multipart(message)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_from_a)
                    nursery.start_soon(evil)
                    nursery.start_soon(c_stale_and_impersonating)
                    nursery.start_soon(strangers)
                await wait_counts(b, expected_inbound, expected_core)
            finally:
                for sock in sockets:
                    sock.close()
            stats = b.statistics()
            link = a.statistics().links[NodeId("b")].protocol
    ctx.destroy(linger=0)

    # Every send of a was ACKed once and seen once, in order.
    acks = [await h.wait() for h in handles]
    assert [ack.seq for ack in acks] == list(range(1, SENDS + 1))
    assert (link.acked, link.erred, link.gave_up, link.in_flight) == (SENDS, 0, 0, 0)
    from_a = [(s, n, p) for (peer, s, n, p) in seen if peer == "a"]
    assert from_a == [("s", i + 1, i.to_bytes(4, "big")) for i in range(SENDS)]
    # c's one real message was delivered; its stale one and every forgery were not.
    assert [x for x in seen if x[0] != "a"] == [("c", "s", 1, b"c10")]

    # Each rejection counted exactly once, under the reason the codec gives.
    assert stats.inbound.rejected == dict(expected_inbound)
    assert stats.inbound.protocol.rejected == dict(expected_core)
    assert stats.inbound.protocol.stale_refused == 1
    assert set(expected_inbound) == {
        "unknown-peer",
        "malformed",
        "truncated",
        "too-large",
        "unknown-kind",
        "nested-batch",
        "bad-field",
        "bad-part",
        "bad-tag",
    }
    # a's session survived the forged newer incarnations of "a".
    sessions = {s.peer: s for s in stats.inbound.protocol.sessions}
    assert sessions[A].incarnation == a.incarnation
    assert sessions[A].delivered == SENDS
    assert sessions[C].incarnation == 10
    assert stats.inbound.protocol.sessions_ended == 0


# --------------------------------------------------------------------------
# The receiving state machine under arbitrary frame sequences.

ME = NodeId("b")
ORIGINS = (A, C, EVIL)
U63 = 2**63 - 1
MAX_ENTRIES = 12

small = st.integers(0, 12)
u63s = st.one_of(small, small, st.integers(0, U63))
# Few incarnations, so that sessions restart and late frames turn up stale.
incs = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, U63)).map(Incarnation)
seqs = u63s.map(LinkSeq)
sseqs = u63s.map(StreamSeq)
streams = st.sampled_from(["s", "t", "u" * 256]).map(StreamId)
nodes = st.sampled_from([*ORIGINS, NodeId("stranger")])
payloads = st.one_of(st.none(), st.integers(-(2**64), 2**64 - 1), st.binary(max_size=8), st.text())


@st.composite
def plausible_data(draw: st.DrawFn) -> Data:
    """DATA whose numbers hang together (random ones mostly fail "bad-data")."""
    seq = draw(st.integers(1, 20))
    stream_seq = draw(st.integers(1, 12))
    return Data(
        draw(nodes),
        # Mostly one life per peer, so that sessions last and fill up.
        Incarnation(draw(st.sampled_from([1, 1, 1, 1, 2, 0]))),
        LinkSeq(seq),
        draw(streams),
        StreamSeq(stream_seq),
        StreamSeq(draw(st.integers(1, stream_seq))),
        draw(st.none() | u63s),
        draw(payloads),
        LinkSeq(draw(st.one_of(st.just(1), st.just(1), st.integers(1, seq)))),
    )


def single_frames() -> st.SearchStrategy[Frame]:
    missing_items = st.builds(MissingItem, sseqs, st.sampled_from(MissingStatus))
    statuses = st.builds(StreamStatus, streams, sseqs, u63s, u63s)
    answer_head = (nodes, incs, incs, seqs, seqs)
    return st.one_of(
        plausible_data(),
        plausible_data(),
        plausible_data(),
        st.builds(Hello, nodes, incs, u63s, st.booleans()),
        st.builds(Data, nodes, incs, seqs, streams, sseqs, sseqs, st.none() | u63s, payloads, seqs),
        st.builds(Received, *answer_head),
        st.builds(AckFrame, *answer_head, payloads),
        st.builds(ErrFrame, *answer_head, st.sampled_from(ErrCode), st.text(max_size=5)),
        st.builds(RetryLater, *answer_head, st.sampled_from(RetryReason)),
        st.builds(Req, nodes, incs, u63s, st.none() | streams, st.tuples(sseqs)),
        st.builds(
            ReqAnswer,
            nodes,
            incs,
            st.integers(1, 4),
            st.none() | streams,
            st.lists(missing_items, max_size=2).map(tuple),
            st.lists(statuses, max_size=2).map(tuple),
        ),
    )


def batches(inner: st.SearchStrategy[Frame]) -> st.SearchStrategy[Frame]:
    return st.lists(inner, max_size=5).map(tuple).map(Batch)


# Mostly single frames, some batches, a few nested batches (which the decoder
# never produces, but the core must refuse too).
frames = st.one_of(
    *[single_frames()] * 6, batches(single_frames()), batches(batches(single_frames()))
)


def claimed_by(origin: NodeId, frame: Frame) -> Frame:
    """``frame`` with every sender id set to ``origin``."""
    if isinstance(frame, Batch):
        return Batch(tuple(claimed_by(origin, f) for f in frame.frames))
    return dataclasses.replace(frame, node=origin)


# The frame's own sender id is kept (often an impersonation) one time in five.
receive_op = st.tuples(st.just("frame"), st.sampled_from(ORIGINS), frames, st.integers(0, 4))
finish_op = st.tuples(
    st.just("finish"), st.integers(0, 50), st.sampled_from(["ack", "err", "refuse"])
)
# A sender's run of consecutive DATA: fills the window and the table.
burst_op = st.tuples(
    st.just("burst"),
    st.sampled_from(ORIGINS),
    st.integers(1, 2),
    st.integers(1, 30),
    st.integers(1, 16),
    st.integers(0, 10),
)
ask_op = st.tuples(st.just("ask"), st.sampled_from(ORIGINS), st.none() | streams)
ops = st.lists(
    st.tuples(
        st.one_of(*[receive_op] * 4, burst_op, finish_op, finish_op, ask_op), st.floats(0, 0.02)
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from([0.0, 0.01]))
def test_receiver_survives_arbitrary_frames(script: list[tuple[Any, float]], delay: float) -> None:
    config = ReceiverConfig(window=8, max_entries=MAX_ENTRIES, received_delay=delay)
    receiver = LinkReceiver(ME, Incarnation(5), config=config)
    now = 0.0
    pending: list[Admitted] = []
    delivered: set[tuple[NodeId, Incarnation, int]] = set()
    for op, dt in script:
        now += dt
        if op[0] == "frame":
            frame = op[2] if op[3] == 0 else claimed_by(op[1], op[2])
            receiver.receive_frame(op[1], frame, now)
        elif op[0] == "burst":
            _, origin, inc, first, count, lag = op
            for seq in range(first, first + count):
                receiver.receive_frame(origin, _data(origin, inc, seq, seq, max(1, seq - lag)), now)
        elif op[0] == "ask":
            receiver.request(op[1], op[2], (), now)
        elif pending:
            item = pending.pop(op[1] % len(pending))
            key = (item.peer, item.peer_incarnation, item.seq)
            if op[2] == "ack":
                receiver.complete(*key, result=[1, "r"])
            elif op[2] == "err":
                receiver.fail(*key, 100, "app")
            elif receiver.refuse(*key, RetryReason.BUFFER_FULL):
                # Refused means "not held": its resend is a new delivery.
                delivered.discard(key)
        for event in receiver.take_events():
            if isinstance(event, Admitted):
                key = (event.peer, event.peer_incarnation, event.seq)
                assert key not in delivered, f"{key} delivered twice"
                delivered.add(key)
                pending.append(event)
        for peer, frame in receiver.frames_to_send(now):
            # Everything it says is well-formed, comes from b, and goes to a sender.
            assert peer in ORIGINS
            assert not isinstance(frame, Batch)
            assert frame.node == ME
            assert decode(encode(frame)) == frame
        stats = receiver.statistics()
        assert len(stats.sessions) <= len(ORIGINS)
        for session in stats.sessions:
            assert session.held + session.cached_answers <= MAX_ENTRIES
        assert receiver.next_deadline() in (None, now) or delay > 0
