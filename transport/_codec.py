"""CBOR (RFC 8949) encoding of frames, with strict validation on decode.

The wire format is specified once, normatively, in docs/protocol.md: §3.2
holds the CDDL of every frame, §3.3 batches, §3.4 payloads and out-of-band
parts, §3.5 the limits (:class:`Limits`) and §3.6 the reason tokens. This
module implements it:

* :func:`encode` turns a frame or a :class:`Batch` into the parts of one
  ZeroMQ message: a CBOR header, then every binary payload of at least
  ``oob_threshold`` bytes (:data:`OOB_THRESHOLD`) as a part of its own. It
  refuses to produce anything the peer's ``limits`` would reject.
* :func:`decode` accepts exactly what the spec describes and raises
  :class:`RemoteProtocolError` with a §3.6 ``reason`` for everything else,
  before any frame object is built.
* :func:`check_payload` tells a send, before it queues anything, whether a
  payload could travel at all.

What the spec leaves to the Python side: buffers (``bytearray``,
``memoryview``, numpy arrays) travel as their bytes in C order and come back
as ``bytes`` (or as the ``memoryview`` part handed to :func:`decode`); tuples
come back as lists; ``int``/``float``/``str`` subclasses (``IntEnum``,
``numpy.float64``) travel as the plain type; zero-dimensional buffers (numpy
scalars) are refused, since they would arrive as raw bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, NoReturn

import cbor2

from ._errors import LocalProtocolError, RemoteProtocolError
from ._frames import (
    APP_ERR_MIN,
    PROTOCOL_VERSION,
    AckFrame,
    AckItems,
    AckRange,
    Batch,
    Data,
    DataItems,
    ErrCode,
    ErrFrame,
    Frame,
    FrameKind,
    Hello,
    ItemAck,
    ItemErr,
    ItemOutcome,
    MissingItem,
    MissingStatus,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
    StreamStatus,
)

__all__ = ["OOB_THRESHOLD", "OUT_OF_BAND_TAG", "Limits", "decode", "encode"]

#: Our private CBOR tag: its content is the index of a ZeroMQ part. It lies in
#: IANA's first-come-first-served range; only this protocol ever reads it.
OUT_OF_BAND_TAG: Final = 52753

#: Binary payloads of at least this many bytes travel as their own ZeroMQ part.
#: Below it, one copy into the header costs less than another part's framing.
OOB_THRESHOLD: Final = 4096

_U63: Final = 2**63 - 1
_CBOR_INT_MIN: Final = -(2**64)
_CBOR_INT_MAX: Final = 2**64 - 1
_KIB: Final = 1024
_MIB: Final = 1024 * _KIB

#: Beyond this the payload walk and cbor2 would recurse deeper than is sane.
_DEPTH_CEILING: Final = 256


@dataclass(frozen=True, slots=True)
class Limits:
    """What the decoder accepts, and what the encoder refuses to produce.

    Both ends should use the same values: the encoder raises
    :class:`LocalProtocolError` for anything the peer's decoder would reject.

    Attributes:
        max_message_bytes: total size of all parts of one message
            (default 64 MiB).
        max_header_bytes: size of the CBOR part (default 64 KiB). It is
            decoded on the receiver's event loop before anything else can
            run, into Python objects up to ~70 times its size (an empty map
            is one byte), so it is kept small: decoding the worst 64 KiB
            header (nested one-element arrays in a DATA payload) took
            35-60 ms here, a 16 MiB one would take about 18 s. Large
            binary data goes out of band and does not count here.
        max_parts: ZeroMQ parts in one message, header included (default
            4097: a full batch with one out-of-band buffer per frame).
        max_batch: frames in one batch (default 4096).
        max_items: entries of the lists inside REQ and REQ_ANSWER, items of
            a DATA_ITEMS and outcomes of an ACK_ITEMS (default 4096).
        max_depth: containers nested in one payload (default 32); a scalar
            payload has depth 0, ``[1]`` has depth 1. At most 256.
        max_id_bytes: UTF-8 size of node and stream ids (default 256).
        max_detail_bytes: UTF-8 size of an ERR's detail text (default 4096).

    Raises:
        ValueError: a limit is not a positive ``int``, ``max_depth`` is over
            256, or ``max_header_bytes`` is over ``max_message_bytes``.
    """

    max_message_bytes: int = 64 * _MIB
    max_header_bytes: int = 64 * _KIB
    max_parts: int = 4097
    max_batch: int = 4096
    max_items: int = 4096
    max_depth: int = 32
    max_id_bytes: int = 256
    max_detail_bytes: int = 4096

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_depth > _DEPTH_CEILING:
            raise ValueError(f"Limits.max_depth must be at most {_DEPTH_CEILING}")
        if self.max_header_bytes > self.max_message_bytes:
            raise ValueError("Limits.max_header_bytes must not exceed max_message_bytes")


_DEFAULT_LIMITS: Final = Limits()


# --------------------------------------------------------------------------
# Shared checks. They report the problem; each side raises its own error
# class (remote on decode, local on encode). Ints are always tested with
# ``type(v) is int``: ``True`` is an int to ``isinstance``.


def _utf8_size_over(s: str, limit: int) -> bool:
    # A code point takes 1 to 4 UTF-8 bytes: only encode when length is unclear.
    n = len(s)
    if n > limit:
        return True
    if 4 * n <= limit:
        return False
    return len(s.encode("utf-8", "surrogatepass")) > limit


def _id_problem(v: object, limit: int) -> str | None:
    if type(v) is not str:
        return f"must be a str, got {type(v).__name__}"
    if not v:
        return "must not be empty"
    if _utf8_size_over(v, limit):
        return f"is over {limit} UTF-8 bytes"
    return None


_ERR_CODES: Final[dict[int, ErrCode]] = {c.value: c for c in ErrCode}
_RETRY_REASONS: Final[dict[int, RetryReason]] = {r.value: r for r in RetryReason}
_MISSING_STATUSES: Final[dict[int, MissingStatus]] = {s.value: s for s in MissingStatus}


# --------------------------------------------------------------------------
# Decoding


class _BadTag(Exception):
    """Raised inside cbor2 by a tag decoder; cbor2 chains it as the cause."""


class _PartRef:
    """What our out-of-band tag decodes to, until the walk swaps in the part."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _decode_oob_tag(value: object, immutable: bool) -> _PartRef:
    if type(value) is not int:
        raise _BadTag(f"out-of-band tag must hold an int, got {type(value).__name__}")
    return _PartRef(value)


