"""Decoding is bounded before it is paid (issue 14, point 2).

A peer holding a valid id must not be able to stall a node or grow its
memory: headers are small (``Limits.max_header_bytes``, 64 KiB), checked
before any CBOR is parsed; a wake-up of the Receiver takes messages for
about 20 ms at most before it flushes answers, and each peer may keep it
decoding for half of the time at most; each peer's held messages are
bounded in bytes (``ReceiverConfig.max_held_bytes``), beyond which DATA
gets RETRY_LATER(BUFFER_FULL); large out-of-band parts reach the node
uncopied. The protocol core's rules are tested here without I/O; the last
tests attack a real node process from plain pyzmq + cbor2.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
import zmq

from actors import Ack, open_node
from actors.testing import Inbox, open_test_network
from transport import (
    Incarnation,
    Limits,
    LinkReceiver,
    LinkSeq,
    LocalProtocolError,
    ReceiverConfig,
    RemoteProtocolError,
    StreamId,
    StreamSeq,
    dealer_socket,
    decode,
    encode,
    router_socket,
)
from transport.events import (
    Admitted,
)
from transport.frames import (
    Batch,
    Data,
    RetryLater,
    RetryReason,
)
from transport.frames import Hello as HelloFrame

A = "a"
C = "c"
B_INC = Incarnation(50)
A_INC = Incarnation(7)
S = StreamId("s")
MIB = 1024 * 1024


def receiver(max_held_bytes: int) -> LinkReceiver:
    config = ReceiverConfig(received_delay=0.0, max_held_bytes=max_held_bytes)
    return LinkReceiver("b", B_INC, config=config)  # type: ignore[arg-type]


def data(seq: int, *, node: str = A, inc: int = A_INC, watermark: int = 1) -> Data:
    return Data(
        node,  # type: ignore[arg-type]
        Incarnation(inc),
        LinkSeq(seq),
        S,
        StreamSeq(seq),
        StreamSeq(1),
        None,
        b"x",
        LinkSeq(watermark),
    )


def delivered(rx: LinkReceiver) -> list[int]:
    return [int(e.seq) for e in rx.take_events() if type(e) is Admitted]


def refusals(rx: LinkReceiver) -> list[tuple[int, RetryReason]]:
    return [(int(f.seq), f.reason) for _, f in rx.frames_to_send(0.0) if type(f) is RetryLater]


# -- the per-peer budget, in the sans-IO core ------------------------------------


def test_a_peer_past_its_byte_budget_gets_buffer_full_and_nothing_is_delivered() -> None:
    rx = receiver(max_held_bytes=100)
    rx.receive_frame(A, data(1), 0.0, size=60)
    rx.receive_frame(A, data(2), 0.0, size=40)
    assert delivered(rx) == [1, 2]
    rx.frames_to_send(0.0)
    # 100 held: one byte more is over.
    rx.receive_frame(A, data(3), 0.0, size=1)
    assert delivered(rx) == []
    assert refusals(rx) == [(3, RetryReason.BUFFER_FULL)]
    stats = rx.statistics()
    assert stats.held_bytes == {A: 100}
    assert stats.over_budget == 1
    # Not held: the resend after an answer is taken as new.
    assert rx.complete(A, A_INC, LinkSeq(1))  # type: ignore[arg-type]
    rx.receive_frame(A, data(3), 0.0, size=1)
    assert delivered(rx) == [3]
    assert rx.statistics().held_bytes == {A: 41}


def test_one_message_over_the_budget_is_taken_when_the_peer_holds_nothing() -> None:
    rx = receiver(max_held_bytes=100)
    rx.receive_frame(A, data(1), 0.0, size=1000)
    assert delivered(rx) == [1]
    rx.receive_frame(A, data(2), 0.0, size=1)
    assert delivered(rx) == []
    assert rx.statistics().over_budget == 1


def test_each_peer_has_its_own_budget() -> None:
    rx = receiver(max_held_bytes=100)
    rx.receive_frame(A, data(1), 0.0, size=100)
    rx.receive_frame(A, data(2), 0.0, size=50)
    rx.receive_frame(C, data(1, node=C), 0.0, size=100)  # type: ignore[arg-type]
    events = [(e.peer, int(e.seq)) for e in rx.take_events() if type(e) is Admitted]
    assert events == [(A, 1), (C, 1)]
    assert rx.statistics().held_bytes == {A: 100, C: 100}


def test_a_batch_is_charged_once_and_given_back_with_its_last_message() -> None:
    rx = receiver(max_held_bytes=100)
    rx.receive_frame(A, Batch((data(1), data(2), data(3))), 0.0, size=80)
    assert delivered(rx) == [1, 2, 3]
    assert rx.statistics().held_bytes == {A: 80}
    rx.complete(A, A_INC, LinkSeq(1))  # type: ignore[arg-type]
    rx.fail(A, A_INC, LinkSeq(2), 100, "no")  # type: ignore[arg-type]
    assert rx.statistics().held_bytes == {A: 80}
    rx.refuse(A, A_INC, LinkSeq(3), RetryReason.BUFFER_FULL)  # type: ignore[arg-type]
    assert rx.statistics().held_bytes == {}


def test_held_bytes_stay_until_the_answer_even_when_the_table_forgot_the_message() -> None:
    # The sender's watermark (or its restart) makes the table forget a message
    # still in a mailbox: its bytes are still in memory, so they still count.
    rx = receiver(max_held_bytes=100)
    rx.receive_frame(A, data(1), 0.0, size=100)
    rx.receive_frame(A, data(2, watermark=2), 0.0, size=1)
    assert delivered(rx) == [1]
    rx.receive_frame(A, data(1, inc=A_INC + 1), 0.0, size=1)
    assert [int(e.seq) for e in rx.take_events() if type(e) is Admitted] == []
    assert rx.statistics().held_bytes == {A: 100}
    assert not rx.complete(A, A_INC, LinkSeq(1))  # type: ignore[arg-type]
    assert rx.statistics().held_bytes == {}
    rx.receive_frame(A, data(2, inc=A_INC + 1), 0.0, size=1)
    assert delivered(rx) == [2]


def test_duplicates_and_refused_data_hold_nothing() -> None:
    rx = receiver(max_held_bytes=100)
    rx.receive_frame(A, data(1), 0.0, size=10)
    rx.receive_frame(A, data(1), 0.0, size=10)  # duplicate: answered from the table
    rx.receive_frame(A, data(10_000), 0.0, size=10)  # beyond the credit: WINDOW_FULL
    assert delivered(rx) == [1]
    assert rx.statistics().held_bytes == {A: 10}


def test_max_held_bytes_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError, match="max_held_bytes"):
        ReceiverConfig(max_held_bytes=0)


async def test_a_node_gives_back_the_bytes_of_what_an_ended_session_left_buffered() -> None:
    # a's DATA for stream seq 2 waits in b's reorder buffer for seq 1; then a
    # restarts. The buffered message is dropped with its session (a Gap says
    # so), and its bytes no longer count against a.
    inbox = Inbox()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        async with (
            open_node("b", bind="tcp://127.0.0.1:*", peers={"a": None}, compute=inbox.compute) as b,
            dealer_socket(ctx, routing_id=b"a") as a,
        ):
            a.connect(b.endpoint)

            def held() -> Mapping[str, int]:
                return b.statistics().inbound.protocol.held_bytes

            waiting = Data(
                A,  # type: ignore[arg-type]
                A_INC,
                LinkSeq(1),
                S,
                StreamSeq(2),
                StreamSeq(1),
                None,
                b"w",
                LinkSeq(1),
            )
            with trio.fail_after(10):
                await a.send_multipart(encode(waiting))
                # Polled: the node's counters have no event to wait on.
                while not held():  # noqa: ASYNC110
                    await trio.sleep(0.01)
                assert held() == {A: sum(map(len, encode(waiting)))}
                await a.send_multipart(encode(data(1, inc=A_INC + 1)))
                while inbox.payloads(peer=A) != [b"x"] or held():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert [gap.reason for gap in inbox.gaps] == ["session-ended"]
    finally:
        ctx.destroy(linger=0)


# -- headers: small by default, refused from their size --------------------------


def test_default_header_limit_refuses_a_large_header_before_parsing() -> None:
    assert Limits().max_header_bytes == 64 * 1024
    # The bomb: a list of 15 million zeros. Refused from its size alone
    # (a parse would take seconds); a smaller one parses and fails its shape.
    with pytest.raises(RemoteProtocolError) as caught:
        decode([b"\x9a\x00\xe4\xe1\xc0" + bytes(15_000_000)])
    assert caught.value.reason == "too-large"
    with pytest.raises(RemoteProtocolError) as caught:
        decode([cbor2.dumps([0] * 60_000)])
    assert caught.value.reason == "unknown-kind"


def test_empty_containers_still_count_for_depth() -> None:
    # Empty arrays and maps skip the payload walk's call; the depth rule holds.
    limits = Limits(max_depth=2)
    for ok in ([[]], [{}], {"k": []}, [[], {}], []):
        header = cbor2.dumps([2, A, A_INC, 1, "s", 1, 1, None, ok, 1])
        assert decode([header], limits).payload == ok  # type: ignore[union-attr]
    for deep in ([[[]]], [{"k": {}}], {"k": [[]]}, [[], [[]]]):
        header = cbor2.dumps([2, A, A_INC, 1, "s", 1, 1, None, deep, 1])
        with pytest.raises(RemoteProtocolError) as caught:
            decode([header], limits)
        assert caught.value.reason == "too-deep"


async def test_a_batch_over_the_header_limit_is_sent_as_several_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    # 128 payloads of 4000 inline bytes: about 512 KiB as one batch, eight
    # times the header limit; each alone fits.
    inbox = Inbox()
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None}, compute=inbox.compute)
        a = await net.start_node("a", peers=["b"])
        payloads = [bytes([i]) * 4000 for i in range(128)]
        handles = [a.send_nowait("b", p) for p in payloads]
        for handle in handles:
            assert isinstance(await handle.wait(), Ack)
        assert inbox.payloads(peer="a") == payloads


async def test_a_payload_whose_header_cannot_fit_fails_its_send(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_network() as net:
        await net.start_node("b", peers={"a": None})
        a = await net.start_node("a", peers=["b"])
        # 10 000 doubles: 90 KB of header, over 64 KiB.
        with pytest.raises(LocalProtocolError, match="max_header_bytes"):
            a.send_nowait("b", [0.1] * 10_000)


# -- large out-of-band parts reach the node uncopied ----------------------------


async def test_router_takes_large_parts_as_memoryviews_and_small_ones_as_bytes() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        async with router_socket(ctx) as router, dealer_socket(ctx, routing_id=b"d") as d:
            endpoint = router.bind("tcp://127.0.0.1:*")
            d.connect(endpoint)
            big = random.randbytes(2 * MIB)
            frame = Data(
                "d",  # type: ignore[arg-type]
                A_INC,
                LinkSeq(1),
                S,
                StreamSeq(1),
                StreamSeq(1),
                None,
                [b"y" * 5000, big],
                LinkSeq(1),
            )
            with trio.fail_after(10):
                await d.send_multipart(encode(frame))
                parts = await router.recv_multipart()
            rid, header, small, large = parts
            assert (rid, type(header), type(small)) == (b"d", bytes, bytes)
            assert type(large) is memoryview
            assert large.readonly
            assert decode(parts[1:]) == frame
    finally:
        ctx.destroy(linger=0)


# -- a real node under attack ------------------------------------------------------

#: The node under attack: "n", plaintext, three configured peers; its compute
#: actor ACKs at once and counts deliveries per peer. Prints its endpoint, then
#: on stdin's end its counters as JSON.
NODE = """
import json, sys, trio
from collections import Counter
from actors import Actor, Delivery, open_node
counts = Counter()
class Count(Actor):
    async def receive(self, msg):
        if isinstance(msg, Delivery):
            counts[msg.peer] += 1
