"""The CBOR codec: round trips for every frame, and strict, crash-free decoding.

The fuzz properties follow h11's harness: whatever the bytes, the decoder
either returns a valid frame or raises RemoteProtocolError, nothing else.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import ipaddress
import math
import re
import uuid
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport import (
    PROTOCOL_VERSION,
    ErrCode,
    Incarnation,
    LinkSeq,
    LocalProtocolError,
    NodeId,
    RemoteProtocolError,
    StreamId,
    StreamSeq,
)
from transport._codec import (
    OOB_THRESHOLD,
    OUT_OF_BAND_TAG,
    Limits,
    _decode_by_schema,
    _decode_data,
    _decode_frame,
    _Decoding,
    _encode_by_schema,
    _encode_data,
    _Encoding,
    check_payload,
    decode,
    encode,
)
from transport.frames import (
    AckFrame,
    AckItems,
    AckRange,
    Batch,
    Data,
    DataItems,
    ErrFrame,
    Frame,
    Hello,
    ItemAck,
    ItemErr,
    MissingItem,
    MissingStatus,
    Received,
    Req,
    ReqAnswer,
    RetryLater,
    RetryReason,
    StreamStatus,
)

U63 = 2**63 - 1
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------
# Strategies

ids = st.text(min_size=1, max_size=12)
u63 = st.integers(0, U63)
small_bytes = st.binary(max_size=64)
large_bytes = st.binary(min_size=OOB_THRESHOLD, max_size=OOB_THRESHOLD + 300)
arrays = st.builds(
    lambda n, dtype: np.arange(n, dtype=dtype),
    st.integers(0, 700),
    st.sampled_from([np.float64, np.int32, np.uint8]),
)
buffers = st.one_of(
    large_bytes,
    arrays,
    st.binary(max_size=5000).map(bytearray),
    st.binary(max_size=5000).map(lambda b: memoryview(b)),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    small_bytes,
)
payloads = st.recursive(
    st.one_of(scalars, buffers),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

hellos = st.builds(Hello, ids, u63, u63, st.booleans(), u63)
datas = st.builds(Data, ids, u63, u63, ids, u63, u63, st.none() | u63, payloads, u63)
receiveds = st.builds(Received, ids, u63, u63, u63, u63)
acks = st.builds(AckFrame, ids, u63, u63, u63, u63, payloads)
ack_ranges = st.builds(
    lambda node, inc, peer_inc, a, b, credit: AckRange(
        node, inc, peer_inc, min(a, b), max(a, b), credit
    ),
    ids,
    u63,
    u63,
    u63,
    u63,
    u63,
)
err_codes = st.sampled_from(list(ErrCode)) | st.integers(100, U63)
errs = st.builds(ErrFrame, ids, u63, u63, u63, u63, err_codes, st.text(max_size=40))
retries = st.builds(RetryLater, ids, u63, u63, u63, u63, st.sampled_from(list(RetryReason)))
seq_tuples = st.lists(u63, max_size=5).map(tuple)
reqs = st.one_of(
    st.builds(Req, ids, u63, u63, st.none(), st.just(())),
    st.builds(Req, ids, u63, u63, ids, seq_tuples),
)
missing_items = st.lists(
    st.builds(MissingItem, u63, st.sampled_from(list(MissingStatus))), max_size=4
).map(tuple)
stream_statuses = st.lists(st.builds(StreamStatus, ids, u63, u63, u63), max_size=4).map(tuple)
req_answers = st.one_of(
    st.builds(ReqAnswer, ids, u63, u63, st.none(), st.just(()), stream_statuses),
    st.builds(ReqAnswer, ids, u63, u63, ids, missing_items, stream_statuses),
)
data_items = st.builds(
    DataItems,
    ids,
    u63,
    u63,
    ids,
    u63,
    u63,
    st.none() | u63,
    st.lists(payloads, min_size=1, max_size=4).map(tuple),
    u63,
)
item_outcomes = st.one_of(
    st.builds(ItemAck, st.none() | payloads),
    st.builds(ItemErr, err_codes, st.text(max_size=20)),
)
ack_items = st.builds(
    AckItems, ids, u63, u63, u63, u63, st.lists(item_outcomes, min_size=1, max_size=5).map(tuple)
)
single_frames = st.one_of(
    hellos,
    datas,
    data_items,
    receiveds,
    acks,
    ack_ranges,
    ack_items,
    errs,
    retries,
    reqs,
    req_answers,
)
batches = st.lists(single_frames, min_size=1, max_size=6).map(lambda fs: Batch(tuple(fs)))
frames = st.one_of(single_frames, batches)


def normalise(value: Any) -> Any:
    """What a payload looks like after the trip: buffers as bytes, tuples as lists."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


def expected(frame: Frame) -> Frame:
    if isinstance(frame, Batch):
        return Batch(tuple(expected(f) for f in frame.frames))
    if isinstance(frame, Data):
        return Data(**{**_fields(frame), "payload": normalise(frame.payload)})
    if isinstance(frame, AckFrame):
        return AckFrame(**{**_fields(frame), "result": normalise(frame.result)})
    if isinstance(frame, DataItems):
        items = tuple(normalise(item) for item in frame.items)
        return DataItems(**{**_fields(frame), "items": items})
    if isinstance(frame, AckItems):
        outcomes = tuple(
            ItemAck(normalise(o.result)) if isinstance(o, ItemAck) else o for o in frame.outcomes
        )
        return AckItems(**{**_fields(frame), "outcomes": outcomes})
    return frame


def _fields(frame: Frame) -> dict[str, Any]:
    return {name: getattr(frame, name) for name in type(frame).__slots__}


