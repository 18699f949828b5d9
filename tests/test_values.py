"""The hand-written __init__ of the per-message values equals the dataclass's own.

Data, AckFrame (transport/_frames.py), Ack and Delivery (actors/_outcomes.py)
set their slots through the slot descriptors instead of the generated
``object.__setattr__`` calls. These tests pin that nothing else differs: the
signature and defaults, the value built from any arguments, and frozenness.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import Ack, Delivery
from transport.frames import AckFrame, Data

HAND_WRITTEN: list[type[Any]] = [Data, AckFrame, Ack, Delivery]


def _generated(cls: type[Any]) -> type[Any]:
    """The same fields, with the __init__ that ``dataclass`` writes."""
    return dataclasses.make_dataclass(
        cls.__name__,
        [(f.name, f.type, f) for f in dataclasses.fields(cls)],
        frozen=True,
        slots=True,
    )


@pytest.mark.parametrize("cls", HAND_WRITTEN, ids=lambda c: c.__name__)
def test_the_signature_is_the_dataclass_one(cls: type[Any]) -> None:
    mine = inspect.signature(cls.__init__)
    theirs = inspect.signature(_generated(cls).__init__)
    assert [(p.name, p.kind, p.default) for p in mine.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]
    # The class's own fields, in order, are what the hand-written one sets.
    assert list(mine.parameters)[1:] == [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", HAND_WRITTEN, ids=lambda c: c.__name__)
@given(data=st.data())
def test_it_builds_what_the_dataclass_builds(cls: type[Any], data: st.DataObject) -> None:
    fields = dataclasses.fields(cls)
    cell = st.integers() | st.text(max_size=5) | st.none()
    values = data.draw(st.lists(cell, min_size=len(fields), max_size=len(fields)))
    positional = cls(*values)
    by_name = cls(**{f.name: v for f, v in zip(fields, values, strict=True)})
    twin = _generated(cls)(*values)
    for value in (positional, by_name):
        assert dataclasses.astuple(value) == dataclasses.astuple(twin)
        assert value == cls(*values)
        assert hash(value) == hash(cls(*values))


@pytest.mark.parametrize("cls", HAND_WRITTEN, ids=lambda c: c.__name__)
def test_defaults_apply_and_the_value_stays_frozen(cls: type[Any]) -> None:
    fields = dataclasses.fields(cls)
    required = [f for f in fields if f.default is dataclasses.MISSING]
    value = cls(*range(len(required)))
    for f in fields[len(required) :]:
        assert getattr(value, f.name) == f.default
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, fields[0].name, "changed")
    assert pickle.loads(pickle.dumps(value)) == value
    assert copy.copy(value) == value
    assert dataclasses.replace(value, **{fields[0].name: "other"}) != value
    with pytest.raises(TypeError):
        cls(*range(len(fields) + 1))
