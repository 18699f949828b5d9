"""A faster ``__init__`` for the frozen, slotted dataclasses built per message.

A frozen dataclass's generated ``__init__`` sets each field with
``object.__setattr__(self, name, value)``: a generic attribute lookup by name
for every field. About 1 µs for a 9-field :class:`Data` against 0.2 µs for the
same class without ``frozen=True`` (Python 3.11, docs/performance.md), and the
links build several such values per confirmed message (frames, protocol
events, outcomes). The ``__init__`` made here calls each slot's member
descriptor directly instead, which is what ``object.__setattr__`` ends up
doing, without the lookup: about half the cost. The class stays what it was:
same fields, signature, defaults, equality, hash, repr, pickling, and still
frozen (assignment raises ``FrozenInstanceError``); only the body of
``__init__`` differs, so this module imports nothing beyond ``dataclasses``
and may serve the sans-IO core.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Give a frozen, slotted dataclass an ``__init__`` that sets slots directly.

    Use it above ``@dataclass(frozen=True, slots=True)``. Only plain fields
    are supported; anything else is refused rather than half-served.

    Args:
        cls: the dataclass.

    Returns:
        ``cls`` itself, its ``__init__`` replaced.

    Raises:
        TypeError: ``cls`` is not a frozen dataclass with slots, or it has a
            ``__post_init__``, a ``default_factory``, an ``init=False``, a
            keyword-only field or an ``InitVar`` that this ``__init__`` would
            not honour.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen dataclass with slots=True")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__, which fast_init would skip")
    # Every pseudo-field (InitVar, ClassVar) included; fields() leaves those out.
    all_fields: dict[str, Any] = cls.__dict__["__dataclass_fields__"]
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if len(fields) != len(all_fields):
        raise TypeError(
            f"{cls.__name__} has an InitVar or a ClassVar, which fast_init does not support"
        )
    namespace: dict[str, Any] = {}
    params_src: list[str] = []
    body: list[str] = []
    for index, field in enumerate(fields):
        if not field.init or field.kw_only or field.default_factory is not dataclasses.MISSING:
            raise TypeError(
                f"{cls.__name__}.{field.name}: only plain fields (init, positional, no "
                "default_factory) are supported by fast_init"
            )
        # The member descriptor that slots=True made for the field.
        namespace[f"_set_{index}"] = getattr(cls, field.name).__set__
        if field.default is dataclasses.MISSING:
            params_src.append(field.name)
        else:
            namespace[f"_default_{index}"] = field.default
            params_src.append(f"{field.name}=_default_{index}")
        body.append(f"    _set_{index}(self, {field.name})\n")
    header = f"def __init__(self, {', '.join(params_src)}):\n"
    source = header + ("".join(body) or "    pass\n")
    # How the dataclasses module builds __init__ too: one function per class, no loop.
    exec(source, namespace)
    init = namespace["__init__"]
    original = cls.__init__
    init.__qualname__ = original.__qualname__
    init.__module__ = original.__module__
    init.__annotations__ = dict(original.__annotations__)
    init.__doc__ = original.__doc__
    type.__setattr__(cls, "__init__", init)
    return cls