def wire(parts: list[bytes | memoryview]) -> list[bytes]:
    """The parts as a peer receives them: plain bytes."""
    return [bytes(p) for p in parts]


def data(payload: Any = b"hi", **changes: Any) -> Data:
    fields: dict[str, Any] = {
        "node": NodeId("n1"),
        "incarnation": Incarnation(7),
        "seq": LinkSeq(1),
        "stream": StreamId("halo"),
        "stream_seq": StreamSeq(1),
        "stream_floor": StreamSeq(1),
        "frame_no": None,
        "payload": payload,
        "watermark": LinkSeq(0),
    }
    fields.update(changes)
    return Data(**fields)


def raw_data(payload: Any = b"hi") -> list[Any]:
    """A DATA header as a plain list, for hand-made bad encodings."""
    return [2, "n1", 7, 1, "halo", 1, 1, None, payload, 0]


def reject(parts: list[bytes], limits: Limits | None = None) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        decode(parts, limits or Limits())
    return info.value.reason


def reject_header(header: Any, *extra: bytes) -> str:
    return reject([cbor2.dumps(header), *extra])


def decode_or_reject(parts: list[bytes]) -> None:
    """The fuzz invariant: a valid frame that re-encodes to itself, or our error."""
    try:
        frame = decode(parts)
    except RemoteProtocolError as exc:
        reason = exc.reason
    else:
        assert decode(wire(encode(frame))) == frame
        return
    assert reason in REASONS


REASONS = {
    "too-large",
    "truncated",
    "too-deep",
    "malformed",
    "bad-tag",
    "bad-part",
    "unknown-kind",
    "nested-batch",
    "bad-field",
}

# --------------------------------------------------------------------------
# Round trips


@ROUND_TRIP
@given(frames)
def test_every_frame_round_trips(frame: Frame) -> None:
    assert decode(wire(encode(frame))) == expected(frame)


@ROUND_TRIP
@given(frames)
def test_round_trip_with_memoryview_parts(frame: Frame) -> None:
    # pyzmq with copy=False hands out memoryviews: they decode the same way.
    parts = [memoryview(p) for p in wire(encode(frame))]
    assert decode(parts) == expected(frame)


def test_enums_come_back_as_enums() -> None:
    err = ErrFrame(NodeId("a"), Incarnation(1), Incarnation(2), LinkSeq(3), LinkSeq(4), 2, "x")
    decoded = decode(encode(err))
    assert isinstance(decoded, ErrFrame)
    assert decoded.code is ErrCode.NO_HANDLER
    app = decode(
        encode(
            ErrFrame(NodeId("a"), Incarnation(1), Incarnation(2), LinkSeq(3), LinkSeq(4), 150, "")
        )
    )
    assert isinstance(app, ErrFrame)
    assert app.code == 150
    retry = decode(
        encode(
            RetryLater(
                NodeId("a"),
                Incarnation(1),
                Incarnation(2),
                LinkSeq(3),
                LinkSeq(4),
                RetryReason.BUFFER_FULL,
            )
        )
    )
    assert isinstance(retry, RetryLater)
    assert retry.reason is RetryReason.BUFFER_FULL


def test_ack_range_is_one_compact_array() -> None:
    run = AckRange(
        NodeId("n1"), Incarnation(7), Incarnation(8), LinkSeq(3), LinkSeq(130), LinkSeq(300)
    )
    assert cbor2.loads(encode(run)[0]) == [10, "n1", 7, 8, 3, 130, 300]
    assert decode(encode(run)) == run
    single = AckRange(
        NodeId("n1"), Incarnation(7), Incarnation(8), LinkSeq(3), LinkSeq(3), LinkSeq(300)
    )
    assert decode(encode(single)) == single
    with pytest.raises(LocalProtocolError, match="first"):
        encode(
            AckRange(
                NodeId("n1"), Incarnation(7), Incarnation(8), LinkSeq(4), LinkSeq(3), LinkSeq(9)
            )
        )


def test_hello_carries_the_protocol_version() -> None:
    assert PROTOCOL_VERSION == 1
    hello = Hello(NodeId("n1"), Incarnation(7), 3, False)
    assert hello.version == PROTOCOL_VERSION
    assert cbor2.loads(encode(hello)[0]) == [1, "n1", 7, 3, False, 1]
    other = Hello(NodeId("n1"), Incarnation(7), 3, True, 2)
    assert decode(encode(other)) == other
    assert decode([cbor2.dumps([1, "n1", 7, 3, True, U63])]).version == U63  # type: ignore[union-attr]


def test_hello_of_another_version_may_carry_more_fields() -> None:
    # protocol.md §3.2: the layout up to ``version`` is frozen; what follows
    # belongs to that version, and a version 1 decoder checks it as payloads
    # and drops it.
    future = [1, "n1", 7, 3, True, 2, "capabilities", {"x": [1, 2.5, None]}]
    assert decode([cbor2.dumps(future)]) == Hello(NodeId("n1"), Incarnation(7), 3, True, 2)
    ref = cbor2.CBORTag(OUT_OF_BAND_TAG, 1)
    assert decode([cbor2.dumps([*future, ref]), b"part"]) == Hello(
        NodeId("n1"), Incarnation(7), 3, True, 2
    )
    # Its references count like any other: in order, none dangling.
    batch = [9, [[*future, ref], raw_data(cbor2.CBORTag(OUT_OF_BAND_TAG, 2))]]
    got = decode([cbor2.dumps(batch), b"hello's", b"data's"])
    assert type(got) is Batch
    assert got.frames[1].payload == b"data's"  # type: ignore[union-attr]
    assert reject_header([*future, ref]) == "bad-part"
    assert reject_header(future, b"unreferenced") == "bad-part"
    assert reject_header([*future, cbor2.undefined]) == "bad-field"
    assert reject_header([*future, {1: 2}]) == "bad-field"
    assert reject_header([*future, cbor2.CBORTag(1, 0)]) == "bad-tag"


