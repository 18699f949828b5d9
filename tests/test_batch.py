"""Batch sends: N items as one protocol message, each with its own outcome.

In-memory nodes under virtual time for the semantics (order, per-item
outcomes, crashes, dedup under faults, deadlines, limits), and one pair of
real nodes on tcp 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import zmq

from actors import (
    Ack,
    Actor,
    ActorStopped,
    BatchHandle,
    ChildSpec,
    Delivery,
    DeliveryFailed,
    Gap,
    NodeConfig,
    PeerError,
    Reject,
    open_node,
    open_supervisor,
)
from actors.testing import (
    Inbox,
    open_test_network,
)
from transport import (
    ErrCode,
    Incarnation,
    Limits,
    LinkReceiver,
    LinkSender,
    LinkSeq,
    LocalProtocolError,
    NodeId,
    ReceiverConfig,
    StreamId,
    decode,
    encode,
    router_socket,
)
from transport.events import (
    Admitted,
    Answered,
)
from transport.frames import (
    AckFrame,
    AckItems,
    Batch,
    Data,
    DataItems,
    ItemAck,
    ItemErr,
)
from transport.testing import (
    FaultPlan,
)


class Worker(Actor[Any, Any]):
    """Answers each item with ``payload * 2``; Reject for "bad"; crashes on "boom";
    returns what the codec cannot carry for "odd"."""

    def __init__(self, seen: list[tuple[int, int, int, Any]], starts: list[int]) -> None:
        self.seen = seen
        starts.append(len(starts))

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Gap):
            raise AssertionError(f"no gap expected: {msg}")
        assert isinstance(msg, Delivery)
        if msg.payload == "bad":
            raise Reject(417, f"bad item {msg.item}")
        if msg.payload == "boom":
            raise RuntimeError("compute blew up")
        if msg.payload == "odd":
            return object()
        self.seen.append((msg.seq, msg.stream_seq, msg.item, msg.payload))
        return msg.payload * 2 if isinstance(msg.payload, int) else None


def _worker(seen: list[tuple[int, int, int, Any]], starts: list[int]) -> Any:
    return lambda: Worker(seen, starts)


async def test_batch_of_100_is_delivered_in_order_once_with_item_indices(
    autojump_clock: trio.abc.Clock,
) -> None:
    inbox = Inbox()
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await net.start_node("a", peers=["b"])
        payloads = [bytes([i]) * 64 for i in range(100)]
        handle = a.send_batch_nowait("b", payloads, stream="s", frame_no=9)
        assert isinstance(handle, BatchHandle)
        assert (handle.seq, handle.stream_seq, handle.count) == (1, 1, 100)
        outcomes = await handle.wait()
        assert handle.done
        assert len(outcomes) == 100
        for outcome in outcomes:
            assert isinstance(outcome, Ack)
            assert (outcome.peer, outcome.seq, outcome.stream_seq, outcome.result) == (
                "b",
                1,
                1,
                None,
            )
        assert inbox.payloads() == payloads
        assert [d.item for d in inbox.deliveries] == list(range(100))
        assert {(d.seq, d.stream, d.stream_seq, d.frame_no) for d in inbox.deliveries} == {
            (1, "s", 1, 9)
        }
        link = a.statistics().links[NodeId("b")].protocol
        # One protocol message, one plain ACK: the whole batch cost one of each.
        assert (link.sent, link.acked, link.resent) == (1, 1, 0)


async def test_each_item_gets_its_own_result_or_error(autojump_clock: trio.abc.Clock) -> None:
    seen: list[tuple[int, int, int, Any]] = []
    starts: list[int] = []
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=_worker(seen, starts))
        a = await net.start_node("a", peers=["b"])
        outcomes = await a.send_batch("b", [1, "bad", 3, "bad", None])
        assert [type(o) for o in outcomes] == [Ack, PeerError, Ack, PeerError, Ack]
        assert [o.result for o in outcomes if isinstance(o, Ack)] == [2, 6, None]
        errors = [o for o in outcomes if isinstance(o, PeerError)]
        assert [(e.code, e.detail) for e in errors] == [(417, "bad item 1"), (417, "bad item 3")]
        assert [item for _, _, item, _ in seen] == [0, 2, 4]
        assert starts == [0], "a Reject is an answer, not a crash"


async def test_a_crashing_item_restarts_the_actor_and_later_items_go_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[tuple[int, int, int, Any]] = []
    starts: list[int] = []
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=_worker(seen, starts))
        a = await net.start_node("a", peers=["b"])
        outcomes = await a.send_batch("b", [1, 2, "boom", 4, 5], timeout=5)
        assert [type(o) for o in outcomes] == [Ack, Ack, PeerError, Ack, Ack]
        error = outcomes[2]
        assert isinstance(error, PeerError)
        assert error.code == ErrCode.COMPUTE_FAILED
        assert "compute blew up" in error.detail
        assert [o.result for o in outcomes if isinstance(o, Ack)] == [2, 4, 8, 10]
        assert [item for _, _, item, _ in seen] == [0, 1, 3, 4]
        assert starts == [0, 1], "the supervisor restarted the compute actor once"
        # The next message of the stream still goes to the restarted actor.
        ack = await a.send("b", 7)
        assert (ack.result, ack.stream_seq) == (14, 2)


async def test_duplicates_and_drops_never_process_an_item_twice(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[tuple[int, int, int, Any]] = []
    starts: list[int] = []
    async with open_test_network(seed=7) as net:
        # Both directions: lost and doubled DATA_ITEMS, lost and doubled answers.
        net.set_faults(FaultPlan(drop=0.3, duplicate=0.3, delay=0.02))
        await net.start_node("b", peers={"a": None}, compute=_worker(seen, starts))
        a = await net.start_node("a", peers=["b"])
        batches = [[100 * k + i for i in range(k % 7 + 1)] for k in range(40)]
        handles = []
        for batch in batches:
            await a.wait_window("b")
            handles.append(a.send_batch_nowait("b", batch, timeout=60))
            # Spaced out, so that each batch travels in its own ZeroMQ message
            # and meets the faults on its own.
            await trio.sleep(0.005)
        for batch, handle in zip(batches, handles, strict=True):
            outcomes = await handle.wait()
            assert [o.result for o in outcomes if isinstance(o, Ack)] == [2 * p for p in batch]
        # Delivered exactly once each, in stream order, item by item.
        assert [payload for _, _, _, payload in seen] == [p for batch in batches for p in batch]
        assert [(stream_seq, item) for _, stream_seq, item, _ in seen] == [
            (k + 1, i) for k, batch in enumerate(batches) for i in range(len(batch))
        ]
        stats = net.statistics()
        assert stats.dropped > 0
        assert stats.duplicated > 0
        link = a.statistics().links[NodeId("b")].protocol
        assert link.resent > 0
        inbound = net["b"].statistics().inbound.protocol.sessions[0]
        assert inbound.duplicates > 0


async def test_batches_and_single_sends_keep_stream_order(autojump_clock: trio.abc.Clock) -> None:
    inbox = Inbox()
    async with open_test_network(seed=3) as net:
        # Reordering delays: the receiver's sequencer must put them back in order.
        net.set_faults(FaultPlan(delay=0.05), src="a", dst="b")
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await net.start_node("a", peers=["b"])
        handles: list[Any] = [
            a.send_nowait("b", "one"),
            a.send_batch_nowait("b", ["two", "three"]),
            a.send_nowait("b", "four"),
            a.send_batch_nowait("b", ["five"]),
            a.send_batch_nowait("b", ["six", "seven", "eight"]),
            a.send_nowait("b", "nine"),
        ]
        for handle in handles:
            await handle.wait()
        assert inbox.payloads() == [
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
        ]
        assert [(d.stream_seq, d.item) for d in inbox.deliveries] == [
            (1, 0),
            (2, 0),
            (2, 1),
            (3, 0),
            (4, 0),
            (5, 0),
            (5, 1),
            (5, 2),
            (6, 0),
        ]


async def test_batch_to_a_silent_peer_fails_as_a_whole_at_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_network() as net:
        # "b" never runs: nothing answers.
        a = await net.start_node("a", peers=["b"])
        start = trio.current_time()
        handle = a.send_batch_nowait("b", [1, 2, 3], timeout=4.0)
        with pytest.raises(DeliveryFailed) as info:
            await handle.wait()
        assert trio.current_time() == start + 4.0
        assert info.value.seq == handle.seq
        assert handle.done
        with pytest.raises(DeliveryFailed):
            await a.send_batch("b", [4, 5], timeout=2.0)
        assert trio.current_time() == start + 6.0


async def test_batch_size_limits_are_enforced_at_submit(autojump_clock: trio.abc.Clock) -> None:
    config = NodeConfig(limits=Limits(max_items=8))
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=Inbox().compute, config=config)
        a = await net.start_node("a", peers=["b"], config=config)
        with pytest.raises(LocalProtocolError, match=r"1 to Limits\.max_items=8"):
            a.send_batch_nowait("b", [])
        with pytest.raises(LocalProtocolError, match="got 9"):
            a.send_batch_nowait("b", list(range(9)))
        with pytest.raises(LocalProtocolError, match="got 0"):
            await a.send_batch("b", [])
        assert a.statistics().links[NodeId("b")].protocol.sent == 0
        outcomes = await a.send_batch("b", list(range(8)))
        assert len(outcomes) == 8


async def test_real_tcp_batch_round_trip() -> None:
    seen: list[tuple[int, int, int, Any]] = []
    starts: list[int] = []
    with trio.fail_after(10):
        async with (
            open_node(
                "b",
                bind="tcp://127.0.0.1:*",
                peers={"a": None},
                compute=_worker(seen, starts),
            ) as b,
            open_node("a", bind="tcp://127.0.0.1:*", peers={"b": b.endpoint}) as a,
        ):
            handles = []
            for k in range(20):
                await a.wait_window("b")
                handles.append(a.send_batch_nowait("b", [k * 100 + i for i in range(64)]))
            totals = []
            for handle in handles:
                totals.extend(o.result for o in await handle.wait() if isinstance(o, Ack))
            assert totals == [2 * (k * 100 + i) for k in range(20) for i in range(64)]
            assert len(seen) == 20 * 64
            outcomes = await a.send_batch("b", [1, "bad", "boom", 4])
            assert [type(o) for o in outcomes] == [Ack, PeerError, PeerError, Ack]
            assert [o.code for o in outcomes if isinstance(o, PeerError)] == [
                417,
                ErrCode.COMPUTE_FAILED,
            ]


# -- the actor runtime: several messages in one mailbox entry -------------------


class _Log(list[tuple[str, Any]]):
    """Settled replies in order; ``full`` is set once ``expect`` of them are in."""

    def __init__(self, expect: int) -> None:
        super().__init__()
        self.expect = expect
        self.full = trio.Event()

    def add(self, entry: tuple[str, Any]) -> None:
        self.append(entry)
        if len(self) >= self.expect:
            self.full.set()


class _Sink:
    """A reply sink that records what it was settled with."""

    def __init__(self, log: _Log, name: str) -> None:
        self._log = log
        self._name = name

    def set_result(self, value: Any) -> None:
        self._log.add((self._name, value))

    def fail(self, error: BaseException) -> None:
        self._log.add((self._name, type(error).__name__))


class _ItemsSink:
    """An items reply sink that records each message's outcome under its name."""

    def __init__(self, log: _Log, names: list[str]) -> None:
        self._log = log
        self._names = names

    def set_item_result(self, index: int, value: Any) -> None:
        self._log.add((self._names[index], value))

    def fail_item(self, index: int, error: BaseException) -> None:
        self._log.add((self._names[index], type(error).__name__))


