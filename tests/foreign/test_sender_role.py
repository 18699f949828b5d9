"""A real node as the sender, a foreign peer (tests/foreign/peer.py, spec only) as the receiver.

The node process has one peer, ``f``, whose endpoint is the foreign ROUTER; the test tells it
to send and reads back the outcome of every send, while the foreign receiver answers as
docs/protocol.md §6 says, or as the test chooses (drop, RECEIVED, ERR, RETRY_LATER).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq
from conftest import NodeProcess, free_port
from peer import (
    ANSWERED,
    BUFFER_FULL,
    DATA_ITEMS,
    HELLO,
    NEVER_SENT,
    REQ,
    REQ_ANSWER,
    VERSION,
    WINDOW_FULL,
    Frame,
    Receiver,
)

NODE = "s"
FOREIGN = "f"

NodeFactory = Callable[[str, list[str]], NodeProcess]


def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def echo(frame: Frame) -> tuple[Any, ...]:
    return ("ack", frame.payload)


def run_send(
    node: NodeProcess,
    receiver: Receiver,
    payloads: list[Any],
    *,
    op: str = "send",
    stream: str = "t",
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Have the node send ``payloads`` to the foreign receiver, serving it until all end."""
    cmd = node.start(op, peer=FOREIGN, payloads=payloads, stream=stream, timeout=timeout)
    deadline = time.monotonic() + timeout + 5
    while time.monotonic() < deadline:
        receiver.serve(0.05)
        answer = node.poll(cmd)
        if answer is not None:
            outcomes: list[dict[str, Any]] = answer["outcomes"]
            return outcomes
    raise TimeoutError(node.describe(f"the node's {op} did not end in {timeout + 5} s"))


def first_copies(frames: list[Frame]) -> list[Frame]:
    seen: set[int] = set()
    firsts = []
    for frame in frames:
        if frame.seq not in seen:
            seen.add(frame.seq)
            firsts.append(frame)
    return firsts


def test_data_is_numbered_and_stamped_as_the_spec_says(
    zctx: zmq.Context[Any], node_factory: NodeFactory
) -> None:
    where = endpoint()
    with Receiver(zctx, FOREIGN, where, [NODE], echo) as receiver:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        payloads = ["a", "b", {"c": [1, 2]}, "d", "e"]
        outcomes = run_send(node, receiver, payloads)
        assert [o["ack"] for o in outcomes] == payloads
        sent = first_copies(receiver.data_frames())
        # §11.1: link seqs and stream seqs from 1, in send order; watermark and floor within.
        assert [f.seq for f in sent] == [1, 2, 3, 4, 5]
        assert [f.stream_seq for f in sent] == [1, 2, 3, 4, 5]
        assert {(f.node, f.incarnation, f.stream) for f in sent} == {(NODE, node.incarnation, "t")}
        for frame in receiver.data_frames():
            assert 1 <= frame.watermark <= frame.seq
            assert 1 <= frame.stream_floor <= frame.stream_seq
        assert [o["seq"] for o in outcomes] == [1, 2, 3, 4, 5]


def test_heartbeats_are_hello_requests_of_version_1(
    zctx: zmq.Context[Any], node_factory: NodeFactory
) -> None:
    where = endpoint()
    with Receiver(zctx, FOREIGN, where, [NODE], echo) as receiver:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        # §5.5: a new link with nothing to send says HELLO at once, then every 0.5 s idle.
        receiver.serve(1.5)
        hellos = [f for f in receiver.log if f.kind == HELLO]
        assert len(hellos) >= 2
        assert all(not f.reply for f in hellos)
        assert {(f.node, f.incarnation, f.version) for f in hellos} == {
            (NODE, node.incarnation, VERSION)
        }
        # Answered with the same nonce, the link is UP (§5.6).
        assert node.call("state", peer=FOREIGN)["state"] == "up"