def test_header_is_a_compact_array() -> None:
    ack = AckFrame(NodeId("n1"), Incarnation(7), Incarnation(8), LinkSeq(9), LinkSeq(10))
    assert cbor2.loads(encode(ack)[0]) == [4, "n1", 7, 8, 9, 10, None]
    batch = Batch((ack, ack))
    assert cbor2.loads(encode(batch)[0]) == [9, [[4, "n1", 7, 8, 9, 10, None]] * 2]


def test_large_bytes_go_out_of_band_without_copy() -> None:
    big = bytes(range(256)) * 32
    parts = encode(data({"a": big, "b": [b"small", big]}))
    assert len(parts) == 3
    assert parts[1] is big
    assert parts[2] is big
    assert len(parts[0]) < 100
    decoded = decode(parts)
    assert isinstance(decoded, Data)
    assert decoded.payload == {"a": big, "b": [b"small", big]}
    assert decoded.payload["a"] is parts[1]


def test_numpy_arrays_travel_as_their_buffer() -> None:
    grid = np.arange(2048, dtype=np.float64).reshape(32, 64)
    parts = encode(data(grid))
    assert len(parts) == 2
    oob = parts[1]
    assert isinstance(oob, memoryview)
    exporter: object = oob.obj
    assert exporter is grid
    decoded = decode(wire(parts))
    assert isinstance(decoded, Data)
    assert np.array_equal(np.frombuffer(decoded.payload, np.float64).reshape(32, 64), grid)


def test_strided_array_is_sent_in_c_order() -> None:
    grid = np.arange(4096, dtype=np.int32).reshape(64, 64)
    column_major = grid.T
    decoded = decode(wire(encode(data([column_major, grid[:, 0]]))))
    assert isinstance(decoded, Data)
    assert decoded.payload == [column_major.tobytes(), grid[:, 0].tobytes()]


def test_small_buffers_are_inlined() -> None:
    parts = encode(data([bytearray(b"ab"), memoryview(b"cd"), np.zeros(3, np.uint8)]))
    assert len(parts) == 1
    decoded = decode(parts)
    assert isinstance(decoded, Data)
    assert decoded.payload == [b"ab", b"cd", b"\0\0\0"]


def test_threshold_is_adjustable() -> None:
    assert len(encode(data(b"x" * 10), oob_threshold=10)) == 2
    assert len(encode(data(b"x" * 9), oob_threshold=10)) == 1


def test_nan_and_infinities_round_trip_in_payloads() -> None:
    decoded = decode(encode(data([math.nan, math.inf, -math.inf])))
    assert isinstance(decoded, Data)
    assert math.isnan(decoded.payload[0])
    assert decoded.payload[1:] == [math.inf, -math.inf]


def test_plain_type_subclasses_travel_as_plain_types() -> None:
    decoded = decode(encode(data({"code": ErrCode.NO_HANDLER, "x": np.float64(1.5)})))
    assert isinstance(decoded, Data)
    assert decoded.payload == {"code": 2, "x": 1.5}
    assert type(decoded.payload["code"]) is int
    assert type(decoded.payload["x"]) is float


# --------------------------------------------------------------------------
# Fuzzing: bytes and parts from nowhere, and mutated valid messages


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_remote_protocol_error(blob: bytes) -> None:
    decode_or_reject([blob])


@FUZZ
@given(st.lists(st.binary(max_size=60), max_size=4))
def test_random_part_lists_only_raise_remote_protocol_error(parts: list[bytes]) -> None:
    decode_or_reject(parts)


cbor_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**65), 2**65),
        st.floats(),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.just(cbor2.undefined),
        st.integers(0, 255).filter(lambda n: not 20 <= n <= 31).map(cbor2.CBORSimpleValue),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=3) | st.integers(0, 3), inner, max_size=3),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 28, 29, 258, OUT_OF_BAND_TAG]), inner),
    ),
    max_leaves=8,
)


@FUZZ
@given(st.lists(cbor_values, max_size=11), st.integers(1, 12))
def test_random_cbor_arrays_only_raise_remote_protocol_error(items: list[Any], kind: int) -> None:
    # Well-formed CBOR with a real kind gets past the parser into the checks.
    decode_or_reject([cbor2.dumps([kind, *items])])


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    parts = wire(encode(draw(frames)))
    header = bytearray(parts[0])
    how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append", "parts"]))
    if how == "flip":
        i = draw(st.integers(0, len(header) - 1))
        header[i] ^= draw(st.integers(1, 255))
    elif how == "insert":
        i = draw(st.integers(0, len(header)))
        header[i:i] = draw(st.binary(min_size=1, max_size=4))
    elif how == "delete":
        i = draw(st.integers(0, len(header) - 1))
        del header[i : i + draw(st.integers(1, 4))]
    elif how == "truncate":
        del header[draw(st.integers(0, len(header) - 1)) :]
    elif how == "append":
        header += draw(st.binary(min_size=1, max_size=4))
    else:
        extra = draw(st.lists(st.binary(max_size=8), max_size=2))
        keep = draw(st.integers(0, len(parts) - 1))
        return [bytes(header), *parts[1 : 1 + keep], *extra]
    return [bytes(header), *parts[1:]]


@FUZZ
@given(mutated())
def test_mutated_encodings_only_raise_remote_protocol_error(parts: list[bytes]) -> None:
    decode_or_reject(parts)


