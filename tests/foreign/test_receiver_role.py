"""A real node as the receiver, a foreign peer (tests/foreign/peer.py, spec only) as the sender.

Every case cites the section of docs/protocol.md it checks. One node process serves the whole
module; each test talks to it as its own configured peer, with fresh incarnations, so the
tests do not share sessions. Counters are compared before and after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import pytest
import zmq
from conftest import NodeProcess
from peer import (
    ACK,
    ACK_ITEMS,
    ACK_RANGE,
    BATCH,
    BUFFER_FULL,
    COMPUTE_FAILED,
    ERR,
    HELLO,
    NEVER_SENT,
    OOB_TAG,
    RECEIVED,
    REQ,
    RETRY_LATER,
    SKIPPED,
    STALE_SESSION,
    U63_MAX,
    VERSION,
    WINDOW_FULL,
    Frame,
    Link,
    Oob,
    Sender,
    batch,
    data,
    data_items,
    encode,
    encode_with_raw,
    hello,
    new_incarnation,
    req_answer,
)

NODE = "n"
#: A node id of 255 UTF-8 bytes: the longest a ZeroMQ routing id can carry (§2.1).
LONG_ID = "x" * 255
#: The peer every §3.6 case speaks as.
TOKEN_PEER = "tokens"
PEERS = [f"p{i}" for i in range(40)] + [LONG_ID, TOKEN_PEER]
_free_peers = iter(PEERS[:40])
#: A whole rejected message gets no answer (§3.6); this long a silence is taken as none.
QUIET = 0.3


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(NODE, PEERS, tmp_path_factory.mktemp("receiver"))
    yield proc
    alive = proc.alive()
    proc.stop()
    assert alive, proc.describe("the node died during the module")


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def peer_id() -> str:
    """A configured peer id no other test of this module uses."""
    return next(_free_peers)


@pytest.fixture
def link(ctx: zmq.Context[Any], node: NodeProcess, peer_id: str) -> Iterator[Link]:
    with Link(ctx, peer_id, node.endpoint) as conn:
        yield conn


def limits(node: NodeProcess) -> dict[str, int]:
    found: dict[str, int] = node.stats()["limits"]
    return found


def wait_counted(
    node: NodeProcess, before: dict[str, int], reason: str, n: int = 1, timeout: float = 5.0
) -> int:
    """How many more refusals ``reason`` has than in ``before``, once it reached ``n``."""
    deadline = time.monotonic() + timeout
    while True:
        delta = node.rejected().get(reason, 0) - before.get(reason, 0)
        if delta >= n or time.monotonic() >= deadline:
            return delta
        time.sleep(0.02)


def answers(frames: list[Frame], kind: int | None = None) -> list[Frame]:
    return [f for f in frames if kind is None or f.kind == kind]


def nested(depth: int) -> Any:
    """A payload ``depth`` containers deep (§3.4: a scalar has depth 0, [1] depth 1)."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------------------------------------
# Normal operation (§1, §6, §10)


def test_normal_exchange_acks_with_the_result(
    ctx: zmq.Context[Any], node: NodeProcess, peer_id: str
) -> None:
    with Sender(ctx, peer_id, node.endpoint) as sender:
        sender.submit(b"\x78", stream="halo")
        sender.submit({"op": "none"}, stream="halo")
        sender.submit({"op": "none"}, stream="halo")
        sender.submit({"op": "sleep", "s": 0.1}, stream="halo")
        done = sender.run(10)
        assert done[1].kind == ACK
        assert done[1].result == b"\x78"
        assert done[1].node == NODE
        assert done[1].incarnation == node.incarnation
        assert done[1].peer_incarnation == sender.inc
        assert done[1].credit >= 256
        # §6.3: ACKs without a result may come as one ACK_RANGE.
        assert {done[2].kind, done[3].kind} <= {ACK, ACK_RANGE}
        # §6.3: a compute step slower than received_delay is RECEIVED first, then ACK.
        assert done[4].kind == ACK
        assert done[4].result == "slept"
        held = [f for f in sender.frames_seen if f.kind == RECEIVED and f.seq == 4]
        assert held
        credits = [f.credit for f in sender.frames_seen if f.kind != HELLO]
        assert credits == sorted(credits), "§6.4: credit never decreases within a session"
    got = node.deliveries(peer_id)
    assert [d["stream_seq"] for d in got] == [1, 2, 3, 4]
    assert [d["stream"] for d in got] == ["halo"] * 4


