"""Protocol cores micro-benchmark: CPU µs per confirmed message, no sockets, no Trio.

One process drives a :class:`LinkSender` and a :class:`LinkReceiver` against
each other through the codec, the way the two shells do (window 256, one
``Batch`` of DATA per turn, the answers back as one ``Batch``), until N
messages have their ACK. What is left out is the shells: Trio, ZeroMQ and the
actors. The figure is the best of several runs of ``time.process_time``.

Run: ``.venv/bin/python bench/cores.py [-n 50000] [--repeats 5]``. It is a
way to A/B a change of the cores or the codec in a few seconds on a noisy
machine, where ``bench/links.py`` needs many alternations.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

# Run as a script, this directory would come first on the path and
# ``import transport`` would find bench/transport.py instead of the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from transport import (  # noqa: E402
    Incarnation,
    Limits,
    LinkReceiver,
    LinkSender,
    NodeId,
    StreamId,
    decode,
    encode,
)
from transport.events import (  # noqa: E402
    Admitted,
    Answered,
)
from transport.frames import (  # noqa: E402
    Batch,
    Frame,
)

PAYLOAD = bytes(range(64))


def _wire(frames: list[Frame], limits: Limits) -> Frame:
    """Through the codec and back, as one message."""
    return decode(encode(frames[0] if len(frames) == 1 else Batch(tuple(frames)), limits=limits))


def run(n: int) -> float:
    """Confirm ``n`` messages; return the CPU seconds it took."""
    a, b, stream = NodeId("a"), NodeId("b"), StreamId("default")
    sender = LinkSender(a, Incarnation(1), b, now=0.0, rng=random.Random(1).random)
    receiver = LinkReceiver(b, Incarnation(2))
    limits = Limits()
    now = 0.0
    sent = answered = 0
    began = time.process_time()
    while answered < n:
        # Virtual time, well inside every timer: nothing is resent.
        now += 1e-5
        while sent < n and sender.window_open():
            sender.send(stream, PAYLOAD, now=now)
            sent += 1
        frames = sender.frames_to_send(now)
        if frames:
            receiver.receive_frame(a, _wire(frames, limits), now)
        for event in receiver.take_events():
            if type(event) is Admitted:
                receiver.complete(event.peer, event.peer_incarnation, event.seq)
        answers = [frame for _, frame in receiver.frames_to_send(now)]
        if answers:
            sender.receive_frame(_wire(answers, limits), now)
        answered += sum(1 for event in sender.take_events() if type(event) is Answered)
    elapsed = time.process_time() - began
    stats = sender.statistics()
    assert stats.acked == n, stats
    assert stats.resent == 0, stats
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = [run(args.n) / args.n * 1e6 for _ in range(args.repeats)]
    print(
        f"cores + codec: {min(runs):.2f} us per confirmed message "
        f"(best of {args.repeats}; all: {', '.join(f'{r:.2f}' for r in runs)})"
    )


if __name__ == "__main__":
    main()