def _replace_one(value: Any, path: list[int], new: Any) -> Any:
    if not path:
        return new
    if isinstance(value, list) and value:
        i = path[0] % len(value)
        return [*value[:i], _replace_one(value[i], path[1:], new), *value[i + 1 :]]
    return new


@FUZZ
@given(frames, st.lists(st.integers(0, 20), min_size=1, max_size=4), cbor_values)
def test_retyped_elements_only_raise_remote_protocol_error(
    frame: Frame, path: list[int], new: Any
) -> None:
    parts = wire(encode(frame))
    header = cbor2.loads(parts[0], semantic_decoders={OUT_OF_BAND_TAG: cbor2.CBORTag})
    changed = _replace_one(header, path, new)
    decode_or_reject([cbor2.dumps(changed), *parts[1:]])


# --------------------------------------------------------------------------
# Tags: only ours, and none of them ever builds an object


STANDARD_TAGS = [
    *range(6),
    *range(16, 40),
    256, 257, 258, 259, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269, 270, 271,
    1001, 1002, 1003, 1004, 1040, 22098, 55799, 55800, 55801,
    OUT_OF_BAND_TAG - 1, OUT_OF_BAND_TAG + 1, 2**32, 2**64 - 1,
]  # fmt: skip


@pytest.mark.parametrize("tag", STANDARD_TAGS)
@pytest.mark.parametrize("content", [0, "2024-01-01T00:00:00Z", b"\x01" * 16, [1, 2], {"a": 1}])
def test_every_other_tag_is_rejected(tag: int, content: Any) -> None:
    assert reject_header(raw_data(cbor2.CBORTag(tag, content))) == "bad-tag"
    assert reject_header(cbor2.CBORTag(tag, raw_data())) == "bad-tag"


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        decimal.Decimal("1.5"),
        fractions.Fraction(1, 3),
        uuid.UUID(int=5),
        {1, 2},
        frozenset({"a"}),
        re.compile("a+"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_network("10.0.0.0/8"),
        2**70,
        -(2**70),
        complex(1, 2),
    ],
    ids=repr,
)
def test_values_cbor2_would_build_are_rejected(value: Any) -> None:
    assert reject_header(raw_data(value)) == "bad-tag"


def test_shared_references_cannot_build_cycles() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    header = cbor2.dumps(raw_data(cyclic), value_sharing=True)
    assert reject([header]) == "bad-tag"


def test_string_references_are_rejected() -> None:
    header = cbor2.dumps(raw_data(["repeated text", "repeated text"]), string_referencing=True)
    assert reject([header]) == "bad-tag"


def test_self_described_cbor_marker_is_rejected() -> None:
    assert reject([b"\xd9\xd9\xf7" + cbor2.dumps(raw_data())]) == "bad-tag"


def test_out_of_band_tag_must_hold_an_int() -> None:
    assert reject_header(raw_data(cbor2.CBORTag(OUT_OF_BAND_TAG, "1")), b"x") == "bad-tag"
    assert reject_header(raw_data(cbor2.CBORTag(OUT_OF_BAND_TAG, True)), b"x") == "bad-tag"


@pytest.mark.parametrize(
    ("payload", "extra"),
    [
        (cbor2.CBORTag(OUT_OF_BAND_TAG, 1), []),
        (cbor2.CBORTag(OUT_OF_BAND_TAG, 0), [b"x"]),
        (cbor2.CBORTag(OUT_OF_BAND_TAG, 2), [b"x"]),
        (cbor2.CBORTag(OUT_OF_BAND_TAG, -1), [b"x"]),
        (b"inline", [b"unreferenced"]),
        ([cbor2.CBORTag(OUT_OF_BAND_TAG, 1)] * 2, [b"x"]),
        ([cbor2.CBORTag(OUT_OF_BAND_TAG, 2), cbor2.CBORTag(OUT_OF_BAND_TAG, 1)], [b"x", b"y"]),
    ],
)
def test_out_of_band_references_must_match_the_parts(payload: Any, extra: list[bytes]) -> None:
    assert reject_header(raw_data(payload), *extra) == "bad-part"


def test_tag_in_a_header_field_is_a_bad_field() -> None:
    ref = cbor2.CBORTag(OUT_OF_BAND_TAG, 1)
    header = raw_data()
    header[1] = ref
    assert reject_header(header, b"x") == "bad-field"
    header = raw_data()
    header[3] = ref
    assert reject_header(header, b"x") == "bad-field"
    # protocol.md §3.6: outside a payload position it is bad-field wherever it
    # stands, but where the frame kind belongs, where it is unknown-kind.
    assert reject_header(ref, b"x") == "bad-field"
    assert reject_header([9, ref], b"x") == "bad-field"
    assert reject_header([9, [ref]], b"x") == "bad-field"
    assert reject_header([7, "n", 1, 2, "s", [ref]], b"x") == "bad-field"
    assert reject_header([ref, "n", 1, 2, False, 1], b"x") == "unknown-kind"


# --------------------------------------------------------------------------
# Limits: sizes before parsing, depth without recursion


def test_oversize_is_rejected_before_parsing() -> None:
    limits = Limits(max_message_bytes=100, max_header_bytes=50)
    garbage = b"\xff" * 51  # not even CBOR: only a size check can reject it so
    assert reject([garbage], limits) == "too-large"
    assert reject([b"\xff" * 10, b"x" * 91], limits) == "too-large"
    assert reject([b"\xff"] * 10, Limits(max_parts=9)) == "too-large"