def test_resend_gets_the_same_answer_and_no_second_delivery(
    link: Link, node: NodeProcess, peer_id: str
) -> None:
    inc = new_incarnation()
    first = data(peer_id, inc, 1, "once")
    link.send(first)
    ack = link.expect(lambda f: f.kind == ACK and f.seq == 1)
    link.send(first)
    again = link.expect(lambda f: f.kind == ACK and f.seq == 1)
    assert again.result == ack.result == "once"
    assert again.peer_incarnation == inc
    # §6.2 step 5 while processing: RECEIVED again, then the one final answer.
    slow = data(peer_id, inc, 2, {"op": "sleep", "s": 0.4}, watermark=1)
    link.send(slow)
    link.expect(lambda f: f.kind == RECEIVED and f.seq == 2)
    link.send(slow)
    link.expect(lambda f: f.kind == RECEIVED and f.seq == 2)
    link.expect(lambda f: f.kind == ACK and f.seq == 2)
    link.send(slow)
    assert link.expect(lambda f: f.kind == ACK and f.seq == 2).result == "slept"
    assert [d["payload"] for d in node.deliveries(peer_id)] == [
        "once",
        {"op": "sleep", "s": 0.4},
    ]


def test_out_of_order_stream_seqs_are_released_in_order(
    link: Link, node: NodeProcess, peer_id: str
) -> None:
    inc = new_incarnation()
    # Watermark 1 on both: a watermark of 2 would tell the node that seq 1 has its outcome
    # already (§6.2 step 3), and its answer would rightly never come.
    link.send(data(peer_id, inc, 1, "second", stream="s", stream_seq=2, stream_floor=1))
    link.send(data(peer_id, inc, 2, "first", stream="s", stream_seq=1, stream_floor=1, watermark=1))
    link.expect(lambda f: f.kind in (ACK, ACK_RANGE) and f.raw[4] == 1)
    link.expect(lambda f: f.kind in (ACK, ACK_RANGE) and f.raw[4] in (1, 2))
    got = node.deliveries(peer_id)
    assert [(d["stream_seq"], d["payload"]) for d in got] == [(1, "first"), (2, "second")]


def test_beyond_the_window_is_retry_later_and_not_delivered(
    link: Link, node: NodeProcess, peer_id: str
) -> None:
    inc = new_incarnation()
    # §6.2 step 6: a new session has floor = watermark = 1, so seq 257 >= floor + window.
    link.send(data(peer_id, inc, 257, "too far", stream_seq=1, watermark=1))
    retry = link.expect(lambda f: f.kind == RETRY_LATER)
    assert (retry.seq, retry.reason, retry.credit) == (257, WINDOW_FULL, 256)
    link.send(data(peer_id, inc, 256, "in window", stream_seq=1, watermark=1))
    assert link.expect(lambda f: f.kind == ACK and f.seq == 256).credit == 256
    assert [d["payload"] for d in node.deliveries(peer_id)] == ["in window"]


def test_err_codes(link: Link, node: NodeProcess, peer_id: str) -> None:
    inc = new_incarnation()
    detail = "é" * 2048  # 4096 UTF-8 bytes: the most §9 allows
    sends = [
        {"op": "reject", "code": 100, "detail": "lowest application code"},
        {"op": "reject", "code": U63_MAX, "detail": detail},
        {"op": "crash"},
    ]
    for seq, payload in enumerate(sends, start=1):
        link.send(data(peer_id, inc, seq, payload, stream_floor=1, watermark=1))
    errs = {f.seq: f for f in (link.expect(lambda f: f.kind == ERR) for _ in sends)}
    assert (errs[1].code, errs[1].detail) == (100, "lowest application code")
    assert (errs[2].code, errs[2].detail) == (U63_MAX, detail)
    assert errs[3].code == COMPUTE_FAILED
    assert errs[3].detail.startswith("RuntimeError")
    assert errs[3].credit >= errs[1].credit
    # §7.2: a stream-level duplicate (stream seq 1 again, new link seq) is ERR SKIPPED.
    link.send(data(peer_id, inc, 4, "again", stream_seq=1, stream_floor=1, watermark=1))
    dup = link.expect(lambda f: f.kind == ERR and f.seq == 4)
    assert (dup.code, dup.detail) == (SKIPPED, "DUPLICATE")
    # §7.2 row 3: the floor passes 4..5; a late 4 is STALE.
    link.send(data(peer_id, inc, 5, "six", stream_seq=6, stream_floor=6, watermark=1))
    link.expect(lambda f: f.kind in (ACK, ACK_RANGE) and f.raw[4] <= 5 <= f.raw[-2])
    link.send(data(peer_id, inc, 6, "late", stream_seq=4, stream_floor=4, watermark=1))
    stale = link.expect(lambda f: f.kind == ERR and f.seq == 6)
    assert (stale.code, stale.detail) == (SKIPPED, "STALE")
    delivered = [d for d in node.deliveries(peer_id) if "payload" in d]
    assert [d["stream_seq"] for d in delivered] == [1, 2, 3, 6]


