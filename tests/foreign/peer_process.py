"""A foreign peer in its own process: a well-behaved sender, or an attacker.

``python peer_process.py good ENDPOINT --id good --seconds 3`` sends one DATA every 10 ms and
prints, as one JSON line, how long each took to its final answer.

``python peer_process.py attack ENDPOINT --id evil --seconds 4 --header-limit N`` attacks the
node with input that is valid at the extremes or invalid, as fast as it can, and prints what it
sent. Like peer.py it imports nothing of cellmesh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import cbor2
import zmq
from peer import (
    ACK,
    U63_MAX,
    Link,
    Sender,
    data,
    encode,
    encode_with_raw,
    hello,
    new_incarnation,
    zeros_array,
)

#: The good peer's pace: one DATA every 10 ms (issue 14).
PERIOD = 0.01


def good(opts: argparse.Namespace) -> dict[str, Any]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Sender(ctx, opts.id, opts.endpoint) as sender:
            start = time.monotonic()
            next_send = start
            while time.monotonic() - start < opts.seconds:
                now = time.monotonic()
                if now >= next_send:
                    sender.submit({"op": "none", "n": sender.next_seq}, stream="good")
                    next_send += PERIOD
                sender.pump(max(0.0, next_send - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                sender.run(timeout=10.0)
            msgs = sorted(sender.messages.values(), key=lambda m: m.seq)
            latencies = sorted(m.answered_at - m.first_sent for m in msgs if m.answer is not None)
            kinds = sorted({m.answer.kind for m in msgs if m.answer is not None})
            resent = sum(1 for m in msgs if m.transmissions > 1)
    finally:
        ctx.destroy(linger=0)

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "sent": len(msgs),
        "answered": len(latencies),
        "final_kinds": kinds,
        "resent": resent,
        "p50": pct(0.50),
        "p99": pct(0.99),
        "max": latencies[-1] if latencies else None,
    }


def attack(opts: argparse.Namespace) -> dict[str, Any]:
    """Every kind of trouble in a tight loop, for ``opts.seconds`` (issue 14)."""
    ctx: zmq.Context[Any] = zmq.Context()
    counts: dict[str, int] = {}
    evil, me = opts.id, new_incarnation()
    # A valid frame at the extremes: seq = watermark = 2**63-1 (§3.2, §6.2), resent.
    top = encode(data(evil, me, U63_MAX, "top", stream_seq=U63_MAX, frame_no=U63_MAX))
    # A header just under the node's limit that is costly to decode: a list of zeros.
    # Same incarnation, seq 1 below the watermark the top DATA set: once decoded, dropped
    # silently (§6.2 step 4), so the decoding is all it costs.
    frame = data(evil, me, 1, None)
    base = len(encode_with_raw(frame, 8, zeros_array(0))[0])
    bomb = encode_with_raw(frame, 8, zeros_array(max(0, opts.header_limit - base)))
    bad = [
        [b"\xff"],
        [b""],
        [cbor2.dumps([2, evil, me, 1, "s", 1, 1, None, 0, 0])],
        [cbor2.dumps(hello(evil, me, -1, False))],
        [cbor2.dumps([4, evil, me, me, 1, 1, None])],
        [cbor2.dumps(data(evil, me, 1, cbor2.CBORTag(1, 0)))],
        encode(data("someone-else", me, 1, "x")),
    ]
    try:
        with (
            Link(ctx, evil, opts.endpoint) as link,
            Link(ctx, "stranger", opts.endpoint) as stranger,
        ):
            for sock in (link.sock, stranger.sock):
                sock.setsockopt(zmq.SNDHWM, 100)
            start = time.monotonic()
            last_top = last_bomb = 0.0

            def send(sock: zmq.Socket[Any], parts: list[bytes], what: str) -> None:
                try:
                    sock.send_multipart(parts, zmq.NOBLOCK)
                    counts[what] = counts.get(what, 0) + 1
                except zmq.Again:
                    counts["blocked"] = counts.get("blocked", 0) + 1

            while (now := time.monotonic()) - start < opts.seconds:
                if now - last_top >= 0.02:
                    send(link.sock, top, "top")
                    last_top = now
                if now - last_bomb >= 0.2:
                    send(link.sock, bomb, "bomb")
                    last_bomb = now
                for parts in bad:
                    send(link.sock, parts, "bad")
                send(stranger.sock, bad[2], "stranger")
                got = link.read(0.002)
                for f in got:
                    counts[f"answer-{f.kind}"] = counts.get(f"answer-{f.kind}", 0) + 1
                    if f.kind == ACK and f.seq == U63_MAX:
                        counts["top-acked"] = 1
    finally:
        ctx.destroy(linger=0)
    counts["bomb_bytes"] = len(bomb[0])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["good", "attack"])
    parser.add_argument("endpoint")
    parser.add_argument("--id", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--header-limit", type=int, default=65536)
    opts = parser.parse_args()
    result = good(opts) if opts.role == "good" else attack(opts)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