def test_oversize_header_and_message_at_the_limit_pass() -> None:
    header = cbor2.dumps(raw_data(b"x" * 20))
    limits = Limits(max_message_bytes=len(header), max_header_bytes=len(header))
    assert decode([header], limits) == data(b"x" * 20)


def test_deep_nesting_is_rejected_without_recursion_error() -> None:
    # Far deeper than Python's recursion limit, within the 64 KiB header limit.
    for header in (b"\x81" * 60_000 + b"\x00", b"\xa1\x61a" * 20_000 + b"\x00"):
        assert reject([header]) == "too-deep"
    deep: Any = 0
    for _ in range(1000):
        deep = {"k": [deep]}
    assert reject_header([9, [raw_data(), raw_data(deep)]]) == "too-deep"


@pytest.mark.parametrize("in_batch", [False, True])
def test_payload_depth_limit_is_exact(in_batch: bool) -> None:
    limits = Limits(max_depth=5)

    def nested(depth: int) -> Any:
        value: Any = cbor2.CBORTag(OUT_OF_BAND_TAG, 1)
        for _ in range(depth):
            value = [value]
        return value

    def parts(depth: int) -> list[bytes]:
        header = raw_data(nested(depth))
        return [cbor2.dumps([9, [header]] if in_batch else header), b"oob"]

    frame = decode(parts(5), limits)
    assert isinstance(frame, Batch | Data)
    assert reject(parts(6), limits) == "too-deep"


def test_encoder_refuses_too_deep_and_cyclic_payloads() -> None:
    deep: Any = 1
    for _ in range(33):
        deep = [deep]
    with pytest.raises(LocalProtocolError, match="max_depth"):
        encode(data(deep))
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(LocalProtocolError, match="contains itself"):
        encode(data(cyclic))
    assert decode(encode(data(deep[0]))) == data(deep[0])


@given(payloads)
def test_check_payload_passes_what_encode_takes(payload: Any) -> None:
    check_payload(payload)
    check_payload((payload, b"x"), items=True)
    encode(data(payload))


def test_check_payload_refuses_what_a_send_must_not_queue() -> None:
    with pytest.raises(LocalProtocolError, match="got object"):
        check_payload(object())
    with pytest.raises(LocalProtocolError, match="got set"):
        check_payload({"cells": {1, 2}})
    deep: Any = 1
    for _ in range(33):
        deep = [deep]
    with pytest.raises(LocalProtocolError, match="max_depth"):
        check_payload(deep)
    small = Limits(max_message_bytes=64 * 1024, max_header_bytes=8 * 1024)
    check_payload(b"x" * 60_000, small)
    with pytest.raises(LocalProtocolError, match="max_message_bytes"):
        check_payload(b"x" * 70_000, small)
    with pytest.raises(LocalProtocolError, match="max_message_bytes"):
        check_payload(np.zeros(70_000, dtype=np.uint8), small)
    with pytest.raises(LocalProtocolError, match="max_header_bytes"):
        check_payload({"row": list(range(5000))}, small)
    # A batch's items: each is checked as a payload of its own, their sizes add up.
    check_payload((deep[0], b"y"), items=True)
    with pytest.raises(LocalProtocolError, match="max_message_bytes"):
        check_payload((b"x" * 40_000, b"x" * 40_000), small, items=True)
    with pytest.raises(LocalProtocolError, match="got object"):
        check_payload((b"ok", object()), items=True)


def test_length_limits() -> None:
    limits = Limits(max_id_bytes=8, max_detail_bytes=10, max_items=3, max_batch=2)
    too_long_id = raw_data()
    too_long_id[1] = "é" * 5  # 5 characters, 10 UTF-8 bytes
    assert reject([cbor2.dumps(too_long_id)], limits) == "too-large"
    assert reject([cbor2.dumps([5, "n", 1, 2, 3, 4, 1, "x" * 11])], limits) == "too-large"
    assert reject([cbor2.dumps([7, "n", 1, 2, "s", [1, 2, 3, 4]])], limits) == "too-large"
    assert reject([cbor2.dumps([9, [raw_data()] * 3])], limits) == "too-large"
    assert decode([cbor2.dumps([9, [raw_data()] * 2])], limits) == Batch((data(), data()))
    with pytest.raises(LocalProtocolError, match="max_id_bytes"):
        encode(data(node=NodeId("é" * 5)), limits=limits)
    with pytest.raises(LocalProtocolError, match="max_batch"):
        encode(Batch((data(),) * 3), limits=limits)
    with pytest.raises(LocalProtocolError, match="max_message_bytes"):
        encode(
            data(b"x" * 200),
            limits=Limits(max_message_bytes=100, max_header_bytes=100),
            oob_threshold=10,
        )
    with pytest.raises(LocalProtocolError, match="max_parts"):
        encode(data([b"x" * 10] * 3), limits=Limits(max_parts=3), oob_threshold=10)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_depth": 0},
        {"max_depth": 257},
        {"max_batch": -1},
        {"max_parts": True},
        {"max_header_bytes": 10, "max_message_bytes": 5},
    ],
)
def test_bad_limits_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Limits"):
        Limits(**changes)


# --------------------------------------------------------------------------
# Structure and field checks


@pytest.mark.parametrize(
    "header",
    [[0, "n"], [13], [-1], [2**64 - 1], ["DATA"], [True, "n", 1, 2, False], [2.0, *raw_data()[1:]]],
    ids=repr,
)
def test_unknown_kind(header: list[Any]) -> None:
    assert reject_header(header) == "unknown-kind"


def test_batch_in_batch() -> None:
    assert reject_header([9, [raw_data(), [9, [raw_data()]]]]) == "nested-batch"
    with pytest.raises(LocalProtocolError, match="Batch may not contain a Batch"):
        encode(Batch((data(), Batch((data(),)))))