def test_stale_incarnation_gets_stale_session(link: Link, node: NodeProcess, peer_id: str) -> None:
    old = new_incarnation()
    new = old + 1
    link.send(data(peer_id, old, 1, "old"))
    link.expect(lambda f: f.kind == ACK and f.peer_incarnation == old)
    link.send(data(peer_id, new, 1, "new"))
    link.expect(lambda f: f.kind == ACK and f.peer_incarnation == new)
    link.send(data(peer_id, old, 2, "late", stream_floor=1, watermark=1))
    err = link.expect(lambda f: f.kind == ERR and f.peer_incarnation == old)
    assert (err.code, err.seq, err.credit) == (STALE_SESSION, 2, 0)
    assert err.detail == f"incarnation {old} of {peer_id} was replaced by {new}"
    # §4.2: a HELLO of a newer incarnation ends the session; the replaced one is stale.
    newest = new + 1
    link.ping(newest, 5)
    link.send(data(peer_id, new, 2, "after hello", stream_floor=1, watermark=1))
    err = link.expect(lambda f: f.kind == ERR and f.peer_incarnation == new)
    assert err.code == STALE_SESSION
    assert [d["payload"] for d in node.deliveries(peer_id)] == ["old", "new"]


def test_sender_restart_starts_a_new_session(link: Link, node: NodeProcess, peer_id: str) -> None:
    old = new_incarnation()
    link.send(data(peer_id, old, 1, {"op": "sleep", "s": 0.3}))
    link.expect(lambda f: f.kind == RECEIVED and f.peer_incarnation == old)
    new = old + 50
    link.send(data(peer_id, new, 1, "new"))
    ack = link.expect(lambda f: f.kind == ACK and f.peer_incarnation == new)
    assert ack.result == "new"
    # §10.4: the old session's completion is ignored: no final answer for it ever comes.
    late = link.read(0.6)
    assert not [f for f in late if f.kind in (ACK, ERR) and f.peer_incarnation == old]


def test_data_items_get_ack_items(link: Link, node: NodeProcess, peer_id: str) -> None:
    inc = new_incarnation()
    items = [b"\x01", {"op": "reject", "code": 417, "detail": "odd"}, 6]
    link.send(data_items(peer_id, inc, 1, items))
    answer = link.expect(lambda f: f.kind == ACK_ITEMS)
    assert answer.outcomes == [[0, b"\x01"], [417, "odd"], [0, 6]]
    link.send(data_items(peer_id, inc, 1, items))
    assert link.expect(lambda f: f.kind == ACK_ITEMS).outcomes == answer.outcomes
    # Every item processed without a result: a plain ACK (§6.3).
    link.send(data_items(peer_id, inc, 2, [{"op": "none"}] * 3, watermark=1))
    plain = link.expect(lambda f: f.kind in (ACK, ACK_RANGE) and f.raw[4] == 2)
    assert plain.kind == ACK_RANGE or plain.result is None
    got = node.deliveries(peer_id)
    assert [(d["stream_seq"], d["item"]) for d in got] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
        (2, 1),
        (2, 2),
    ]


def test_hello_reply_echoes_the_nonce_and_carries_the_version(
    link: Link, node: NodeProcess, peer_id: str
) -> None:
    inc = new_incarnation()
    for nonce in (0, 1, U63_MAX):
        reply = link.ping(inc, nonce)
        assert reply.raw[:5] == [HELLO, NODE, node.incarnation, nonce, True]
        assert reply.version == VERSION


def test_req_is_answered_with_never_sent_and_the_gap_is_reported(
    ctx: zmq.Context[Any], node: NodeProcess, peer_id: str
) -> None:
    with Link(ctx, peer_id, node.endpoint) as link:
        inc = new_incarnation()
        link.send(data(peer_id, inc, 1, "two", stream="g", stream_seq=2, stream_floor=1))
        # §7.3: gap_timeout (0.5 s) after the head gap, the node asks about stream seq 1.
        req = link.expect(lambda f: f.kind == REQ, timeout=3)
        assert (req.node, req.incarnation, req.stream, req.missing) == (
            NODE,
            node.incarnation,
            "g",
            [1],
        )
        link.send(req_answer(peer_id, inc, req.query_id, "g", [[1, NEVER_SENT]]))
        link.expect(lambda f: f.kind == ACK and f.seq == 1)
        before = node.rejected()
        # §6.6: an answer to a query already answered is unknown-query.
        link.send(req_answer(peer_id, inc, req.query_id, "g", [[1, NEVER_SENT]]))
        link.probe()
        assert wait_counted(node, before, "unknown-query") == 1
    got = node.deliveries(peer_id)
    assert got[0]["gap"]["reason"] == "never-sent"
    assert (got[0]["gap"]["first"], got[0]["gap"]["last"]) == (1, 1)
    assert got[1]["payload"] == "two"


