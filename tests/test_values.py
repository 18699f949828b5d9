"""fast_init: the per-message values' faster __init__ changes nothing but the speed."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from dataclasses import FrozenInstanceError, InitVar, dataclass, field
from typing import Any, ClassVar

import pytest

from actors import Ack as AckOutcome
from actors import Delivery
from transport import (
    Ack,
    AckRange,
    Answered,
    Batch,
    Data,
    Deliver,
    Hello,
    Incarnation,
    LinkSeq,
    NodeId,
    StreamId,
    StreamSeq,
    fast_init,
)


@dataclass(frozen=True, slots=True)
class _Plain:
    a: int
    b: str
    c: Any = None
    d: tuple[int, ...] = ()


@fast_init
@dataclass(frozen=True, slots=True)
class _Fast:
    a: int
    b: str
    c: Any = None
    d: tuple[int, ...] = ()


def test_same_signature_as_the_generated_init() -> None:
    assert str(inspect.signature(_Fast)) == str(inspect.signature(_Plain))
    assert inspect.signature(_Fast).parameters["c"].default is None


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1, "x"), {}), ((1, "x", [2]), {}), ((), {"b": "y", "a": 2, "d": (1, 2)}), ((3,), {"b": ""})],
)
def test_fields_defaults_and_value_semantics_match(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    fast, plain = _Fast(*args, **kwargs), _Plain(*args, **kwargs)
    assert dataclasses.astuple(fast) == dataclasses.astuple(plain)
    assert repr(fast).removeprefix("_Fast") == repr(plain).removeprefix("_Plain")
    assert fast == _Fast(*args, **kwargs)
    assert fast != _Fast(99, "other")
    if type(fast.c) is not list:
        assert hash(fast) == hash(_Fast(*args, **kwargs))
    assert pickle.loads(pickle.dumps(fast)) == fast
    assert copy.deepcopy(fast) == fast
    assert dataclasses.replace(fast, a=7) == _Fast(7, fast.b, fast.c, fast.d)


def test_still_frozen() -> None:
    value = _Fast(1, "x")
    with pytest.raises(FrozenInstanceError):
        value.a = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del value.b
    assert value.a == 1


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1,), {}), ((1, "x", 2, 3, 4), {}), ((1, "x"), {"a": 2}), ((1, "x"), {"e": 1})],
)
def test_bad_calls_raise_type_error_like_the_generated_init(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        _Plain(*args, **kwargs)
    with pytest.raises(TypeError):
        _Fast(*args, **kwargs)


def test_refuses_what_it_would_not_honour() -> None:
    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class NoInit:
        a: int = field(init=False, default=0)

    @dataclass(frozen=True, slots=True)
    class KwOnly:
        a: int = field(kw_only=True)

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: InitVar[int]

    @dataclass(frozen=True, slots=True)
    class WithClassVar:
        a: int
        b: ClassVar[int] = 0

    for cls in (NotFrozen, NoSlots, PostInit, Factory, NoInit, KwOnly, WithInitVar, WithClassVar):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_the_hot_values_are_built_right() -> None:
    node, inc, peer_inc = NodeId("a"), Incarnation(5), Incarnation(6)
    data = Data(
        node, inc, LinkSeq(3), StreamId("s"), StreamSeq(2), StreamSeq(1), None, b"p", LinkSeq(1)
    )
    assert (data.seq, data.stream_seq, data.stream_floor, data.payload, data.watermark) == (
        3,
        2,
        1,
        b"p",
        1,
    )
    ack = Ack(node, inc, peer_inc, LinkSeq(3), LinkSeq(300))
    assert ack.result is None
    assert ack.credit == 300
    assert Ack(node, inc, peer_inc, LinkSeq(3), LinkSeq(300), result=[1]).result == [1]
    ack_range = AckRange(node, inc, peer_inc, LinkSeq(1), LinkSeq(9), LinkSeq(300))
    assert (ack_range.first, ack_range.last) == (1, 9)
    assert Batch((data, ack)).frames == (data, ack)
    assert Hello(node, inc, 7, reply=True).reply is True
    assert Answered(LinkSeq(3), ack).answer is ack
    deliver = Deliver(node, inc, LinkSeq(3), StreamId("s"), StreamSeq(2), StreamSeq(1), 4, b"p")
    assert (deliver.seq, deliver.frame_no, deliver.payload) == (3, 4, b"p")
    outcome = AckOutcome(node, LinkSeq(3), StreamId("s"), StreamSeq(2), None, 0.5, 1)
    assert (outcome.rtt, outcome.attempts) == (0.5, 1)
    delivery = Delivery(
        peer=node,
        stream=StreamId("s"),
        stream_seq=StreamSeq(2),
        frame_no=None,
        payload=b"",
        seq=LinkSeq(3),
    )
    assert delivery.seq == 3
    assert delivery.payload == b""
    # Ordinary messages are item 0 and not a batch; constructors that predate
    # batches keep working unchanged.
    assert delivery.item == 0
    assert deliver.items is False
    values: tuple[Any, ...] = (data, ack, ack_range, deliver, outcome, delivery)
    for value in values:
        with pytest.raises(FrozenInstanceError):
            setattr(value, dataclasses.fields(value)[0].name, None)
