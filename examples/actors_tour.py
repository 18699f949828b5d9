"""The runnable examples of docs/actors.md: a counter, a supervised worker that
crashes and comes back, and a pipeline with backpressure.

Run with ``python examples/actors_tour.py``; each part finishes in well under
a second.
"""

from __future__ import annotations

import trio

from actors import (
    Actor,
    ActorCrashed,
    ActorRef,
    Backoff,
    ChildSpec,
    Status,
    SupervisorGaveUp,
    open_supervisor,
    spawn,
)


class Counter(Actor[str, int]):
    """Counts "inc" messages; replies with the count to any message."""

    def __init__(self) -> None:
        self.count = 0

    async def receive(self, msg: str) -> int:
        if msg == "inc":
            self.count += 1
        return self.count


async def counter() -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Counter, name="counter")
        for _ in range(3):
            await ref.send("inc")  # fire and forget
        print("counter says", await ref.ask("get", timeout=1.0))
        print("statistics:", ref.statistics())
        await ref.stop()


class Worker(Actor[int, float]):
    """Takes the reciprocal; 0 crashes it."""

    async def on_start(self) -> None:
        print("  worker instance up")

    async def receive(self, msg: int) -> float:
        return 1 / msg


async def supervised_worker() -> None:
    spec = ChildSpec("worker", Worker)
    backoff = Backoff(initial=0.01, factor=2.0, maximum=0.1)
    try:
        async with open_supervisor(spec, intensity=2, period=1.0, backoff=backoff) as sup:
            worker = sup.actor("worker")
            print("1/4 =", await worker.ask(4))
            try:
                await worker.ask(0)
            except ActorCrashed as exc:
                print("ask(0) failed:", exc, "| cause:", repr(exc.__cause__))
            await worker.status.wait_value(Status.RUNNING)
            print("1/8 =", await worker.ask(8), "(same ref, fresh instance)")
            for _ in range(3):  # the 3rd restart within 1 s is more than intensity 2
                await worker.send(0)
            await trio.sleep_forever()
    except SupervisorGaveUp as exc:
        print("gave up:", exc, "| cause:", repr(exc.__cause__))


class Stage(Actor[int, None]):
    """Works on an item for a while, then passes it on: to the next stage or to ``out``."""

    def __init__(self, seconds: float, next_stage: ActorRef[int, None] | None, out: list[int]):
        self.seconds = seconds
        self.next_stage = next_stage
        self.out = out

    async def receive(self, msg: int) -> None:
        await trio.sleep(self.seconds)
        if self.next_stage is not None:
            await self.next_stage.send(msg)  # waits while the next mailbox is full
        else:
            self.out.append(msg)


async def pipeline() -> None:
    out: list[int] = []
    async with trio.open_nursery() as nursery:
        slow = await spawn(nursery, lambda: Stage(0.01, None, out), mailbox_size=2)
        head = await spawn(nursery, lambda: Stage(0.0, slow, out), mailbox_size=2)
        start = trio.current_time()
        for item in range(10):
            await head.send(item)  # the producer is held back by the slow stage
        # Each stage holds 2 queued + 1 in hand, so the producer runs only a few
        # items ahead of the slow stage: it is paced by it, nothing piles up.
        print(f"  producer done after {trio.current_time() - start:.3f} s")
        # Mailboxes are ordered: once these asks return, every item is through.
        await head.ask(-1)
        await slow.ask(-2)
        print("  delivered in order:", out)
        nursery.cancel_scope.cancel()


async def main() -> None:
    print("== counter")
    await counter()
    print("== supervised worker")
    await supervised_worker()
    print("== pipeline with backpressure")
    with trio.fail_after(5):
        await pipeline()


if __name__ == "__main__":
    trio.run(main)