def test_dropped_data_is_resent_with_the_same_numbers(
    zctx: zmq.Context[Any], node_factory: NodeFactory
) -> None:
    copies: Counter[int] = Counter()

    def drop_first(frame: Frame) -> tuple[Any, ...]:
        copies[frame.seq] += 1
        return ("drop",) if copies[frame.seq] == 1 else echo(frame)

    where = endpoint()
    with Receiver(zctx, FOREIGN, where, [NODE], drop_first) as receiver:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        outcomes = run_send(node, receiver, ["x", "y", "z"])
        assert [o["ack"] for o in outcomes] == ["x", "y", "z"]
        assert all(o["attempts"] >= 2 for o in outcomes)
        by_seq: dict[int, set[tuple[Any, ...]]] = {}
        for f in receiver.data_frames():
            by_seq.setdefault(f.seq, set()).add((f.stream, f.stream_seq, f.frame_no, f.payload))
        assert all(len(versions) == 1 for versions in by_seq.values()), by_seq
        assert all(copies[seq] >= 2 for seq in (1, 2, 3))


def test_received_err_and_retry_later(zctx: zmq.Context[Any], node_factory: NodeFactory) -> None:
    detail = "é" * 2048  # 4096 UTF-8 bytes, the most §3.5 allows
    retried: Counter[int] = Counter()
    held: list[int] = []

    def policy(frame: Frame) -> tuple[Any, ...]:
        kind = frame.payload
        if kind == "hold":
            held.append(frame.seq)
            return ("hold",)
        if kind == "err":
            return ("err", 417, "no thanks")
        if kind == "long err":
            return ("err", 2**63 - 1, detail)
        if kind in ("retry", "retry buffer"):
            retried[frame.seq] += 1
            if retried[frame.seq] == 1:
                return ("retry", WINDOW_FULL if kind == "retry" else BUFFER_FULL)
        return echo(frame)

    where = endpoint()
    with Receiver(zctx, FOREIGN, where, [NODE], policy) as receiver:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        cmd = node.start(
            "send",
            peer=FOREIGN,
            payloads=["hold", "err", "long err", "retry", "retry buffer"],
            stream="t",
            timeout=10,
        )
        receiver.serve(5, until=lambda: bool(held) and sum(retried.values()) >= 4)
        receiver.serve(0.3)
        # The held message is answered RECEIVED; its final answer comes later (§1).
        receiver.complete(NODE, held[0], ("ack", "done"))
        deadline = time.monotonic() + 15
        while (answer := node.poll(cmd)) is None and time.monotonic() < deadline:
            receiver.serve(0.05)
        assert answer is not None, node.describe("the sends did not end")
        outcomes = answer["outcomes"]
    assert outcomes[0]["ack"] == "done"
    assert (outcomes[1]["err"], outcomes[1]["detail"]) == (417, "no thanks")
    assert (outcomes[2]["err"], outcomes[2]["detail"]) == (2**63 - 1, detail)
    assert outcomes[3]["ack"] == "retry"
    assert outcomes[4]["ack"] == "retry buffer"
    assert outcomes[3]["attempts"] >= 2
    assert outcomes[4]["attempts"] >= 2
    # §9: a sender never resends after ERR.
    errs = [f for f in receiver.data_frames() if f.payload in ("err", "long err")]
    assert len(errs) == 2


def test_an_err_detail_of_4097_bytes_is_refused_and_the_message_resent(
    zctx: zmq.Context[Any], node_factory: NodeFactory
) -> None:
    answered: Counter[int] = Counter()

    def policy(frame: Frame) -> tuple[Any, ...]:
        answered[frame.seq] += 1
        if answered[frame.seq] == 1:
            return ("once", ("err", 100, "d" * 4097))
        return echo(frame)

    # The first ERR breaks §3.5; the foreign receiver sends it anyway and forgets it, so the
    # node's resend (the bad answer must not count) is taken as new and answered properly.
    where = endpoint()
    with Receiver(zctx, FOREIGN, where, [NODE], policy) as receiver:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        outcomes = run_send(node, receiver, ["fine"])
        link = node.stats()["statistics"]["links"][FOREIGN]
    assert outcomes[0]["ack"] == "fine"
    assert outcomes[0]["attempts"] >= 2
    refused = sum(link["protocol"]["rejected"].values()) + link["bad_frames"]
    assert refused >= 1


