"""SendHandle: its trio.Event is made only when a wait has to sleep; nothing else changes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors import Ack, DeliveryFailed, PeerError, SendHandle
from transport import LinkSeq, NodeId, StreamId, StreamSeq


def _handle() -> SendHandle:
    return SendHandle(NodeId("b"), LinkSeq(7), StreamId("s"), StreamSeq(3), sent_at=0.0)


def _ack() -> Ack:
    return Ack(NodeId("b"), LinkSeq(7), StreamId("s"), StreamSeq(3), None, 0.25, 1)


async def test_settled_before_wait_returns_at_once_and_is_still_a_checkpoint() -> None:
    handle = _handle()
    handle._settle(_ack(), None)
    assert handle.done
    with trio.testing.assert_checkpoints():
        assert await handle.wait() == _ack()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await handle.wait()


async def test_every_waiter_wakes_with_the_outcome(autojump_clock: trio.abc.Clock) -> None:
    handle = _handle()
    got: list[Ack] = []

    async def waiter() -> None:
        got.append(await handle.wait())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.sleep(1.0)
        assert got == []
        handle._settle(_ack(), None)
    assert got == [_ack()] * 3
    assert trio.current_time() == 1.0


async def test_a_cancelled_wait_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    handle = _handle()
    with trio.move_on_after(1.0):
        await handle.wait()
    assert not handle.done
    handle._settle(None, PeerError(peer=NodeId("b"), seq=LinkSeq(7), code=100, detail="no"))
    with pytest.raises(PeerError) as caught:
        await handle.wait()
    assert caught.value.code == 100
    assert trio.current_time() == 1.0


async def test_give_up_wakes_a_sleeping_waiter(autojump_clock: trio.abc.Clock) -> None:
    handle = _handle()
    handle.held = True

    async def give_up_later() -> None:
        await trio.sleep(2.0)
        handle._give_up("deadline passed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(give_up_later)
        with pytest.raises(DeliveryFailed) as caught:
            await handle.wait()
    assert caught.value.held
    assert trio.current_time() == 2.0