# ---------------------------------------------------------------------------------------------
# §3.6: every reason token, provoked, counted, unanswered; the node still answers afterwards.

Build = Callable[[str, int], list[bytes]]


def frame_parts(build: Callable[[str, int], Any]) -> Build:
    return lambda p, i: encode(build(p, i))


def raw_payload(raw: bytes) -> Build:
    return lambda p, i: encode_with_raw(data(p, i, 1, None), 8, raw)


BAD: list[tuple[str, str, Build]] = [
    # too-large (§3.5 limits, one over each)
    ("too-large", "node id of 257 bytes", frame_parts(lambda p, i: data("x" * 257, i, 1, 0))),
    (
        "too-large",
        "stream id of 257 bytes",
        frame_parts(lambda p, i: data(p, i, 1, 0, stream="s" * 257)),
    ),
    (
        "too-large",
        "ERR detail of 4097 bytes",
        frame_parts(lambda p, i: [ERR, p, i, i, 1, 1, 100, "d" * 4097]),
    ),
    (
        "too-large",
        "batch of 4097 frames",
        frame_parts(lambda p, i: batch([[RECEIVED, p, i, i, k, k] for k in range(1, 4098)])),
    ),
    (
        "too-large",
        "DATA_ITEMS of 4097 items",
        frame_parts(lambda p, i: data_items(p, i, 1, [0] * 4097)),
    ),
    (
        "too-large",
        "missing list of 4097",
        frame_parts(lambda p, i: req_answer(p, i, 1, "s", [[k, 4] for k in range(1, 4098)])),
    ),
    (
        "too-large",
        "streams list of 4097",
        frame_parts(lambda p, i: req_answer(p, i, 1, None, [], [["s", 0, 0, 0]] * 4097)),
    ),
    (
        "too-large",
        "4098 parts",
        frame_parts(lambda p, i: data(p, i, 1, [Oob(b"x")] * 4097)),
    ),
    # truncated
    ("truncated", "empty header", lambda p, i: [b""]),
    ("truncated", "array ends early", lambda p, i: [encode(data(p, i, 1, 0))[0][:-1]]),
    # too-deep
    ("too-deep", "payload 33 deep", frame_parts(lambda p, i: data(p, i, 1, nested(33)))),
    (
        "too-deep",
        "item 33 deep",
        frame_parts(lambda p, i: data_items(p, i, 1, [0, nested(33)])),
    ),
    # malformed
    ("malformed", "a lone break byte", lambda p, i: [b"\xff"]),
    ("malformed", "indefinite-length array", lambda p, i: [b"\x9f\x01\xff"]),
    ("malformed", "indefinite-length payload", raw_payload(b"\x5f\x41\x00\xff")),
    ("malformed", "duplicate map keys", raw_payload(b"\xa2\x61a\x01\x61a\x02")),
    ("malformed", "invalid UTF-8", raw_payload(b"\x62\xff\xfe")),
    (
        "malformed",
        "bytes after the item",
        lambda p, i: [encode(data(p, i, 1, 0))[0] + b"\x00"],
    ),
    # bad-tag
    ("bad-tag", "date tag in a payload", raw_payload(b"\xc1\x00")),
    ("bad-tag", "bignum payload", frame_parts(lambda p, i: data(p, i, 1, 2**64))),
    (
        "bad-tag",
        "self-described CBOR",
        lambda p, i: [b"\xd9\xd9\xf7" + encode(data(p, i, 1, 0))[0]],
    ),
    # bad-part (§3.4)
    (
        "bad-part",
        "reference out of range",
        lambda p, i: [cbor2.dumps(data(p, i, 1, cbor2.CBORTag(OOB_TAG, 1)))],
    ),
    (
        "bad-part",
        "references out of order",
        lambda p, i: [
            cbor2.dumps(data(p, i, 1, [cbor2.CBORTag(OOB_TAG, 2), cbor2.CBORTag(OOB_TAG, 1)])),
            b"a",
            b"b",
        ],
    ),
    (
        "bad-part",
        "a repeated reference",
        lambda p, i: [
            cbor2.dumps(data(p, i, 1, [cbor2.CBORTag(OOB_TAG, 1), cbor2.CBORTag(OOB_TAG, 1)])),
            b"a",
        ],
    ),
    (
        "bad-part",
        "reference 0 (the header)",
        lambda p, i: [cbor2.dumps(data(p, i, 1, cbor2.CBORTag(OOB_TAG, 0)))],
    ),
    (
        "bad-part",
        "an unreferenced part",
        lambda p, i: [*encode(data(p, i, 1, "x")), b"dangling"],
    ),
    # unknown-kind
    ("unknown-kind", "kind 13", frame_parts(lambda p, i: [13, p, i])),
    ("unknown-kind", "kind 0", frame_parts(lambda p, i: [0, p, i])),
    ("unknown-kind", "kind as text", frame_parts(lambda p, i: ["hello", p, i, 1, False, 1])),
    ("unknown-kind", "kind as bool", frame_parts(lambda p, i: [True, p, i, 1, False, 1])),
    (
        "unknown-kind",
        "unknown kind inside a batch",
        frame_parts(lambda p, i: batch([data(p, i, 1, 0), [99]])),
    ),
    # nested-batch
    (
        "nested-batch",
        "batch in a batch",
        frame_parts(lambda p, i: batch([data(p, i, 1, 0), batch([data(p, i, 2, 0)])])),
    ),
    # bad-field
    ("bad-field", "HELLO of 4 fields", frame_parts(lambda p, i: hello(p, i, 1, False)[:4])),
    (
        "bad-field",
        "HELLO with a field too many",
        frame_parts(lambda p, i: [*hello(p, i, 1, False), 0]),
    ),
    ("bad-field", "bool as nonce", frame_parts(lambda p, i: hello(p, i, True, False))),
    ("bad-field", "nonce 2**63", frame_parts(lambda p, i: hello(p, i, 2**63, False))),
    ("bad-field", "nonce -1", frame_parts(lambda p, i: hello(p, i, -1, False))),
    ("bad-field", "float incarnation", frame_parts(lambda p, i: hello(p, 1.0, 1, False))),
    ("bad-field", "reply as int", frame_parts(lambda p, i: hello(p, i, 1, 0))),
    ("bad-field", "empty node id", frame_parts(lambda p, i: hello("", i, 1, False))),
    ("bad-field", "node id as bytes", frame_parts(lambda p, i: hello(p.encode(), i, 1, False))),
    ("bad-field", "seq 2**63", frame_parts(lambda p, i: data(p, i, 2**63, 0, stream_seq=1))),
    ("bad-field", "seq -1", frame_parts(lambda p, i: data(p, i, -1, 0, stream_seq=1, watermark=1))),
    ("bad-field", "empty stream id", frame_parts(lambda p, i: data(p, i, 1, 0, stream=""))),
    ("bad-field", "frame_no 2**63", frame_parts(lambda p, i: data(p, i, 1, 0, frame_no=2**63))),
    ("bad-field", "frame_no -1", frame_parts(lambda p, i: data(p, i, 1, 0, frame_no=-1))),
    ("bad-field", "empty batch", frame_parts(lambda p, i: [BATCH, []])),
    ("bad-field", "empty items", frame_parts(lambda p, i: data_items(p, i, 1, []))),
    ("bad-field", "undefined in a payload", raw_payload(b"\xf7")),
    ("bad-field", "simple value 16 in a payload", raw_payload(b"\xf0")),
    ("bad-field", "integer map key in a payload", frame_parts(lambda p, i: data(p, i, 1, {1: 2}))),
    ("bad-field", "ERR code 0", frame_parts(lambda p, i: [ERR, p, i, i, 1, 1, 0, ""])),
    ("bad-field", "ERR code 7", frame_parts(lambda p, i: [ERR, p, i, i, 1, 1, 7, ""])),
    ("bad-field", "ERR code 99", frame_parts(lambda p, i: [ERR, p, i, i, 1, 1, 99, ""])),
    ("bad-field", "ERR code -1", frame_parts(lambda p, i: [ERR, p, i, i, 1, 1, -1, ""])),
    (
        "bad-field",
        "[0, null] outcome",
        frame_parts(lambda p, i: [ACK_ITEMS, p, i, i, 1, 1, [[0, None]]]),
    ),
    ("bad-field", "empty outcomes", frame_parts(lambda p, i: [ACK_ITEMS, p, i, i, 1, 1, []])),
    (
        "bad-field",
        "ACK_RANGE first > last",
        frame_parts(lambda p, i: [ACK_RANGE, p, i, i, 2, 1, 9]),
    ),
    (
        "bad-field",
        "RETRY_LATER reason 3",
        frame_parts(lambda p, i: [RETRY_LATER, p, i, i, 1, 1, 3]),
    ),
    (
        "bad-field",
        "missing without stream",
        frame_parts(lambda p, i: req_answer(p, i, 1, None, [[1, NEVER_SENT]])),
    ),
    (
        "bad-field",
        "missing status 6",
        frame_parts(lambda p, i: req_answer(p, i, 1, "s", [[1, 6]])),
    ),
    (
        "bad-field",
        "REQ missing without stream",
        frame_parts(lambda p, i: [REQ, p, i, 1, None, [1]]),
    ),
    # Not a frame at all. §3.6 leaves it open between unknown-kind ("first element is not an
    # integer kind") and bad-field ("wrong type"); the node says bad-field.
    ("bad-field", "a map as the message", lambda p, i: [cbor2.dumps({"kind": 1})]),
    ("bad-field", "an integer as the message", lambda p, i: [cbor2.dumps(5)]),
    ("bad-field", "an empty array as the message", lambda p, i: [cbor2.dumps([])]),
    # impersonation (§4.4)
    ("impersonation", "HELLO naming p39", frame_parts(lambda p, i: hello("p39", i, 1, False))),
    ("impersonation", "DATA naming p39", frame_parts(lambda p, i: data("p39", i, 1, 0))),
    (
        "impersonation",
        "node id of 256 bytes",
        frame_parts(lambda p, i: data(p + "y" * (256 - len(p)), i, 1, 0)),
    ),
    # bad-data (§6.2 step 1)
    ("bad-data", "watermark 0", frame_parts(lambda p, i: data(p, i, 1, 0, watermark=0))),
    ("bad-data", "watermark above seq", frame_parts(lambda p, i: data(p, i, 1, 0, watermark=2))),
    ("bad-data", "stream_floor 0", frame_parts(lambda p, i: data(p, i, 1, 0, stream_floor=0))),
    (
        "bad-data",
        "stream_floor above stream_seq",
        frame_parts(lambda p, i: data(p, i, 1, 0, stream_seq=1, stream_floor=2)),
    ),
    ("bad-data", "seq 0", frame_parts(lambda p, i: data(p, i, 0, 0, stream_seq=1, watermark=0))),
    (
        "bad-data",
        "DATA_ITEMS watermark 0",
        frame_parts(lambda p, i: data_items(p, i, 1, [0], watermark=0)),
    ),
    # unknown-query (§6.6)
    (
        "unknown-query",
        "a query never sent",
        frame_parts(lambda p, i: req_answer(p, i, 987654321, None, [], [])),
    ),
    # unexpected-frame (§1): frames of the other direction
    (
        "unexpected-frame",
        "RECEIVED",
        frame_parts(lambda p, i: [RECEIVED, p, i, i, 1, 1]),
    ),
    ("unexpected-frame", "ACK", frame_parts(lambda p, i: [ACK, p, i, i, 1, 1, None])),
    ("unexpected-frame", "ACK_RANGE", frame_parts(lambda p, i: [ACK_RANGE, p, i, i, 1, 2, 9])),
    ("unexpected-frame", "ACK_ITEMS", frame_parts(lambda p, i: [ACK_ITEMS, p, i, i, 1, 1, [None]])),
    ("unexpected-frame", "ERR", frame_parts(lambda p, i: [ERR, p, i, i, 1, 1, 100, "no"])),
    (
        "unexpected-frame",
        "ERR with a detail of 4096 bytes",
        frame_parts(lambda p, i: [ERR, p, i, i, 1, 1, 100, "d" * 4096]),
    ),
    (
        "unexpected-frame",
        "RETRY_LATER",
        frame_parts(lambda p, i: [RETRY_LATER, p, i, i, 1, 1, BUFFER_FULL]),
    ),
    ("unexpected-frame", "REQ", frame_parts(lambda p, i: [REQ, p, i, 1, "s", [1]])),
    ("unexpected-frame", "HELLO reply", frame_parts(lambda p, i: hello(p, i, 1, True))),
]