def test_receiver_restart_makes_the_sender_resend(
    zctx: zmq.Context[Any], node_factory: NodeFactory
) -> None:
    where = endpoint()
    first = Receiver(zctx, FOREIGN, where, [NODE], lambda f: ("hold",))
    try:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        cmd = node.start("send", peer=FOREIGN, payloads=["one", "two"], stream="t", timeout=15)
        first.serve(
            5, until=lambda: NODE in first.sessions and len(first.sessions[NODE].delivered) == 2
        )
        assert len(first.sessions[NODE].delivered) == 2
    finally:
        first.close()
    # §4.3: a greater receiver incarnation; everything unanswered is resent at once.
    with Receiver(zctx, FOREIGN, where, [NODE], echo, incarnation=first.inc + 1) as second:
        deadline = time.monotonic() + 15
        while (answer := node.poll(cmd)) is None and time.monotonic() < deadline:
            second.serve(0.05)
        assert answer is not None, node.describe("the sends did not end after the restart")
        assert [o["ack"] for o in answer["outcomes"]] == ["one", "two"]
        resent = second.data_frames()
        assert {f.seq for f in resent} == {1, 2}
        assert all(f.incarnation == node.incarnation for f in resent)
        # The new session starts at the watermark the resends carry (§4.2).
        assert min(f.watermark for f in resent) == 1


def test_a_batch_is_one_data_items_answered_by_ack_items(
    zctx: zmq.Context[Any], node_factory: NodeFactory
) -> None:
    def policy(frame: Frame) -> tuple[Any, ...]:
        assert frame.kind == DATA_ITEMS
        return ("items", [None, [417, "odd"], [0, 6]])

    where = endpoint()
    with Receiver(zctx, FOREIGN, where, [NODE], policy) as receiver:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        outcomes = run_send(node, receiver, [1, 2, 3], op="send_batch")
        sent = receiver.data_frames()
    assert {f.kind for f in sent} == {DATA_ITEMS}
    assert sent[0].items == [1, 2, 3]
    assert outcomes[0]["ack"] is None
    assert (outcomes[1]["err"], outcomes[1]["detail"]) == (417, "odd")
    assert outcomes[2]["ack"] == 6


def test_the_sender_answers_req(zctx: zmq.Context[Any], node_factory: NodeFactory) -> None:
    where = endpoint()
    with Receiver(zctx, FOREIGN, where, [NODE], echo) as receiver:
        node = node_factory(NODE, [f"{FOREIGN}={where}"])
        run_send(node, receiver, ["a", "b", "c"])
        inc = receiver.inc
        # §8: a missing query and a status query, over the same connection.
        receiver.send(NODE, [REQ, FOREIGN, inc, 7, "t", [1, 3, 4, 0]])
        receiver.send(NODE, [REQ, FOREIGN, inc, 8, None, []])
        receiver.serve(5, until=lambda: len(answers_to(receiver)) == 2)
        by_id = {f.query_id: f for f in answers_to(receiver)}
    assert by_id[7].stream == "t"
    assert by_id[7].missing == [[1, ANSWERED], [3, ANSWERED], [4, NEVER_SENT], [0, NEVER_SENT]]
    assert by_id[7].streams == []
    assert (by_id[8].stream, by_id[8].missing, by_id[8].streams) == (None, [], [["t", 3, 0, 0]])
    assert {(f.node, f.incarnation) for f in by_id.values()} == {(NODE, node.incarnation)}


def answers_to(receiver: Receiver) -> list[Frame]:
    return [f for f in receiver.log if f.kind == REQ_ANSWER]