def _reject_tag(value: object, immutable: bool) -> NoReturn:
    raise _BadTag("CBOR tags other than the out-of-band tag are not accepted")


class _TagDecoders(dict[int, Callable[[object, bool], object]]):
    """cbor2 looks every tag up here first; unknown ones hit ``__missing__``.

    Answering every lookup keeps cbor2's built-in decoders (datetime, bignum,
    set, regex, shared references that build cycles, string references...)
    from ever running: the tagged content is decoded as plain data and then
    refused, so no tag constructs an object.
    """

    def __missing__(self, tag: int) -> Callable[[object, bool], object]:
        return _reject_tag


_TAG_DECODERS: Final = _TagDecoders({OUT_OF_BAND_TAG: _decode_oob_tag})

#: Decoded CBOR values that are payload leaves. ``undefined``, simple values
#: and everything else cbor2 can return are not in it.
_LEAF_TYPES: Final = frozenset({type(None), bool, int, float, str, bytes})
_CONTAINERS: Final = frozenset({list, dict})

#: Header nesting around a payload: batch, frame list, frame, the item list
#: of DATA_ITEMS (or an ACK_ITEMS outcome), plus one for the out-of-band tag,
#: which cbor2 counts as a level.
_HEADER_DEPTH: Final = 5


def _remote(message: str, reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=reason)


class _Decoding:
    """Per-message state: the parts and the next out-of-band index expected."""

    __slots__ = ("id_quick", "limits", "next_part", "parts")

    def __init__(self, parts: Sequence[bytes | memoryview], limits: Limits) -> None:
        self.parts = parts
        self.limits = limits
        self.next_part = 1
        # Ids up to this many characters fit max_id_bytes whatever they hold.
        self.id_quick = limits.max_id_bytes // 4

    def part(self, ref: _PartRef) -> bytes | memoryview:
        if ref.index != self.next_part or ref.index >= len(self.parts):
            raise _remote(
                f"out-of-band reference to part {ref.index}, expected part {self.next_part}"
                f" of {len(self.parts) - 1}",
                "bad-part",
            )
        self.next_part += 1
        return self.parts[ref.index]

    def payload(self, value: Any, depth: int) -> Any:
        """Check a decoded payload, swapping parts in for references."""
        t = type(value)
        if t in _LEAF_TYPES:
            return value
        if t is _PartRef:
            return self.part(value)
        if depth >= self.limits.max_depth:
            raise _remote(f"payload nested over {self.limits.max_depth} deep", "too-deep")
        # An empty array or map one level down needs no call: it holds nothing
        # to check, and with the call it was the costliest item per header
        # byte (one byte each: a 64 KiB header of them took 50 ms, now 14).
        empty_ok = depth + 1 < self.limits.max_depth
        if t is list:
            for i, item in enumerate(value):
                if type(item) not in _LEAF_TYPES and not (
                    empty_ok and type(item) in _CONTAINERS and not item
                ):
                    value[i] = self.payload(item, depth + 1)
            return value
        if t is dict:
            for key, item in value.items():
                if type(key) is not str:
                    raise _remote(f"map key must be a str, got {type(key).__name__}", "bad-field")
                if type(item) not in _LEAF_TYPES and not (
                    empty_ok and type(item) in _CONTAINERS and not item
                ):
                    # Replacing the value of an existing key is safe mid-iteration.
                    value[key] = self.payload(item, depth + 1)
            return value
        raise _remote(f"payload holds an unsupported CBOR value ({t.__name__})", "bad-field")


_Decoder = Callable[[Any, _Decoding], Any]


def _bad_field(problem: str) -> RemoteProtocolError:
    return _remote(problem, "bad-field")


def _d_u63(v: Any, st: _Decoding) -> int:
    if type(v) is int and 0 <= v <= _U63:
        return v
    raise _bad_field(f"must be an int in 0..2**63-1, got {type(v).__name__}")


def _d_opt_u63(v: Any, st: _Decoding) -> int | None:
    return None if v is None else _d_u63(v, st)


def _d_bool(v: Any, st: _Decoding) -> bool:
    if type(v) is bool:
        return v
    raise _bad_field(f"must be a bool, got {type(v).__name__}")


def _d_id(v: Any, st: _Decoding) -> str:
    problem = _id_problem(v, st.limits.max_id_bytes)
    if problem is None:
        return v  # type: ignore[no-any-return]
    raise _remote(problem, "too-large" if type(v) is str and v else "bad-field")


def _d_opt_id(v: Any, st: _Decoding) -> str | None:
    return None if v is None else _d_id(v, st)


def _d_payload(v: Any, st: _Decoding) -> Any:
    return st.payload(v, 0)


def _d_detail(v: Any, st: _Decoding) -> str:
    if type(v) is not str:
        raise _bad_field(f"must be a str, got {type(v).__name__}")
    if _utf8_size_over(v, st.limits.max_detail_bytes):
        raise _remote(f"is over {st.limits.max_detail_bytes} UTF-8 bytes", "too-large")
    return v


def _d_err_code(v: Any, st: _Decoding) -> int:
    if type(v) is int:
        code = _ERR_CODES.get(v)
        if code is not None:
            return code
        if APP_ERR_MIN <= v <= _U63:
            return v
    raise _bad_field(f"must be an ErrCode or an int in {APP_ERR_MIN}..2**63-1")