@pytest.fixture(scope="module")
def token_link(ctx: zmq.Context[Any], node: NodeProcess) -> Iterator[Link]:
    """One peer for all reason-token cases: none of them may open a session that holds."""
    with Link(ctx, TOKEN_PEER, node.endpoint) as conn:
        yield conn


@pytest.mark.parametrize(
    ("reason", "build"),
    [pytest.param(reason, build, id=f"{reason}: {what}") for reason, what, build in BAD],
)
def test_reason_token_is_counted_and_unanswered(
    token_link: Link, node: NodeProcess, reason: str, build: Build
) -> None:
    before = node.rejected()
    token_link.send_parts(build(TOKEN_PEER, new_incarnation()))
    # Frames of one connection are taken in order: once the probe is answered, the bad
    # message has been handled, and it must have had no answer (§3.6).
    token_link.probe(timeout=15)
    unanswered = token_link.read(0.05)
    assert not unanswered, f"a rejected message was answered: {unanswered}"
    assert wait_counted(node, before, reason) == 1
    assert node.deliveries(TOKEN_PEER) == []


def test_unknown_peer_is_dropped_unanswered(ctx: zmq.Context[Any], node: NodeProcess) -> None:
    before = node.rejected()
    with Link(ctx, "stranger", node.endpoint) as stranger:
        stranger.send(hello("stranger", new_incarnation(), 1, False))
        stranger.send(data("stranger", new_incarnation(), 1, "who am I"))
        assert wait_counted(node, before, "unknown-peer", n=2) == 2
        assert stranger.read(QUIET) == []
    assert node.deliveries("stranger") == []