class _Echo(Actor[Any, Any]):
    def __init__(self, starts: list[int]) -> None:
        starts.append(len(starts))

    async def receive(self, msg: Any) -> Any:
        if msg == "boom":
            raise RuntimeError("boom")
        if msg == "bad":
            raise Reject(400, "bad")
        await trio.sleep(0.001)
        return msg


async def test_items_in_one_entry_are_handled_in_order_and_survive_a_crash(
    autojump_clock: trio.abc.Clock,
) -> None:
    log = _Log(expect=6)
    starts: list[int] = []
    async with open_supervisor(ChildSpec("w", lambda: _Echo(starts)), intensity=5) as sup:
        ref = sup.actor("w")
        msgs = ["a", "bad", "boom", "c", "d"]
        ref.send_items_nowait(msgs, reply=_ItemsSink(log, msgs))
        # Queued behind the batch: must come after the carried-over items.
        ref.send_nowait("e", reply=_Sink(log, "e"))
        await log.full.wait()
    assert log == [
        ("a", "a"),
        ("bad", "Reject"),
        ("boom", "ActorCrashed"),
        ("c", "c"),
        ("d", "d"),
        ("e", "e"),
    ]
    assert starts == [0, 1]


async def test_items_not_taken_fail_when_the_actor_stops(autojump_clock: trio.abc.Clock) -> None:
    log = _Log(expect=5)
    starts: list[int] = []
    async with open_supervisor(ChildSpec("w", lambda: _Echo(starts))) as sup:
        ref = sup.actor("w")
        msgs = [f"m{i}" for i in range(5)]
        ref.send_items_nowait(msgs, reply=_ItemsSink(log, msgs))
        await trio.sleep(0.0015)  # m0 done, m1 in its handler
        await ref.stop()
        with pytest.raises(ActorStopped):
            ref.send_items_nowait(["x"])
    assert log == [
        ("m0", "m0"),
        ("m1", "ActorStopped"),
        ("m2", "ActorStopped"),
        ("m3", "ActorStopped"),
        ("m4", "ActorStopped"),
    ]