def _d_enum(table: dict[int, Any]) -> _Decoder:
    def check(v: Any, st: _Decoding) -> Any:
        if type(v) is int:
            member = table.get(v)
            if member is not None:
                return member
        raise _bad_field(f"must be one of {sorted(table)}")

    return check


def _d_list(v: Any, st: _Decoding) -> list[Any]:
    if type(v) is not list:
        raise _bad_field(f"must be an array, got {type(v).__name__}")
    if len(v) > st.limits.max_items:
        raise _remote(f"has {len(v)} entries, over {st.limits.max_items}", "too-large")
    return v


def _d_seqs(v: Any, st: _Decoding) -> tuple[int, ...]:
    return tuple([_d_u63(x, st) for x in _d_list(v, st)])


_d_missing_status: Final = _d_enum(_MISSING_STATUSES)


def _d_one_per_item(v: Any, st: _Decoding, what: str) -> list[Any]:
    """A DATA_ITEMS' ``items`` or an ACK_ITEMS' ``outcomes``: 1 to ``max_items`` entries."""
    if type(v) is not list:
        raise _bad_field(f"must be an array, got {type(v).__name__}")
    if not v:
        raise _bad_field(f"must hold at least one {what}")
    if len(v) > st.limits.max_items:
        raise _remote(f"has {len(v)} {what}s, over {st.limits.max_items}", "too-large")
    return v


def _d_items(v: Any, st: _Decoding) -> tuple[Any, ...]:
    v = _d_one_per_item(v, st, "item")
    payload = st.payload
    for i, item in enumerate(v):
        if type(item) not in _LEAF_TYPES:
            v[i] = payload(item, 0)
    return tuple(v)


#: The one "ACK without a result" outcome: shared, as it carries nothing.
_ITEM_ACK: Final = ItemAck(None)


def _d_outcomes(v: Any, st: _Decoding) -> tuple[ItemOutcome, ...]:
    out: list[ItemOutcome] = []
    for x in _d_one_per_item(v, st, "outcome"):
        if x is None:
            out.append(_ITEM_ACK)
            continue
        if type(x) is not list or len(x) != 2:
            raise _bad_field("outcomes must be null, [0, result] or [code, detail]")
        code, value = x
        if type(code) is int and code == 0:
            if value is None:
                raise _bad_field("an ACK without a result is null, not [0, null]")
            out.append(ItemAck(st.payload(value, 0)))
        else:
            out.append(ItemErr(_d_err_code(code, st), _d_detail(value, st)))
    return tuple(out)


def _d_missing_items(v: Any, st: _Decoding) -> tuple[MissingItem, ...]:
    items = []
    for x in _d_list(v, st):
        if type(x) is not list or len(x) != 2:
            raise _bad_field("entries must be [stream_seq, status]")
        items.append(MissingItem(_d_u63(x[0], st), _d_missing_status(x[1], st)))  # type: ignore[arg-type]
    return tuple(items)


def _d_stream_statuses(v: Any, st: _Decoding) -> tuple[StreamStatus, ...]:
    items = []
    for x in _d_list(v, st):
        if type(x) is not list or len(x) != 4:
            raise _bad_field("entries must be [stream, last_sent, in_flight, given_up]")
        items.append(
            StreamStatus(
                _d_id(x[0], st),  # type: ignore[arg-type]
                _d_u63(x[1], st),  # type: ignore[arg-type]
                _d_u63(x[2], st),
                _d_u63(x[3], st),
            )
        )
    return tuple(items)


# --------------------------------------------------------------------------
# Encoding


#: Payload leaves the encoder passes on unchanged without a closer look.
_ENC_PLAIN: Final = frozenset({type(None), bool, float, str})


class _Encoding:
    """Per-message state: the out-of-band parts collected so far."""

    __slots__ = ("id_quick", "limits", "oob", "oob_bytes", "threshold")

    def __init__(self, limits: Limits, threshold: int) -> None:
        self.limits = limits
        self.id_quick = limits.max_id_bytes // 4
        self.threshold = threshold
        self.oob: list[bytes | memoryview] = []
        self.oob_bytes = 0

    def out_of_band(self, buf: bytes | memoryview, nbytes: int) -> cbor2.CBORTag:
        self.oob.append(buf)
        self.oob_bytes += nbytes
        return cbor2.CBORTag(OUT_OF_BAND_TAG, len(self.oob))

    def payload(self, value: Any, depth: int) -> Any:
        """Check a payload; return it with large buffers swapped for tags."""
        t = type(value)
        if t is bytes:
            n = len(value)
            return self.out_of_band(value, n) if n >= self.threshold else value
        if t is int:
            if _CBOR_INT_MIN <= value <= _CBOR_INT_MAX:
                return value
            raise LocalProtocolError(
                "payload ints must lie in -2**64..2**64-1 (CBOR's integer range)"
            )
        if t is str or t is float or t is bool or value is None:
            return value
        if t is list or t is tuple or t is dict:
            if depth >= self.limits.max_depth:
                raise LocalProtocolError(
                    f"payload nested over Limits.max_depth={self.limits.max_depth} deep"
                    " (or it contains itself)"
                )
            if t is dict:
                return self._dict(value, depth + 1)
            return self._sequence(value, depth + 1)
        return self._other(value)

    def _sequence(self, value: list[Any] | tuple[Any, ...], depth: int) -> Any:
        out: list[Any] | None = None
        for i, item in enumerate(value):
            # Inline test for the common leaves: a method call per number adds up.
            new = item if type(item) in _ENC_PLAIN else self.payload(item, depth)
            if out is None and new is not item:
                # Copy only when something changed: most payloads pass as is.
                out = list(value[:i])
            if out is not None:
                out.append(new)
        return value if out is None else out

    def _dict(self, value: dict[Any, Any], depth: int) -> Any:
        out: dict[str, Any] | None = None
        for i, (key, item) in enumerate(value.items()):
            new_key = key
            if type(key) is not str:
                if not isinstance(key, str):
                    raise LocalProtocolError(
                        f"payload map keys must be str, got {type(key).__name__}"
                    )
                new_key = str(key)
            new = item if type(item) in _ENC_PLAIN else self.payload(item, depth)
            if out is None and (new is not item or new_key is not key):
                out = dict(list(value.items())[:i])
            if out is not None:
                out[new_key] = new
        return value if out is None else out

    def _other(self, value: Any) -> Any:
        # Subclasses of the plain types (IntEnum, numpy.float64) travel as them.
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return self.payload(int(value), 0)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str(value)
        try:
            view = memoryview(value)
        except TypeError:
            raise LocalProtocolError(
                f"payloads hold None, bool, int, float, str, bytes, lists, str-keyed dicts"
                f" and buffers; got {type(value).__name__}"
            ) from None
        if view.ndim == 0:
            raise LocalProtocolError(
                f"zero-dimensional buffer ({type(value).__name__}) would travel as raw"
                " bytes: convert it with .item() or wrap it in an array"
            )
        # pyzmq needs one contiguous buffer: a strided view is the one case copied.
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        n = view.nbytes
        if n >= self.threshold:
            return self.out_of_band(view, n)
        return view.tobytes()