def test_bad_version_gets_a_reply_of_version_1(link: Link, node: NodeProcess, peer_id: str) -> None:
    inc = new_incarnation()
    for n, version in enumerate((0, 2, U63_MAX), start=1):
        before = node.rejected()
        link.send(hello(peer_id, inc, 7000 + n, False, version=version))
        reply = link.expect(lambda f, n=n: f.kind == HELLO and f.nonce == 7000 + n)
        assert reply.reply is True
        assert reply.version == VERSION
        assert wait_counted(node, before, "bad-version") == 1


def test_a_frame_refused_in_a_batch_leaves_the_others(
    link: Link, node: NodeProcess, peer_id: str
) -> None:
    """§3.6: protocol-level reasons count per frame; the rest of the batch is processed."""
    inc = new_incarnation()
    before = node.rejected()
    link.send(
        batch(
            [
                data("p39", inc, 1, "not p39"),
                [ACK, peer_id, inc, inc, 1, 1, None],
                data(peer_id, inc, 1, "kept"),
                data(peer_id, inc, 2, 0, watermark=3),
                data(peer_id, inc, 2, "kept too", watermark=1),
            ]
        )
    )
    assert link.expect(lambda f: f.kind == ACK and f.seq == 1).result == "kept"
    assert link.expect(lambda f: f.kind == ACK and f.seq == 2).result == "kept too"
    assert wait_counted(node, before, "impersonation") == 1
    assert wait_counted(node, before, "unexpected-frame") == 1
    assert wait_counted(node, before, "bad-data") == 1
    assert [d["payload"] for d in node.deliveries(peer_id)] == ["kept", "kept too"]