@pytest.mark.parametrize("header", [[9, []], [9], [9, [], []], [9, "frames"], [9, {"a": 1}]])
def test_malformed_batches(header: list[Any]) -> None:
    assert reject_header(header) == "bad-field"


def test_encoder_refuses_an_empty_batch() -> None:
    with pytest.raises(LocalProtocolError, match="non-empty"):
        encode(Batch(()))


@pytest.mark.parametrize("position", [2, 3, 5, 6, 7, 9])
@pytest.mark.parametrize("bad", [True, False, -1, 2**63, 1.0, "1", None, b"\x01", [1]])
def test_int_fields_reject_everything_but_u63(position: int, bad: Any) -> None:
    if position == 7 and bad is None:
        return  # frame_no is optional
    header = raw_data()
    header[position] = bad
    assert reject_header(header) == "bad-field"


def test_bool_is_never_an_int_on_encode() -> None:
    with pytest.raises(LocalProtocolError, match=r"Data\.seq"):
        encode(data(seq=True))
    with pytest.raises(LocalProtocolError, match=r"Hello\.reply"):
        encode(Hello(NodeId("n"), Incarnation(1), 5, 1))  # type: ignore[arg-type]
    assert reject_header([1, "n", 1, 5, 1, PROTOCOL_VERSION]) == "bad-field"


@pytest.mark.parametrize("bad", ["", 1, None, b"n1", ["n1"]])
def test_ids_must_be_non_empty_text(bad: Any) -> None:
    header = raw_data()
    header[1] = bad
    assert reject_header(header) == "bad-field"
    header = raw_data()
    header[4] = bad
    assert reject_header(header) == "bad-field"


@pytest.mark.parametrize(
    "header",
    [
        raw_data()[:-1],
        [*raw_data(), 0],
        [5, "n", 1, 2, 3, 4, 50, "code 50 is reserved"],
        [5, "n", 1, 2, 3, 4, 0, ""],
        [5, "n", 1, 2, 3, 4, True, ""],
        [5, "n", 1, 2, 3, 4, 1, b"detail"],
        [6, "n", 1, 2, 3, 4, 3],
        [6, "n", 1, 2, 3, 4, True],
        [7, "n", 1, 2, None, [1]],
        [7, "n", 1, 2, "s", [-1]],
        [8, "n", 1, 2, None, [[1, 1]], []],
        [8, "n", 1, 2, "s", [[1, 6]], []],
        [8, "n", 1, 2, "s", [[1]], []],
        [8, "n", 1, 2, "s", [], [["s", 1, 2]]],
        [8, "n", 1, 2, "s", [], [["", 1, 2, 3]]],
        [8, "n", 1, 2, "s", [], "streams"],
        [1, "n", 1, 2, None],
        [4, "n", 1, 2, 3, 4],
        [10, "n", 1, 2, 5, 4, 9],
        [10, "n", 1, 2, 3, 4],
        [10, "n", 1, 2, 3, -4, 9],
        "not an array",
        5,
        [],
        {"kind": 2},
        [1, "n", 1, 2, True],
        [1, "n", 1, 2, True, PROTOCOL_VERSION, "a version 1 HELLO has six elements"],
        [1, "n", 1, 2, True, -1],
        [1, "n", 1, 2, True, 2**63],
        [1, "n", 1, 2, True, True],
        [1, "n", 1, 2, True, None],
        [1, "n", 1, 2, True, "2", "more"],
    ],
    ids=repr,
)
def test_field_shapes_and_ranges(header: Any) -> None:
    assert reject_header(header) == "bad-field"


@pytest.mark.parametrize(
    "payload",
    [
        cbor2.undefined,
        cbor2.CBORSimpleValue(16),
        [cbor2.CBORSimpleValue(255)],
        {"a": cbor2.undefined},
    ],
    ids=repr,
)
def test_undefined_and_simple_values_are_rejected(payload: Any) -> None:
    assert reject_header(raw_data(payload)) == "bad-field"


@pytest.mark.parametrize("key", [1, -1, 1.5, b"k", True, None, (1,)])
def test_map_keys_must_be_text(key: Any) -> None:
    # protocol.md §3.6: well-formed CBOR with a non-text key is a field error,
    # whether cbor2 refuses the key while parsing (int) or our walk does (bytes).
    assert reject_header(raw_data({key: 1})) == "bad-field"
    assert reject_header(raw_data([{"ok": {key: 1}}])) == "bad-field"


@pytest.mark.parametrize(
    "header",
    [
        cbor2.dumps(raw_data()) + b"\x00",  # a second item after the header
        b"\x9f\x02\xff",  # indefinite-length array
        b"\x8a\x02\x62n1\x07\x01\x64halo\x01\x01\xf6\x5f\x41a\xff\x00",  # indefinite bytes
        b"\x8a\x02\x62\xff\xfe\x07\x01\x64halo\x01\x01\xf6\x40\x00",  # invalid UTF-8 id
        b"\x8a\x02\x62n1\x07\x01\x64halo\x01\x01\xf6\xa2\x61a\x01\x61a\x02\x00",  # dup key
        b"\xff",  # a lone break
    ],
)
def test_malformed_cbor(header: bytes) -> None:
    assert reject([header]) == "malformed"


@pytest.mark.parametrize(
    "header", [b"", b"\x8a\x02", cbor2.dumps(raw_data())[:-1], b"\x9b" + b"\xff" * 8]
)
def test_truncated(header: bytes) -> None:
    assert reject([header]) == "truncated"


def test_no_parts_at_all() -> None:
    assert reject([]) == "truncated"