async def main():
    peers = dict.fromkeys(["good", "bomb", "big", "worst"])
    async with open_node("n", bind=sys.argv[1], peers=peers, compute=Count) as node:
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        inbound = node.statistics().inbound
        print(json.dumps({
            "counts": counts,
            "rejected": inbound.rejected,
            "core_rejected": inbound.protocol.rejected,
            "over_budget": inbound.protocol.over_budget,
        }), flush=True)
trio.run(main)
"""

#: An attacker in its own process, so that building its messages (the bomb's
#: CBOR takes about a second of CPU) holds no lock of the measuring process.
#: argv: endpoint, routing id, kind (bomb: the issue's 15 MB list of zeros;
#: big: valid 60 MiB DATA, the bytes out of band; worst: headers just under
#: 64 KiB of the costliest shape to decode, arrays nested 16 deep, in DATA
#: claiming another node, so never delivered), count. Says "armed", sends
#: all on a line from stdin, then waits for stdin's end.
ATTACKER = """
import sys, zmq, cbor2
endpoint, rid, kind, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.ROUTING_ID, rid.encode())
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
if kind == "worst":
    chain = []
    for _ in range(16):
        chain = [chain]
    header = cbor2.dumps([2, "zz", 1, 1, "s", 1, 1, None, [chain] * 3850, 1])
    assert 65_000 < len(header) <= 65_536
    messages = [[header]] * n