# ---------------------------------------------------------------------------------------------
# Every field at its limits (§3.2, §3.5): accepted exactly where the spec says.


def test_u63_fields_at_zero_one_and_max(link: Link, node: NodeProcess, peer_id: str) -> None:
    # Incarnation 0 is a valid u63; a larger one then starts a new session (§4.2).
    for inc in (0, 1):
        link.send(data(peer_id, inc, 1, f"inc {inc}", frame_no=0))
        assert link.expect(lambda f, inc=inc: f.kind == ACK and f.peer_incarnation == inc)
    top = U63_MAX
    link.send(data(peer_id, top, 1, "top", frame_no=U63_MAX))
    assert link.expect(lambda f: f.kind == ACK and f.peer_incarnation == top).result == "top"
    got = node.deliveries(peer_id)
    assert [(d["payload"], d["frame_no"]) for d in got] == [
        ("inc 0", 0),
        ("inc 1", 0),
        ("top", U63_MAX),
    ]


def test_seq_and_watermark_at_the_top_get_a_final_answer(
    ctx: zmq.Context[Any], node: NodeProcess, peer_id: str
) -> None:
    """Issue 14 item 1: seq = watermark = 2**63-1 is valid and answered with credit 2**63-1."""
    with Link(ctx, peer_id, node.endpoint) as link:
        inc = new_incarnation()
        frame = data(peer_id, inc, U63_MAX, "top", stream_seq=U63_MAX)
        link.send(frame)
        ack = link.expect(lambda f: f.kind == ACK and f.seq == U63_MAX, timeout=3)
        assert (ack.result, ack.credit) == ("top", U63_MAX)
        link.send(frame)
        assert link.expect(lambda f: f.kind == ACK and f.seq == U63_MAX).credit == U63_MAX
        link.probe()
    assert [d["stream_seq"] for d in node.deliveries(peer_id)] == [U63_MAX]


def test_payload_integers_span_the_cbor_range(link: Link, peer_id: str) -> None:
    inc = new_incarnation()
    values = [0, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**64), 1.5, float("inf"), None, True]
    link.send(data(peer_id, inc, 1, values))
    assert link.expect(lambda f: f.kind == ACK).result == values


def test_ids_of_255_and_256_bytes(ctx: zmq.Context[Any], node: NodeProcess, peer_id: str) -> None:
    with Link(ctx, LONG_ID, node.endpoint) as link:
        inc = new_incarnation()
        link.send(data(LONG_ID, inc, 1, "long id", stream="s" * 255))
        assert link.expect(lambda f: f.kind == ACK).result == "long id"
    with Link(ctx, peer_id, node.endpoint) as link:
        inc = new_incarnation()
        stream = "é" * 128  # 256 UTF-8 bytes
        link.send(data(peer_id, inc, 1, "long stream", stream=stream))
        assert link.expect(lambda f: f.kind == ACK).result == "long stream"
    assert node.deliveries(LONG_ID)[0]["stream"] == "s" * 255
    assert node.deliveries(peer_id)[0]["stream"] == stream