def test_non_bytes_parts_are_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="bytes-like"):
        decode(["text"])  # type: ignore[list-item]


# --------------------------------------------------------------------------
# Encoder refusals: misuse is a LocalProtocolError with a message to act on


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({1, 2}, "got set"),
        (object(), "got object"),
        (2**64, "CBOR's integer range"),
        ([-(2**64) - 1], "CBOR's integer range"),
        (np.float32(1.5), "zero-dimensional"),
        (np.int64(3), "zero-dimensional"),
        ({1: "x"}, "map keys must be str"),
        ("\udcff", "cannot be encoded"),
    ],
    ids=repr,
)
def test_encoder_refuses_what_cbor_data_cannot_hold(payload: Any, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode(data(payload))


@pytest.mark.parametrize(
    "frame",
    [
        data(seq=LinkSeq(-1)),
        data(watermark=LinkSeq(2**63)),
        data(node=NodeId("")),
        data(stream=None),
        data(frame_no="3"),
        ErrFrame(NodeId("n"), Incarnation(1), Incarnation(2), LinkSeq(3), LinkSeq(4), 42, "x"),
        ErrFrame(NodeId("n"), Incarnation(1), Incarnation(2), LinkSeq(3), LinkSeq(4), 100, b"x"),  # type: ignore[arg-type]
        RetryLater(NodeId("n"), Incarnation(1), Incarnation(2), LinkSeq(3), LinkSeq(4), 7),  # type: ignore[arg-type]
        Req(NodeId("n"), Incarnation(1), 1, None, (StreamSeq(1),)),
        Req(NodeId("n"), Incarnation(1), 1, StreamId("s"), [1]),  # type: ignore[arg-type]
        ReqAnswer(NodeId("n"), Incarnation(1), 1, StreamId("s"), ((1, 1),), ()),  # type: ignore[arg-type]
        "not a frame",
    ],
    ids=repr,
)
def test_encoder_refuses_invalid_frames(frame: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode(frame)


#: DATA fields as the wire or a caller might give them: valid and invalid mixed.
_any_field = st.one_of(
    u63,
    st.integers(-3, -1),
    st.just(U63 + 1),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.text(min_size=60, max_size=70),
    st.binary(max_size=4),
    st.floats(allow_nan=False),
)


@st.composite
def data_fields(draw: st.DrawFn) -> list[Any]:
    """The nine DATA fields, valid, then up to two replaced or one added/removed."""
    fields: list[Any] = [
        draw(ids),
        draw(u63),
        draw(u63),
        draw(ids),
        draw(u63),
        draw(u63),
        draw(st.none() | u63),
        # Payloads as the decoder returns them (lists, not tuples).
        draw(st.none() | st.integers(-5, 5) | st.text(max_size=3) | st.lists(u63, max_size=2)),
        draw(u63),
    ]
    for _ in range(draw(st.integers(0, 2))):
        fields[draw(st.integers(0, 8))] = draw(_any_field)
    change = draw(st.sampled_from(["none", "none", "add", "remove"]))
    if change == "add":
        fields.append(draw(_any_field))
    elif change == "remove":
        fields.pop()
    return fields


@settings(max_examples=300, deadline=None)
@given(data_fields())
def test_data_fast_paths_agree_with_the_schema_walk(fields: list[Any]) -> None:
    # The hot DATA paths must accept exactly what the table-driven walk
    # accepts, and build the same thing; anything else goes to the walk.
    limits = Limits(max_id_bytes=64)
    raw = [2, *fields]
    try:
        fast = _decode_data(list(raw), _Decoding([b""], limits))
    except RemoteProtocolError:
        # A bad payload: the walk refuses it too (it checks the same way).
        with pytest.raises(RemoteProtocolError):
            _decode_by_schema(list(raw), _Decoding([b""], limits))
        return
    try:
        walked: Any = _decode_by_schema(list(raw), _Decoding([b""], limits))
    except RemoteProtocolError:
        walked = None
    # The fast path may pass a frame on to the walk (None), never disagree.
    if fast is not None:
        assert fast == walked
    if walked is None:
        assert fast is None
    if len(fields) != 9:
        return
    frame = Data(*fields)
    encoded = _encode_data(frame, _Encoding(limits, OOB_THRESHOLD))
    try:
        walked = _encode_by_schema(frame, _Encoding(limits, OOB_THRESHOLD))
    except LocalProtocolError:
        walked = None
    if encoded is not None:
        assert encoded == walked
    if walked is None:
        assert encoded is None


def test_data_fast_paths_refuse_each_bad_field_as_the_walk_does() -> None:
    limits = Limits(max_id_bytes=64)
    good: list[Any] = ["node", 5, 6, "stream", 7, 8, None, b"p", 9]
    bad_values: list[Any] = [-1, U63 + 1, True, None, 1.5, "", "x" * 65, b"b", [1]]
    for position in range(9):
        for bad in bad_values:
            fields = list(good)
            fields[position] = bad
            raw = [2, *fields]
            try:
                walked: Any = _decode_by_schema(list(raw), _Decoding([b""], limits))
            except RemoteProtocolError:
                walked = None
            fast = _decode_data(list(raw), _Decoding([b""], limits))
            assert fast == walked or fast is None, (position, bad)
            assert walked is not None or fast is None, (position, bad)
            frame = Data(*fields)
            try:
                encoded: Any = _encode_by_schema(frame, _Encoding(limits, OOB_THRESHOLD))
            except LocalProtocolError:
                encoded = None
            fast_encoded = _encode_data(frame, _Encoding(limits, OOB_THRESHOLD))
            assert fast_encoded == encoded or fast_encoded is None, (position, bad)
            assert encoded is not None or fast_encoded is None, (position, bad)


# --------------------------------------------------------------------------
# DATA_ITEMS and ACK_ITEMS (batch sends)


def raw_items(*items: Any) -> list[Any]:
    """A DATA_ITEMS header as a plain list."""
    return [11, "n1", 7, 1, "halo", 1, 1, None, list(items), 0]


def test_data_items_is_one_compact_array_and_round_trips() -> None:
    frame = DataItems(
        NodeId("n1"),
        Incarnation(7),
        LinkSeq(1),
        StreamId("halo"),
        StreamSeq(1),
        StreamSeq(1),
        None,
        (b"a" * 64, 3, [1.5], {"k": None}, b"x" * OOB_THRESHOLD),
        LinkSeq(0),
    )
    parts = encode(frame)
    assert len(parts) == 2  # the large item went out of band
    assert cbor2.loads(parts[0])[:8] == [11, "n1", 7, 1, "halo", 1, 1, None]
    assert decode(wire(parts)) == expected(frame)


def test_ack_items_outcomes_on_the_wire() -> None:
    frame = AckItems(
        NodeId("b"),
        Incarnation(2),
        Incarnation(1),
        LinkSeq(5),
        LinkSeq(300),
        (ItemAck(None), ItemAck([1, 2]), ItemErr(417, "no"), ItemErr(ErrCode.COMPUTE_FAILED, "x")),
    )
    header = cbor2.loads(encode(frame)[0])
    assert header == [12, "b", 2, 1, 5, 300, [None, [0, [1, 2]], [417, "no"], [1, "x"]]]
    decoded = decode(wire(encode(frame)))
    assert decoded == frame
    assert isinstance(decoded, AckItems)
    assert decoded.outcomes[3] == ItemErr(ErrCode.COMPUTE_FAILED, "x")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (raw_items(), "bad-field"),  # an empty batch
        ([11, "n1", 7, 1, "halo", 1, 1, None, b"p", 0], "bad-field"),  # items not an array
        ([11, "n1", 7, 1, "halo", 1, 1, None, [b"p"]], "bad-field"),  # a field short
        (raw_items(cbor2.undefined), "bad-field"),
        ([12, "b", 2, 1, 5, 300, []], "bad-field"),  # no outcomes
        ([12, "b", 2, 1, 5, 300, [[0, None]]], "bad-field"),  # ACK without result is null
        ([12, "b", 2, 1, 5, 300, [[50, "reserved"]]], "bad-field"),
        ([12, "b", 2, 1, 5, 300, [[417]]], "bad-field"),
        ([12, "b", 2, 1, 5, 300, [[417, 5]]], "bad-field"),
        ([12, "b", 2, 1, 5, 300, [True]], "bad-field"),
        ([12, "b", 2, 1, 5, 300, None], "bad-field"),
    ],
)
def test_malformed_items_frames(header: list[Any], reason: str) -> None:
    assert reject_header(header) == reason