# -- more node-level outcomes --------------------------------------------------


async def test_an_unencodable_result_is_that_items_error(autojump_clock: trio.abc.Clock) -> None:
    seen: list[tuple[int, int, int, Any]] = []
    starts: list[int] = []
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=_worker(seen, starts))
        a = await net.start_node("a", peers=["b"])
        outcomes = await a.send_batch("b", [1, "odd", 3])
        assert [type(o) for o in outcomes] == [Ack, PeerError, Ack]
        error = outcomes[1]
        assert isinstance(error, PeerError)
        assert error.code == ErrCode.COMPUTE_FAILED
        assert "not encodable" in error.detail
        assert [o.result for o in outcomes if isinstance(o, Ack)] == [2, 6]


async def test_a_batch_refused_as_a_whole_fails_each_item(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_network() as net:
        # No compute actor: the node answers ERR NO_HANDLER for the message.
        await net.start_node("b", peers={"a": None})
        a = await net.start_node("a", peers=["b"])
        outcomes = await a.send_batch("b", [1, 2, 3])
        assert len(outcomes) == 3
        for outcome in outcomes:
            assert isinstance(outcome, PeerError)
            assert outcome.code == ErrCode.NO_HANDLER


# -- the sans-IO cores: a batch is one message to them ----------------------------

A = NodeId("a")
B = NodeId("b")


def test_cores_carry_a_batch_as_one_message_with_one_cached_answer() -> None:
    sender = LinkSender(A, Incarnation(1), B, now=0.0, rng=lambda: 0.5)
    receiver = LinkReceiver(B, Incarnation(2), config=ReceiverConfig(received_delay=0.0))
    with pytest.raises(LocalProtocolError, match="non-empty tuple"):
        sender.send_items(StreamId("s"), (), now=0.0)
    seq = sender.send_items(StreamId("s"), (b"x", 2, "bad"), now=0.0, frame_no=4)
    [frame] = sender.frames_to_send(0.0)
    assert isinstance(frame, DataItems)
    assert (frame.seq, frame.stream_seq, frame.frame_no, frame.items) == (
        seq,
        1,
        4,
        (b"x", 2, "bad"),
    )
    receiver.receive_frame(A, frame, 0.0)
    [_, deliver] = receiver.take_events()  # SessionStarted, then the delivery
    assert isinstance(deliver, Admitted)
    assert deliver.items is True
    assert deliver.payload == (b"x", 2, "bad")
    with pytest.raises(LocalProtocolError, match="reserved"):
        receiver.complete_items(A, Incarnation(1), seq, (ItemErr(50, "no"),))
    outcomes = (ItemAck(None), ItemAck(4), ItemErr(417, "bad"))
    assert receiver.complete_items(A, Incarnation(1), seq, outcomes)
    [(_, answer)] = receiver.frames_to_send(0.01)
    assert answer == AckItems(B, Incarnation(2), Incarnation(1), seq, LinkSeq(257), outcomes)
    # A resend of the batch (its answer lost) gets the same cached answer and
    # is not delivered again.
    receiver.receive_frame(A, frame, 0.02)
    assert receiver.take_events() == []
    assert receiver.frames_to_send(0.02) == [(A, answer)]
    sender.receive_frame(answer, 0.03)
    [event] = [e for e in sender.take_events() if isinstance(e, Answered)]
    assert event == Answered(seq, answer)
    assert sender.statistics().acked == 1
    # Every item plain: the usual ACK, not an ACK_ITEMS.
    seq2 = sender.send_items(StreamId("s"), (1, 2), now=0.04)
    [frame2] = sender.frames_to_send(0.04)
    receiver.receive_frame(A, frame2, 0.04)
    receiver.take_events()
    assert receiver.complete_items(A, Incarnation(1), seq2, (ItemAck(None), ItemAck(None)))
    [(_, plain)] = receiver.frames_to_send(0.05)
    assert type(plain) is AckFrame
    assert (plain.seq, plain.result) == (seq2, None)


async def test_results_too_large_together_fail_the_batch_as_a_whole(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Each result fits the header limit alone, the four together do not.
    config = NodeConfig(limits=Limits(max_header_bytes=2000))
    inbox = Inbox(answer=lambda d: "r" * 800)
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=inbox.compute, config=config)
        a = await net.start_node("a", peers=["b"], config=config)
        outcomes = await a.send_batch("b", [1, 2, 3, 4])
        for outcome in outcomes:
            assert isinstance(outcome, PeerError)
            assert outcome.code == ErrCode.COMPUTE_FAILED
            assert "not encodable" in outcome.detail
        assert len(inbox.deliveries) == 4
        # A result that fits still comes back.
        [single] = await a.send_batch("b", [5])
        assert isinstance(single, Ack)
        assert single.result == "r" * 800


# -- answers from a peer that breaks the protocol ---------------------------------


async def test_answers_that_do_not_fit_fail_only_their_own_send() -> None:
    # A raw ROUTER plays b and answers each message a sends with a crafted
    # final answer: an ACK_ITEMS for a single DATA, an ACK_ITEMS with the
    # wrong number of outcomes, a plain ACK with a result for a batch, and a
    # right ACK. The first three cannot be matched to what was sent: each
    # ends in DeliveryFailed saying why; the link goes on serving.
    b_inc = Incarnation(7)
    ctx = zmq.Context()
    router = router_socket(ctx)
    try:
        endpoint = router.bind("tcp://127.0.0.1:*")
        with trio.fail_after(10):
            async with open_node("a", bind="tcp://127.0.0.1:*", peers={"b": endpoint}) as a:
                a_inc = a.incarnation
                single = a.send_nowait("b", b"single")
                wrong_count = a.send_batch_nowait("b", [b"x", b"y"])
                result_on_plain = a.send_batch_nowait("b", [b"p", b"q"])
                fine = a.send_nowait("b", b"fine")
                crafted: dict[int, Any] = {
                    int(single.seq): lambda s, c: AckItems(B, b_inc, a_inc, s, c, (ItemAck(1),)),
                    int(wrong_count.seq): lambda s, c: AckItems(
                        B, b_inc, a_inc, s, c, (ItemAck(1), ItemAck(2), ItemAck(3))
                    ),
                    int(result_on_plain.seq): lambda s, c: AckFrame(B, b_inc, a_inc, s, c, 5),
                    int(fine.seq): lambda s, c: AckFrame(B, b_inc, a_inc, s, c, 6),
                }
                answered: set[int] = set()
                while answered != set(crafted):
                    rid, *parts = await router.recv_multipart()
                    frame = decode(parts)
                    for f in frame.frames if isinstance(frame, Batch) else (frame,):
                        if isinstance(f, Data | DataItems) and f.seq not in answered:
                            answered.add(f.seq)
                            answer = crafted[f.seq](f.seq, LinkSeq(f.seq + 256))
                            await router.send_multipart([rid, *encode(answer)])
                with pytest.raises(DeliveryFailed, match="single message with ACK_ITEMS"):
                    await single.wait()
                with pytest.raises(DeliveryFailed, match="3 outcomes for 2 items"):
                    await wrong_count.wait()
                with pytest.raises(DeliveryFailed, match="result on a plain ACK"):
                    await result_on_plain.wait()
                assert (await fine.wait()).result == 6
                assert a.statistics().links[B].protocol.in_flight == 0
    finally:
        router.close()
        ctx.term()