_Encoder = Callable[[Any, _Encoding], Any]


def _e_u63(v: Any, st: _Encoding) -> int:
    if type(v) is int and 0 <= v <= _U63:
        return v
    raise LocalProtocolError(f"must be an int in 0..2**63-1, got {v!r}")


def _e_opt_u63(v: Any, st: _Encoding) -> int | None:
    return None if v is None else _e_u63(v, st)


def _e_bool(v: Any, st: _Encoding) -> bool:
    if type(v) is bool:
        return v
    raise LocalProtocolError(f"must be a bool, got {type(v).__name__}")


def _e_id(v: Any, st: _Encoding) -> str:
    problem = _id_problem(v, st.limits.max_id_bytes)
    if problem is None:
        return v  # type: ignore[no-any-return]
    raise LocalProtocolError(f"{problem} (see Limits.max_id_bytes)")


def _e_opt_id(v: Any, st: _Encoding) -> str | None:
    return None if v is None else _e_id(v, st)


def _e_payload(v: Any, st: _Encoding) -> Any:
    return st.payload(v, 0)


def _e_detail(v: Any, st: _Encoding) -> str:
    if type(v) is not str:
        raise LocalProtocolError(f"must be a str, got {type(v).__name__}")
    if _utf8_size_over(v, st.limits.max_detail_bytes):
        raise LocalProtocolError(f"is over Limits.max_detail_bytes={st.limits.max_detail_bytes}")
    return v


def _e_err_code(v: Any, st: _Encoding) -> int:
    if type(v) is ErrCode or (type(v) is int and (v in _ERR_CODES or APP_ERR_MIN <= v <= _U63)):
        return int(v)
    raise LocalProtocolError(f"must be an ErrCode or an int in {APP_ERR_MIN}..2**63-1, got {v!r}")


def _e_enum(table: dict[int, Any]) -> _Encoder:
    enum_type = type(next(iter(table.values())))

    def check(v: Any, st: _Encoding) -> int:
        if type(v) is enum_type or (type(v) is int and v in table):
            return int(v)
        raise LocalProtocolError(f"must be one of {sorted(table)}, got {v!r}")

    return check


def _e_list(v: Any, st: _Encoding) -> Sequence[Any]:
    if type(v) is not tuple:
        raise LocalProtocolError(f"must be a tuple, got {type(v).__name__}")
    if len(v) > st.limits.max_items:
        raise LocalProtocolError(f"has {len(v)} entries, over Limits.max_items")
    return v


def _e_seqs(v: Any, st: _Encoding) -> list[int]:
    return [_e_u63(x, st) for x in _e_list(v, st)]


_e_missing_status: Final = _e_enum(_MISSING_STATUSES)


def _e_items(v: Any, st: _Encoding) -> list[Any]:
    if type(v) is not tuple and type(v) is not list:
        raise LocalProtocolError(f"must be a tuple of payloads, got {type(v).__name__}")
    if not v:
        raise LocalProtocolError("must hold at least one item")
    if len(v) > st.limits.max_items:
        raise LocalProtocolError(f"has {len(v)} items, over Limits.max_items={st.limits.max_items}")
    threshold = st.threshold
    payload = st.payload
    out: list[Any] = []
    append = out.append
    for item in v:
        # Inline test for the usual item, small bytes: a call per item adds up.
        if type(item) is bytes and len(item) < threshold:
            append(item)
        else:
            append(payload(item, 0))
    return out


def _e_outcomes(v: Any, st: _Encoding) -> list[Any]:
    if type(v) is not tuple:
        raise LocalProtocolError(f"must be a tuple, got {type(v).__name__}")
    if not v:
        raise LocalProtocolError("must hold at least one outcome")
    if len(v) > st.limits.max_items:
        raise LocalProtocolError(
            f"has {len(v)} outcomes, over Limits.max_items={st.limits.max_items}"
        )
    out: list[Any] = []
    for x in v:
        t = type(x)
        if t is ItemAck:
            result = x.result
            out.append(None if result is None else [0, st.payload(result, 0)])
        elif t is ItemErr:
            out.append([_e_err_code(x.code, st), _e_detail(x.detail, st)])
        else:
            raise LocalProtocolError(f"entries must be ItemAck or ItemErr, got {t.__name__}")
    return out


def _e_missing_items(v: Any, st: _Encoding) -> list[list[int]]:
    out = []
    for x in _e_list(v, st):
        if type(x) is not MissingItem:
            raise LocalProtocolError(f"entries must be MissingItem, got {type(x).__name__}")
        out.append([_e_u63(x.stream_seq, st), _e_missing_status(x.status, st)])
    return out