def test_items_count_limit_on_both_sides() -> None:
    limits = Limits(max_items=3)
    assert isinstance(decode([cbor2.dumps(raw_items(1, 2, 3))], limits), DataItems)
    assert reject([cbor2.dumps(raw_items(1, 2, 3, 4))], limits) == "too-large"
    assert reject([cbor2.dumps([12, "b", 2, 1, 5, 300, [None] * 4])], limits) == "too-large"
    frame = decode([cbor2.dumps(raw_items(1, 2, 3))], limits)
    assert isinstance(frame, DataItems)
    too_many = DataItems(**{**_fields(frame), "items": (1, 2, 3, 4)})
    with pytest.raises(LocalProtocolError, match=r"DataItems\.items has 4 items"):
        encode(too_many, limits=limits)
    with pytest.raises(LocalProtocolError, match="at least one item"):
        encode(DataItems(**{**_fields(frame), "items": ()}))
    with pytest.raises(LocalProtocolError, match="ItemAck or ItemErr"):
        encode(
            AckItems(NodeId("b"), Incarnation(1), Incarnation(1), LinkSeq(1), LinkSeq(1), (None,))
        )  # type: ignore[arg-type]


def test_items_payload_depth_limit_is_exact_in_a_batch() -> None:
    # One more level of header (the item list) must not cost an item any depth.
    limits = Limits(max_depth=5)

    def nested(depth: int) -> Any:
        value: Any = cbor2.CBORTag(OUT_OF_BAND_TAG, 1)
        for _ in range(depth):
            value = [value]
        return value

    ok = decode([cbor2.dumps([9, [raw_items(nested(5))]]), b"oob"], limits)
    assert isinstance(ok, Batch)
    assert reject([cbor2.dumps([9, [raw_items(nested(6))]]), b"oob"], limits) == "too-deep"


def test_data_items_fast_path_agrees_with_the_schema_walk() -> None:
    limits = Limits(max_id_bytes=64, max_items=4)
    good: list[Any] = ["node", 5, 6, "stream", 7, 8, None, [b"p", [1]], 9]
    bad_values: list[Any] = [-1, U63 + 1, True, None, 1.5, "", "x" * 65, b"b", [], [1] * 5]
    cases = [good] + [
        [*good[:position], bad, *good[position + 1 :]]
        for position in range(9)
        for bad in bad_values
    ]
    for fields in cases:
        raw = [11, *fields]
        try:
            walked: Any = _decode_by_schema(list(raw), _Decoding([b""], limits))
        except RemoteProtocolError:
            walked = None
        try:
            fast: Any = _decode_frame(list(raw), _Decoding([b""], limits))
        except RemoteProtocolError:
            fast = None
        assert fast == walked, fields