def test_payload_of_depth_32_is_accepted(link: Link, node: NodeProcess, peer_id: str) -> None:
    inc = new_incarnation()
    deep_map: Any = 0
    for _ in range(32):
        deep_map = {"k": deep_map}
    link.send(data(peer_id, inc, 1, nested(32)))
    assert link.expect(lambda f: f.kind == ACK and f.seq == 1).result == nested(32)
    link.send(data_items(peer_id, inc, 2, [nested(32), deep_map], watermark=1))
    answer = link.expect(lambda f: f.kind == ACK_ITEMS)
    assert answer.outcomes == [[0, nested(32)], [0, deep_map]]


def test_data_items_of_4096(link: Link, node: NodeProcess, peer_id: str) -> None:
    inc = new_incarnation()
    link.send(data_items(peer_id, inc, 1, [{"op": "none"}] * 4096))
    answer = link.expect(lambda f: f.kind in (ACK, ACK_RANGE, ACK_ITEMS), timeout=15)
    assert answer.kind in (ACK, ACK_RANGE), "every item answered without a result: ACK (§6.3)"
    assert len(node.deliveries(peer_id)) == 4096


def test_batch_of_4096_frames(link: Link, node: NodeProcess, peer_id: str) -> None:
    # The largest batch (§3.3) must also fit max_header_bytes (§3.5): HELLOs of a peer the
    # node has not heard yet, with incarnation 1, take 12 bytes each.
    message = batch([hello(peer_id, 1, k, False) for k in range(4096)])
    assert len(encode(message)[0]) <= limits(node)["max_header_bytes"]
    link.send(message)
    nonces: set[int] = set()
    deadline = time.monotonic() + 15
    while len(nonces) < 4096 and time.monotonic() < deadline:
        nonces |= {f.nonce for f in link.read(0.1) if f.kind == HELLO}
    assert nonces == set(range(4096))


def test_4096_out_of_band_parts(link: Link, peer_id: str) -> None:
    inc = new_incarnation()
    payload = [Oob(k.to_bytes(2, "big")) for k in range(4096)]
    link.send(data(peer_id, inc, 1, payload))
    answer = link.expect(lambda f: f.kind == ACK, timeout=15)
    assert answer.result == [k.to_bytes(2, "big") for k in range(4096)]


def test_header_at_and_over_the_limit(link: Link, node: NodeProcess, peer_id: str) -> None:
    """§3.5: a header of exactly max_header_bytes is taken, one byte more is too-large."""
    limit = limits(node)["max_header_bytes"]
    inc = new_incarnation()

    def padded(seq: int, size: int) -> list[bytes]:
        frame = data(peer_id, inc, seq, {"op": "none", "pad": b""}, watermark=1)
        base = len(encode(frame)[0])
        pad = size - base
        # A byte string's own length head grows with its length: settle it in two steps.
        for _ in range(2):
            grown = len(encode(replace_pad(frame, b"\0" * pad))[0])
            pad -= grown - size
        parts = encode(replace_pad(frame, b"\0" * pad))
        assert len(parts[0]) == size
        return parts

    link.send_parts(padded(1, limit))
    link.expect(lambda f: f.kind in (ACK, ACK_RANGE) and f.raw[4] == 1, timeout=15)
    before = node.rejected()
    link.send_parts(padded(2, limit + 1))
    link.probe(timeout=15)
    assert wait_counted(node, before, "too-large") == 1
    assert len(node.deliveries(peer_id)) == 1


def replace_pad(frame: list[Any], pad: bytes) -> list[Any]:
    return [*frame[:8], {"op": "none", "pad": pad}, *frame[9:]]


def test_message_over_the_limit_in_parts(link: Link, node: NodeProcess, peer_id: str) -> None:
    """§3.5: all parts together over max_message_bytes are too-large (each part is not)."""
    total = limits(node)["max_message_bytes"]
    inc = new_incarnation()
    half = b"\0" * (total // 2 + 1)
    before = node.rejected()
    link.send(data(peer_id, inc, 1, [Oob(half), Oob(half)]))
    link.probe(timeout=15)
    assert wait_counted(node, before, "too-large") == 1
    assert node.deliveries(peer_id) == []


def test_tag_52753_outside_a_payload_is_refused(
    link: Link, node: NodeProcess, peer_id: str
) -> None:
    """§3.4 allows the tag only where a payload may be; §3.6 names no token for it."""
    inc = new_incarnation()
    before = node.rejected()
    tagged = data(peer_id, inc, 1, 0, frame_no=cbor2.CBORTag(OOB_TAG, 1))  # type: ignore[arg-type]
    link.send_parts([cbor2.dumps(tagged), b"x"])
    link.probe()
    deadline = time.monotonic() + 5
    while (after := node.rejected()) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    grown = {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}
    assert sum(grown.values()) == 1, grown
    assert set(grown) <= {"bad-tag", "bad-part", "bad-field"}
    assert link.read(0.05) == []