def _e_stream_statuses(v: Any, st: _Encoding) -> list[list[Any]]:
    out = []
    for x in _e_list(v, st):
        if type(x) is not StreamStatus:
            raise LocalProtocolError(f"entries must be StreamStatus, got {type(x).__name__}")
        out.append(
            [
                _e_id(x.stream, st),
                _e_u63(x.last_sent, st),
                _e_u63(x.in_flight, st),
                _e_u63(x.given_up, st),
            ]
        )
    return out


# --------------------------------------------------------------------------
# The schema: one table drives both directions, in dataclass field order.
# u63 and id fields, most of every frame, are checked inline by position;
# the others go through their converter pair.

_U63_FIELD: Final = "u63"
_ID_FIELD: Final = "id"

_FieldSpec = tuple[str, "str | tuple[_Decoder, _Encoder]"]


@dataclass(frozen=True, slots=True)
class _Schema:
    kind: FrameKind
    cls: type[Any]
    #: Field names by wire position (position 0 is the kind).
    names: tuple[str, ...]
    u63: tuple[int, ...]
    ids: tuple[int, ...]
    others: tuple[tuple[int, _Decoder, _Encoder], ...]
    getter: Callable[[Any], tuple[Any, ...]]

    def named(self, position: int, problem: str) -> str:
        """Name a field as the wire does (``DATA.seq``), for decode errors."""
        return f"{self.kind.name}.{self.names[position]} {problem}"

    def named_local(self, position: int, problem: str) -> str:
        """Name a field as the caller wrote it (``Data.seq``), for encode errors."""
        return f"{self.cls.__name__}.{self.names[position]} {problem}"


def _schema(kind: FrameKind, cls: type[Any], *fields: _FieldSpec) -> _Schema:
    names = tuple(name for name, _ in fields)
    # Wire order is declaration order: a reordered dataclass must fail loudly here.
    if names != cls.__slots__:
        raise AssertionError(f"{cls.__name__} fields {cls.__slots__} do not match {names}")
    u63, ids, others = [], [], []
    for position, (_, spec) in enumerate(fields, start=1):
        if spec == _U63_FIELD:
            u63.append(position)
        elif spec == _ID_FIELD:
            ids.append(position)
        else:
            assert not isinstance(spec, str)
            others.append((position, *spec))
    return _Schema(
        kind, cls, ("kind", *names), tuple(u63), tuple(ids), tuple(others), attrgetter(*names)
    )


_ANSWER_HEAD: Final[tuple[_FieldSpec, ...]] = (
    ("node", _ID_FIELD),
    ("incarnation", _U63_FIELD),
    ("peer_incarnation", _U63_FIELD),
    ("seq", _U63_FIELD),
    ("credit", _U63_FIELD),
)
_PAYLOAD_FIELD: Final = (_d_payload, _e_payload)
#: The fields DATA and DATA_ITEMS share, before the payload or items.
_DATA_HEAD: Final[tuple[_FieldSpec, ...]] = (
    ("node", _ID_FIELD),
    ("incarnation", _U63_FIELD),
    ("seq", _U63_FIELD),
    ("stream", _ID_FIELD),
    ("stream_seq", _U63_FIELD),
    ("stream_floor", _U63_FIELD),
    ("frame_no", (_d_opt_u63, _e_opt_u63)),
)
_OPT_ID_FIELD: Final = (_d_opt_id, _e_opt_id)

_SCHEMAS: Final = (
    _schema(
        FrameKind.HELLO,
        Hello,
        ("node", _ID_FIELD),
        ("incarnation", _U63_FIELD),
        ("nonce", _U63_FIELD),
        ("reply", (_d_bool, _e_bool)),
        ("version", _U63_FIELD),
    ),
    _schema(
        FrameKind.DATA,
        Data,
        *_DATA_HEAD,
        ("payload", _PAYLOAD_FIELD),
        ("watermark", _U63_FIELD),
    ),
    _schema(
        FrameKind.DATA_ITEMS,
        DataItems,
        *_DATA_HEAD,
        ("items", (_d_items, _e_items)),
        ("watermark", _U63_FIELD),
    ),
    _schema(FrameKind.RECEIVED, Received, *_ANSWER_HEAD),
    _schema(FrameKind.ACK, AckFrame, *_ANSWER_HEAD, ("result", _PAYLOAD_FIELD)),
    _schema(
        FrameKind.ACK_RANGE,
        AckRange,
        ("node", _ID_FIELD),
        ("incarnation", _U63_FIELD),
        ("peer_incarnation", _U63_FIELD),
        ("first", _U63_FIELD),
        ("last", _U63_FIELD),
        ("credit", _U63_FIELD),
    ),
    _schema(
        FrameKind.ACK_ITEMS,
        AckItems,
        *_ANSWER_HEAD,
        ("outcomes", (_d_outcomes, _e_outcomes)),
    ),
    _schema(
        FrameKind.ERR,
        ErrFrame,
        *_ANSWER_HEAD,
        ("code", (_d_err_code, _e_err_code)),
        ("detail", (_d_detail, _e_detail)),
    ),
    _schema(
        FrameKind.RETRY_LATER,
        RetryLater,
        *_ANSWER_HEAD,
        ("reason", (_d_enum(_RETRY_REASONS), _e_enum(_RETRY_REASONS))),
    ),
    _schema(
        FrameKind.REQ,
        Req,
        ("node", _ID_FIELD),
        ("incarnation", _U63_FIELD),
        ("query_id", _U63_FIELD),
        ("stream", _OPT_ID_FIELD),
        ("missing", (_d_seqs, _e_seqs)),
    ),
    _schema(
        FrameKind.REQ_ANSWER,
        ReqAnswer,
        ("node", _ID_FIELD),
        ("incarnation", _U63_FIELD),
        ("query_id", _U63_FIELD),
        ("stream", _OPT_ID_FIELD),
        ("missing", (_d_missing_items, _e_missing_items)),
        ("streams", (_d_stream_statuses, _e_stream_statuses)),
    ),
)