elif kind == "bomb":
    bomb = cbor2.dumps([0] * 15_000_000)
    messages = [[bomb]] * n
else:
    big = bytes(60 * 1024 * 1024)
    messages = [
        [cbor2.dumps([2, rid, 1, i, "s", i, 1, None, cbor2.CBORTag(52753, 1), 1]), big]
        for i in range(1, n + 1)
    ]
print("armed", flush=True)
sys.stdin.readline()
for message in messages:
    sock.send_multipart(message, copy=False)
sys.stdin.read()
"""

#: Worst-case 64 KiB headers sent by the third attacker.
WORST = 200
#: The issue's bounds: generous on purpose.
MAX_STALL = 0.250
MAX_RSS_KIB = 256 * 1024
#: The good peer: one DATA every 10 ms for this long while the attack runs.
ATTACK_SECONDS = 3.0


def free_port() -> int:
    """A free port below the ephemeral range (design.md §5)."""
    for _ in range(200):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000..32000")


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def expect_line(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    assert got == line, f"child said {got!r}, exit status {proc.poll()}"


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc")


class GoodPeer:
    """A well-behaved sender in plain pyzmq + cbor2: DATA in order, watermark kept."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, b"good")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_seq = 1
        self.sent_at: dict[int, float] = {}
        self.answered_at: dict[int, float] = {}

    def send(self) -> None:
        seq = self.next_seq
        self.next_seq += 1
        watermark = min((s for s in self.sent_at if s not in self.answered_at), default=seq)
        header = cbor2.dumps([2, "good", 1, seq, "s", seq, 1, None, b"x", watermark])
        self.sent_at[seq] = time.monotonic()
        self.sock.send(header)

    def take_answers(self, until: float) -> None:
        while (left := until - time.monotonic()) > 0:
            if not self.sock.poll(max(1, int(left * 1000))):
                return
            now = time.monotonic()
            top = cbor2.loads(self.sock.recv_multipart()[0])
            for frame in top[1] if top[0] == 9 else [top]:
                if frame[0] == 4:  # ACK
                    self.answered_at.setdefault(frame[4], now)
                elif frame[0] == 10:  # ACK_RANGE
                    for seq in range(frame[4], frame[5] + 1):
                        self.answered_at.setdefault(seq, now)

    def stalls(self) -> list[float]:
        return sorted(
            self.answered_at.get(seq, float("inf")) - sent for seq, sent in self.sent_at.items()
        )


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "attack",
    [
        # The attack: three bombs, 60 MiB messages queued behind them.
        {"bomb": 3, "big": 3},
        # A flood of the costliest headers that pass the size check.
        {"worst": WORST},
    ],
    ids=["bombs-and-60-mib", "worst-headers"],
)
def test_attacks_neither_stall_nor_bloat_a_node(attack: dict[str, int]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    node = spawn(NODE, endpoint)
    attackers = [spawn(ATTACKER, endpoint, kind, kind, str(n)) for kind, n in attack.items()]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        expect_line(node, "ready")
        for attacker in attackers:
            expect_line(attacker, "armed")
        good = GoodPeer(ctx, endpoint)
        # The session is up before the attack starts.
        good.send()
        good.take_answers(time.monotonic() + 10)
        assert good.answered_at, "the node never answered the good peer"
        for attacker in attackers:
            assert attacker.stdin is not None
            attacker.stdin.write("go\n")
            attacker.stdin.flush()
        end = time.monotonic() + ATTACK_SECONDS
        while time.monotonic() < end:
            good.send()
            good.take_answers(time.monotonic() + 0.010)
        tail = time.monotonic() + 5
        while len(good.answered_at) < len(good.sent_at) and time.monotonic() < tail:
            good.take_answers(min(tail, time.monotonic() + 0.1))
        peak_kib = vm_hwm_kib(node.pid)
        out, _ = node.communicate("", timeout=30)
    finally:
        for child in [node, *attackers]:
            child.kill()
            # Reads to the end and closes the pipes.
            child.communicate(timeout=30)
        ctx.destroy(linger=0)
    stalls = good.stalls()
    assert stalls[-1] < MAX_STALL, f"good peer's answers stalled up to {stalls[-1]:.3f} s"
    assert peak_kib < MAX_RSS_KIB, f"node peaked at {peak_kib // 1024} MiB"
    report = json.loads(out.strip().splitlines()[-1])
    # Every good message delivered once; no bomb ever reached the compute actor.
    assert report["counts"]["good"] == len(good.sent_at)
    assert "bomb" not in report["counts"]
    rejected = report["rejected"]
    # The bombs: refused from their size, before any CBOR is parsed.
    assert rejected.pop("too-large", 0) == attack.get("bomb", 0)
    # The costly headers: decoded within their peer's share of the time, the
    # rest dropped before decoding; none delivered.
    impersonations = report["core_rejected"].get("impersonation", 0)
    assert rejected.pop("decode-budget", 0) + impersonations == attack.get("worst", 0), report
    assert rejected == {}, report
    assert set(report["counts"]) <= {"good", "big"}
    assert report["counts"].get("big", 0) <= attack.get("big", 0)


def test_hello_is_unaffected_by_the_size_argument() -> None:
    rx = receiver(max_held_bytes=1)
    rx.receive_frame(A, HelloFrame(A, A_INC, 5, False), 0.0, size=10_000)  # type: ignore[arg-type]
    [(_, reply)] = rx.frames_to_send(0.0)
    assert type(reply) is HelloFrame
    assert reply.reply
    assert rx.statistics().held_bytes == {}