_BY_KIND: Final[dict[int, _Schema]] = {s.kind.value: s for s in _SCHEMAS}
_BY_CLASS: Final[dict[type[Any], _Schema]] = {s.cls: s for s in _SCHEMAS}
#: REQ and REQ_ANSWER: wire positions of ``stream`` and ``missing``.
_ASKS_STREAM: Final = frozenset({FrameKind.REQ.value, FrameKind.REQ_ANSWER.value})
_STREAM_AT: Final = 4
_MISSING_AT: Final = 5
#: ACK_RANGE: wire positions of ``first`` and ``last``.
_ACK_RANGE: Final = FrameKind.ACK_RANGE.value
_FIRST_AT: Final = 4
_LAST_AT: Final = 5
_U63_PROBLEM: Final = "must be an int in 0..2**63-1"


_DATA: Final = FrameKind.DATA.value
_DATA_ITEMS: Final = FrameKind.DATA_ITEMS.value
_HELLO: Final = FrameKind.HELLO.value
#: HELLO: elements up to and including ``version``, and its wire position.
_HELLO_LEN: Final = 6
_VERSION_AT: Final = 5


def _plain_data_fields(
    quick: int,
    node: object,
    inc: object,
    seq: object,
    stream: object,
    stream_seq: object,
    floor: object,
    frame_no: object,
    watermark: object,
) -> bool:
    """Whether DATA's fields (all but the payload) are the common, plainly valid kind.

    One check for both fast paths (encode and decode): ids of at most
    ``quick`` characters (so surely within the byte limit), numbers unsigned
    64-bit ints. False sends the frame through the schema walk instead.
    """
    return (
        type(node) is str
        and 0 < len(node) <= quick
        and type(stream) is str
        and 0 < len(stream) <= quick
        and type(inc) is int
        and type(seq) is int
        and type(stream_seq) is int
        and type(floor) is int
        and type(watermark) is int
        and 0 <= inc <= _U63
        and 0 <= seq <= _U63
        and 0 <= stream_seq <= _U63
        and 0 <= floor <= _U63
        and 0 <= watermark <= _U63
        and (frame_no is None or (type(frame_no) is int and 0 <= frame_no <= _U63))
    )


def _decode_data(item: list[Any], st: _Decoding) -> Data | None:
    """DATA, the frame of every message, checked without the schema walk.

    Returns None for anything unusual (a wrong field, a frame number, a
    container payload is fine): the schema walk then decides, and names the
    field in its error. The accepted set is exactly the walk's.
    """
    if len(item) != 10:
        return None
    _, node, inc, seq, stream, stream_seq, floor, frame_no, payload, watermark = item
    if not _plain_data_fields(
        st.id_quick, node, inc, seq, stream, stream_seq, floor, frame_no, watermark
    ):
        return None
    if type(payload) not in _LEAF_TYPES:
        # The decoded list is ours: the checked payload replaces the raw one.
        item[8] = st.payload(payload, 0)
    return Data(*item[1:])


def _decode_data_items(item: list[Any], st: _Decoding) -> DataItems | None:
    """DATA_ITEMS without the schema walk, as :func:`_decode_data` does DATA."""
    if len(item) != 10:
        return None
    _, node, inc, seq, stream, stream_seq, floor, frame_no, items, watermark = item
    if (
        type(items) is not list
        or not items
        or len(items) > st.limits.max_items
        or not _plain_data_fields(
            st.id_quick, node, inc, seq, stream, stream_seq, floor, frame_no, watermark
        )
    ):
        return None
    leaves = _LEAF_TYPES
    payload = st.payload
    for i, x in enumerate(items):
        if type(x) not in leaves:
            items[i] = payload(x, 0)
    return DataItems(node, inc, seq, stream, stream_seq, floor, frame_no, tuple(items), watermark)


def _drop_hello_extras(item: list[Any], st: _Decoding) -> None:
    """Cut a HELLO of another version down to the layout every version shares.

    protocol.md §3.2: fields after ``version`` belong to that version. This
    decoder cannot read them, but checks them as payloads (their out-of-band
    references count, like any other) so that what it accepts stays exact.
    """
    version = item[_VERSION_AT]
    if type(version) is int and version != PROTOCOL_VERSION:
        for extra in item[_HELLO_LEN:]:
            st.payload(extra, 0)
        del item[_HELLO_LEN:]


def _decode_frame(item: Any, st: _Decoding) -> Frame:
    if type(item) is list and item and type(item[0]) is int:
        kind = item[0]
        if kind == _DATA:
            data = _decode_data(item, st)
            if data is not None:
                return data
        elif kind == _DATA_ITEMS:
            items = _decode_data_items(item, st)
            if items is not None:
                return items
        elif kind == _HELLO and len(item) > _HELLO_LEN:
            _drop_hello_extras(item, st)
    return _decode_by_schema(item, st)


def _decode_by_schema(item: Any, st: _Decoding) -> Frame:
    if type(item) is not list or not item:
        raise _bad_field(f"a frame must be a non-empty array, got {type(item).__name__}")
    kind = item[0]
    if type(kind) is not int:
        raise _remote(f"frame kind must be an int, got {type(kind).__name__}", "unknown-kind")
    schema = _BY_KIND.get(kind)
    if schema is None:
        if kind == FrameKind.BATCH:
            raise _remote("a batch may not contain a batch", "nested-batch")
        raise _remote(f"unknown frame kind {kind}", "unknown-kind")
    if len(item) != len(schema.names):
        raise _bad_field(
            f"{schema.kind.name} has {len(item) - 1} fields, expected {len(schema.names) - 1}"
        )
    # The decoded list is ours: converted values replace raw ones in place.
    for i in schema.u63:
        v = item[i]
        if type(v) is not int or not 0 <= v <= _U63:
            raise _bad_field(schema.named(i, f"{_U63_PROBLEM}, got {type(v).__name__}"))
    quick = st.id_quick
    for i in schema.ids:
        v = item[i]
        if type(v) is not str or not 0 < len(v) <= quick:
            try:
                _d_id(v, st)
            except RemoteProtocolError as exc:
                raise _remote(schema.named(i, str(exc)), exc.reason) from None
    for i, dec, _ in schema.others:
        try:
            item[i] = dec(item[i], st)
        except RemoteProtocolError as exc:
            raise _remote(schema.named(i, str(exc)), exc.reason) from None
    if kind in _ASKS_STREAM and item[_STREAM_AT] is None and item[_MISSING_AT]:
        raise _bad_field(f"{schema.kind.name} lists missing messages but names no stream")
    if kind == _ACK_RANGE and item[_FIRST_AT] > item[_LAST_AT]:
        raise _bad_field("ACK_RANGE.first is above ACK_RANGE.last")
    return schema.cls(*item[1:])  # type: ignore[no-any-return]


def _encode_data(frame: Data | DataItems, st: _Encoding) -> list[Any] | None:
    """DATA or DATA_ITEMS without the schema walk; None when a field needs the walk's checks."""
    node = frame.node
    stream = frame.stream
    inc = frame.incarnation
    seq = frame.seq
    stream_seq = frame.stream_seq
    floor = frame.stream_floor
    frame_no = frame.frame_no
    watermark = frame.watermark
    if not _plain_data_fields(
        st.id_quick, node, inc, seq, stream, stream_seq, floor, frame_no, watermark
    ):
        return None
    if type(frame) is DataItems:
        try:
            items = _e_items(frame.items, st)
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"DataItems.items {exc}") from None
        return [_DATA_ITEMS, node, inc, seq, stream, stream_seq, floor, frame_no, items, watermark]
    payload = frame.payload  # type: ignore[union-attr]
    if type(payload) is bytes:
        if len(payload) >= st.threshold:
            payload = st.out_of_band(payload, len(payload))
    else:
        payload = st.payload(payload, 0)
    return [_DATA, node, inc, seq, stream, stream_seq, floor, frame_no, payload, watermark]


def _encode_frame(frame: Frame, st: _Encoding) -> list[Any]:
    t = type(frame)
    if t is Data or t is DataItems:
        fast = _encode_data(frame, st)  # type: ignore[arg-type]
        if fast is not None:
            return fast
    return _encode_by_schema(frame, st)


def _encode_by_schema(frame: Frame, st: _Encoding) -> list[Any]:
    schema = _BY_CLASS.get(type(frame))
    if schema is None:
        if type(frame) is Batch:
            raise LocalProtocolError("a Batch may not contain a Batch")
        raise LocalProtocolError(f"not a frame: {type(frame).__name__}")
    out: list[Any] = [schema.kind.value, *schema.getter(frame)]
    for i in schema.u63:
        v = out[i]
        if type(v) is not int or not 0 <= v <= _U63:
            raise LocalProtocolError(schema.named_local(i, f"{_U63_PROBLEM}, got {v!r}"))
    quick = st.id_quick
    for i in schema.ids:
        v = out[i]
        if type(v) is not str or not 0 < len(v) <= quick:
            try:
                _e_id(v, st)
            except LocalProtocolError as exc:
                raise LocalProtocolError(schema.named_local(i, str(exc))) from None
    for i, _, enc in schema.others:
        try:
            out[i] = enc(out[i], st)
        except LocalProtocolError as exc:
            raise LocalProtocolError(schema.named_local(i, str(exc))) from None
    if schema.kind.value in _ASKS_STREAM and out[_STREAM_AT] is None and out[_MISSING_AT]:
        raise LocalProtocolError(f"{schema.cls.__name__} lists missing messages: name its stream")
    if schema.kind.value == _ACK_RANGE and out[_FIRST_AT] > out[_LAST_AT]:
        raise LocalProtocolError("AckRange.first must not be above AckRange.last")
    return out


def _decode_error(exc: Exception) -> RemoteProtocolError:
    """Translate anything cbor2 raised into our single error type."""
    if isinstance(exc, cbor2.CBORDecodeEOF):
        return _remote("header ends before its CBOR item does", "truncated")
    if isinstance(exc.__cause__, _BadTag):
        return _remote(str(exc.__cause__), "bad-tag")
    text = str(exc)
    if "nesting depth" in text:
        return _remote(f"header nested too deep: {text}", "too-deep")
    if "map key must be" in text:
        # Well-formed CBOR that breaks §3.4 (keys are text): a field error, as
        # a byte-string key is; cbor2 refuses the other key types while parsing.
        return _remote(f"payload map key must be a str: {text}", "bad-field")
    return _remote(f"not a valid header: {text}", "malformed")


def _nbytes(part: bytes | memoryview) -> int:
    if type(part) is bytes:
        return len(part)
    try:
        return memoryview(part).nbytes
    except TypeError:
        raise LocalProtocolError(
            f"message parts must be bytes-like objects, got {type(part).__name__}"
        ) from None


def decode(parts: Sequence[bytes | memoryview], limits: Limits = _DEFAULT_LIMITS) -> Frame:
    """Turn the parts of one ZeroMQ message into the frame it carries.

    Args:
        parts: the message parts as received: the CBOR header first, then any
            out-of-band buffers. ``bytes``, ``bytearray`` and ``memoryview``
            are accepted.
        limits: what to accept. Sizes are checked before anything is parsed.

    Returns:
        The frame or :class:`Batch`. Out-of-band payloads are the part
        objects themselves, not copies.

    Raises:
        RemoteProtocolError: the message breaks the wire format in any way;
            ``reason`` says how (see the module docstring). Nothing else is
            raised for any content of the parts.
        LocalProtocolError: a part is not a bytes-like object.
    """
    n_parts = len(parts)
    if n_parts == 0:
        raise _remote("message has no header part", "truncated")
    if n_parts > limits.max_parts:
        raise _remote(f"message has {n_parts} parts, over {limits.max_parts}", "too-large")
    header_size = _nbytes(parts[0])
    total = header_size
    if n_parts > 1:
        total += sum([_nbytes(p) for p in parts[1:]])
    if total > limits.max_message_bytes:
        raise _remote(f"message has {total} bytes, over {limits.max_message_bytes}", "too-large")
    if header_size > limits.max_header_bytes:
        raise _remote(
            f"header has {header_size} bytes, over {limits.max_header_bytes}", "too-large"
        )
    # A seekable stream gives cbor2 the whole buffer at once and tells us where
    # the item ended: ``loads`` alone silently ignores trailing bytes.
    stream = io.BytesIO(parts[0])
    try:
        top = cbor2.CBORDecoder(
            stream,
            semantic_decoders=_TAG_DECODERS,
            max_depth=limits.max_depth + _HEADER_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        ).decode()
    except Exception as exc:
        # cbor2 signals bad input with CBORDecodeError but may also raise
        # ValueError, OverflowError or MemoryError: all of it is the peer's fault.
        raise _decode_error(exc) from None
    if stream.tell() != header_size:
        raise _remote(
            f"{header_size - stream.tell()} bytes after the header's CBOR item", "malformed"
        )
    st = _Decoding(parts, limits)
    if type(top) is list and top and type(top[0]) is int and top[0] == FrameKind.BATCH:
        frame: Frame = _decode_batch(top, st)
    else:
        frame = _decode_frame(top, st)
    if st.next_part != n_parts:
        raise _remote(
            f"{n_parts - st.next_part} out-of-band parts are never referenced", "bad-part"
        )
    return frame


def _decode_batch(top: list[Any], st: _Decoding) -> Batch:
    if len(top) != 2 or type(top[1]) is not list:
        raise _bad_field("a batch must be [9, [frame, ...]]")
    items = top[1]
    if not items:
        raise _bad_field("a batch must hold at least one frame")
    if len(items) > st.limits.max_batch:
        raise _remote(f"batch has {len(items)} frames, over {st.limits.max_batch}", "too-large")
    return Batch(tuple([_decode_frame(item, st) for item in items]))


def check_payload(payload: Any, limits: Limits = _DEFAULT_LIMITS, *, items: bool = False) -> None:
    """Raise unless a DATA message could carry ``payload`` to a peer with ``limits``.

    What a send checks before it queues anything: an unencodable payload
    must fail the call that made it, not the link that would carry it.
    Binary payloads cost a type and a size check; anything else is walked
    and its in-band part measured, as :func:`encode` would.

    Args:
        payload: one message's payload, or with ``items`` a DATA_ITEMS
            message's tuple of item payloads.
        limits: the peer's limits.
        items: check ``payload`` as a batch's items.

    Raises:
        LocalProtocolError: the payload holds something CBOR data cannot, is
            nested too deep, or is too large for ``limits``.
    """
    if type(payload) is bytes and not items:
        size = len(payload)
        header = 0
    else:
        st = _Encoding(limits, OOB_THRESHOLD)
        in_band = _e_items(payload, st) if items else st.payload(payload, 0)
        header = len(cbor2.dumps(in_band))
        size = st.oob_bytes
    if header + _DATA_OVERHEAD > limits.max_header_bytes:
        raise LocalProtocolError(
            f"payload needs a {header}-byte header, over Limits.max_header_bytes="
            f"{limits.max_header_bytes}: send large data as bytes or arrays"
        )
    if size + header + _DATA_OVERHEAD > limits.max_message_bytes:
        raise LocalProtocolError(
            f"payload of about {size + header} bytes is over Limits.max_message_bytes="
            f"{limits.max_message_bytes}"
        )


#: Room for a DATA frame's fields around its payload (ids, numbers, stream).
_DATA_OVERHEAD = 1024


def encode(
    frame: Frame,
    *,
    limits: Limits = _DEFAULT_LIMITS,
    oob_threshold: int = OOB_THRESHOLD,
) -> list[bytes | memoryview]:
    """Turn a frame into the parts of one ZeroMQ message.

    Args:
        frame: any frame, or a :class:`Batch` of non-batch frames.
        limits: the peer's limits: nothing it would reject is produced.
        oob_threshold: binary payloads of at least this many bytes become
            their own part instead of being copied into the header.

    Returns:
        The CBOR header, then one part per out-of-band buffer: the caller's
        ``bytes`` object itself, or a byte-format ``memoryview`` of its
        buffer, ready for ``send_multipart(..., copy=False)``. Buffers are
        not copied, so they must not change until the message is sent.

    Raises:
        LocalProtocolError: a field has the wrong type or is out of range, a
            payload holds something CBOR data cannot, or the message would
            exceed ``limits``.
    """
    st = _Encoding(limits, oob_threshold)
    if type(frame) is Batch:
        frames = frame.frames
        if type(frames) is not tuple or not frames:
            raise LocalProtocolError("Batch.frames must be a non-empty tuple of frames")
        if len(frames) > limits.max_batch:
            raise LocalProtocolError(
                f"Batch has {len(frames)} frames, over Limits.max_batch={limits.max_batch}"
            )
        top: list[Any] = [FrameKind.BATCH.value, [_encode_frame(f, st) for f in frames]]
    else:
        top = _encode_frame(frame, st)
    try:
        header = cbor2.dumps(top)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
        # Lone surrogates in a str are the one thing the checks above let by.
        raise LocalProtocolError(f"payload cannot be encoded as CBOR: {exc}") from None
    if len(header) > limits.max_header_bytes:
        raise LocalProtocolError(
            f"header is {len(header)} bytes, over Limits.max_header_bytes: send large"
            " binary data as bytes or arrays so it goes out of band"
        )
    if len(header) + st.oob_bytes > limits.max_message_bytes:
        raise LocalProtocolError(
            f"message is {len(header) + st.oob_bytes} bytes,"
            f" over Limits.max_message_bytes={limits.max_message_bytes}"
        )
    if len(st.oob) + 1 > limits.max_parts:
        raise LocalProtocolError(
            f"message needs {len(st.oob) + 1} parts, over Limits.max_parts={limits.max_parts}"
        )
    return [header, *st.oob]
