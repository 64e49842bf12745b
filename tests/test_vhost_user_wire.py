"""The vhost-user codec and session tables (livemig.wire.vhost_user), without any I/O.

Every decoder input runs three ways (whole, one byte at a time, with trailing bytes);
Hypothesis checks decode(encode(x)) == x and that random bytes either parse or raise
livemig's own error; the session table is checked pair by pair.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import LimitExceeded, StreamFormatError, VhostUserError
from livemig.limits import MAX_VHOST_USER_PAYLOAD
from livemig.wire import vhost_user as vu
from livemig.wire.vhost_user import (
    NEED_DATA,
    REPLY_FLAGS,
    U64,
    BackendSession,
    DeviceConfig,
    DeviceStateTransfer,
    FrontendSession,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageDecoder,
    ProtocolFeature,
    RawPayload,
    Request,
    SessionState,
    SingleMemoryRegion,
    VringAddress,
    VringState,
    encode_message,
    reply,
)

R = Request
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
regions = st.builds(MemoryRegion, u64, u64, u64, u64)

_PAYLOADS = {
    vu._Kind.NONE: st.none(),
    vu._Kind.U64: st.builds(U64, u64),
    vu._Kind.STATE: st.builds(VringState, u32, u32),
    vu._Kind.ADDR: st.builds(VringAddress, u32, u32, u64, u64, u64, u64),
    vu._Kind.MEM_TABLE: st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    vu._Kind.REGION: st.builds(SingleMemoryRegion, regions),
    vu._Kind.LOG: st.builds(LogDescription, u64, u64),
    vu._Kind.CONFIG: st.builds(DeviceConfig, u32, u32, st.binary(max_size=256)),
    vu._Kind.DEVICE_STATE: st.builds(DeviceStateTransfer, u32, u32),
    vu._Kind.RAW: st.builds(RawPayload, st.binary(max_size=64)),
}


@st.composite
def requests(draw: st.DrawFn) -> Message:
    req = draw(st.sampled_from(sorted(vu.REQUEST_PAYLOAD)))
    payload = draw(_PAYLOADS[vu.REQUEST_PAYLOAD[req]])
    flags = draw(st.sampled_from([0x1, 0x9]))
    return Message(req, flags, payload)


@st.composite
def replies(draw: st.DrawFn) -> Message:
    req = draw(st.sampled_from(list(Request)))
    kind = vu.REPLY_PAYLOAD.get(req, vu._Kind.U64)
    if req in (R.SET_MEM_TABLE, R.ADD_MEM_REG):
        kind = vu._Kind.U64
    payload = draw(_PAYLOADS[kind])
    if req == R.SET_DEVICE_STATE_FD:
        payload = U64(draw(st.integers(0, 0xFF)) | 0x100)
    if isinstance(payload, RawPayload) and len(payload.data) == 8:
        payload = RawPayload(payload.data + b"x")  # 8 bytes would read back as a u64
    return reply(req, payload)


def with_fds(msg: Message) -> Message:
    """``msg`` with as many (fake) descriptors as it must carry."""
    lo, _ = vu.fd_range(msg)
    return Message(msg.request, msg.flags, msg.payload, tuple(range(100, 100 + lo)))


def decode_all(msgs: list[Message] | bytes, *, replies: bool, step: int | None = None,
               trailing: bytes = b"") -> list[Message]:
    """Feed the encoded messages (each with its fds on its first byte) whole or in
    ``step``-byte pieces; return what the decoder yields."""
    d = MessageDecoder(replies=replies)
    segments: list[tuple[bytes, tuple[int, ...]]] = []
    if isinstance(msgs, bytes):
        segments = [(msgs, ())]
    else:
        segments = [(encode_message(m), m.fds) for m in msgs]
    segments.append((trailing, ()))
    out: list[Message] = []
    for data, fds in segments:
        pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
        for i, c in enumerate(pieces):
            d.feed(c, fds if i == 0 else ())
            while (m := d.next_message()) is not NEED_DATA:
                assert isinstance(m, Message)
                out.append(m)
    assert d.buffered == len(trailing) or isinstance(msgs, bytes)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(requests().map(with_fds), min_size=1, max_size=5))
def test_request_round_trip_three_ways(msgs: list[Message]) -> None:
    assert decode_all(msgs, replies=False) == msgs
    assert decode_all(msgs, replies=False, step=1) == msgs
    assert decode_all(msgs, replies=False, trailing=b"\x01\x00\x00") == msgs


@settings(max_examples=300, deadline=None)
@given(replies())
def test_reply_round_trip(msg: Message) -> None:
    msg = with_fds(msg)
    assert decode_all([msg], replies=True) == [msg]
    assert decode_all([msg], replies=True, step=1) == [msg]


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200), st.booleans(), st.integers(1, 16))
def test_fuzz_parse_or_livemig_error(data: bytes, replies_: bool, step: int) -> None:
    with contextlib.suppress(StreamFormatError):
        decode_all(data, replies=replies_, step=step)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(Request)), st.integers(0, 0xF), st.binary(max_size=300))
def test_fuzz_wellformed_headers(req: Request, flags: int, body: bytes) -> None:
    data = struct.pack("<III", req, flags, len(body)) + body
    for replies_ in (False, True):
        with contextlib.suppress(StreamFormatError):
            decode_all(data, replies=replies_)


def test_size_checked_against_limit_before_reading() -> None:
    d = MessageDecoder(replies=False)
    d.feed(struct.pack("<III", R.GET_FEATURES, 1, MAX_VHOST_USER_PAYLOAD + 1))
    with pytest.raises(LimitExceeded, match="limit"):
        d.next_message()
    with pytest.raises(LimitExceeded):  # poisoned
        d.next_message()


@pytest.mark.parametrize(("header", "match"), [
    ((99, 1, 0), "unknown request 99"),
    ((R.GET_FEATURES, 0x11, 0), "unknown flag bits"),
    ((R.GET_FEATURES, 0x2, 0), "protocol version 2"),
    ((R.GET_FEATURES, 0x5, 0), "a reply where the front-end speaks"),
    ((R.SET_FEATURES, 1, 4), "u64 payload of 4 bytes"),
])
def test_bad_headers(header: tuple[int, int, int], match: str) -> None:
    d = MessageDecoder(replies=False)
    d.feed(struct.pack("<III", *header) + b"\0" * header[2])
    with pytest.raises(VhostUserError, match=match):
        d.next_message()


def test_mem_table_region_limit_and_size() -> None:
    d = MessageDecoder(replies=False)
    d.feed(struct.pack("<IIIII", R.SET_MEM_TABLE, 1, 8, 9, 0))
    with pytest.raises(LimitExceeded, match="9 memory regions"):
        d.next_message()
    d = MessageDecoder(replies=False)
    d.feed(struct.pack("<IIIII", R.SET_MEM_TABLE, 1, 8, 1, 0))
    with pytest.raises(VhostUserError, match="for 1 regions"):
        d.next_message()


def test_fds_attach_to_first_byte() -> None:
    call = encode_message(Message(R.SET_VRING_CALL, 1, U64(0)))
    d = MessageDecoder(replies=False)
    d.feed(call[:1], fds=[42])
    assert d.next_message() is NEED_DATA
    d.feed(call[1:])
    m = d.next_message()
    assert isinstance(m, Message) and m.fds == (42,)


def test_fds_mid_message_refused_and_kept_for_closing() -> None:
    call = encode_message(Message(R.SET_VRING_CALL, 1, U64(0)))
    d = MessageDecoder(replies=False)
    d.feed(call[:5])
    d.feed(call[5:], fds=[7])
    with pytest.raises(VhostUserError, match="must come with its first byte"):
        d.next_message()
    assert d.take_fds() == [7]


def test_fd_count_checked() -> None:
    d = MessageDecoder(replies=False)
    d.feed(encode_message(Message(R.SET_VRING_CALL, 1, U64(0))))  # no fd, no NOFD bit
    with pytest.raises(VhostUserError, match="0 file descriptors, expected 1"):
        d.next_message()
    d = MessageDecoder(replies=False)
    d.feed(encode_message(Message(R.SET_VRING_CALL, 1, U64(0x100))))
    assert isinstance(d.next_message(), Message)
    d = MessageDecoder(replies=False)
    d.feed(encode_message(Message(R.GET_FEATURES)), fds=[3])
    with pytest.raises(VhostUserError, match="1 file descriptors, expected 0"):
        d.next_message()
    assert d.take_fds() == [3]


# ---- session tables -------------------------------------------------------------------------

FEATURES = 0x144000000
PROTO = 0x8800A  # LOG_SHMFD, REPLY_ACK, CONFIGURE_MEM_SLOTS, DEVICE_STATE


def negotiated(proto: int = PROTO) -> BackendSession:
    s = BackendSession(FEATURES, PROTO)
    s.receive(Message(R.GET_FEATURES))
    s.receive(Message(R.GET_PROTOCOL_FEATURES))
    s.receive(Message(R.SET_PROTOCOL_FEATURES, 1, U64(proto)))
    s.receive(Message(R.SET_OWNER))
    return s


def test_qemu10_startup_sequence_accepted() -> None:
    s = negotiated()
    assert s.state is SessionState.READY
    for i in (0, 1):
        s.receive(Message(R.SET_VRING_CALL, 1, U64(i), (10,)))
        s.receive(Message(R.SET_VRING_ERR, 1, U64(i), (11,)))
    s.receive(Message(R.SET_FEATURES, 1, U64(0x140000000)))
    m = Message(R.ADD_MEM_REG, 0x9, SingleMemoryRegion(MemoryRegion(0, 0xC0000, 1, 0)), (5,))
    s.receive(m)
    assert s.reply_expected(m)
    log = Message(R.SET_LOG_BASE, 1, LogDescription(8192, 0), (6,))
    s.receive(log)
    assert s.reply_expected(log)
    assert s.receive(Message(R.SET_DEVICE_STATE_FD, 1, DeviceStateTransfer(0, 0), (9,))) is None
    assert s.state is SessionState.TRANSFER
    s.receive(Message(R.CHECK_DEVICE_STATE))
    assert s.state is SessionState.READY


def test_device_state_needs_feature() -> None:
    s = negotiated(PROTO & ~ProtocolFeature.DEVICE_STATE.mask)
    with pytest.raises(VhostUserError, match="DEVICE_STATE"):
        s.receive(Message(R.SET_DEVICE_STATE_FD, 1, DeviceStateTransfer(0, 0), (9,)))
    with pytest.raises(VhostUserError):  # poisoned
        s.receive(Message(R.GET_FEATURES))
    assert s.state is SessionState.CLOSED


@pytest.mark.parametrize(("direction", "phase", "match"),
                         [(2, 0, "direction 2"), (0, 1, "phase 1")])
def test_unknown_direction_or_phase_refused(direction: int, phase: int, match: str) -> None:
    s = negotiated()
    refusal = s.receive(Message(R.SET_DEVICE_STATE_FD, 1,
                                DeviceStateTransfer(direction, phase), (9,)))
    assert refusal is not None and match in refusal
    assert s.state is SessionState.READY


def test_set_protocol_features_beyond_offer_refused() -> None:
    s = BackendSession(FEATURES, PROTO)
    s.receive(Message(R.GET_FEATURES))
    s.receive(Message(R.GET_PROTOCOL_FEATURES))
    with pytest.raises(VhostUserError, match="did not offer"):
        s.receive(Message(R.SET_PROTOCOL_FEATURES, 1, U64(PROTO | 1)))


def test_need_reply_without_reply_ack_refused() -> None:
    s = negotiated(PROTO & ~ProtocolFeature.REPLY_ACK.mask)
    with pytest.raises(VhostUserError, match="NEED_REPLY"):
        s.receive(Message(R.SET_VRING_ENABLE, 0x9, VringState(0, 1)))


_ALL_STATES = [SessionState.AWAIT_OWNER, SessionState.READY, SessionState.TRANSFER]


def _session_in(state: SessionState) -> BackendSession:
    s = negotiated(vu.KNOWN_PROTOCOL_FEATURES & PROTO)
    if state is SessionState.AWAIT_OWNER:
        s.receive(Message(R.RESET_OWNER))
    elif state is SessionState.TRANSFER:
        s.receive(Message(R.SET_DEVICE_STATE_FD, 1, DeviceStateTransfer(1, 0), (9,)))
    assert s.state is state
    return s


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_ALL_STATES), requests())
def test_table_pairs(state: SessionState, msg: Message) -> None:
    """A pair outside the table always raises; a pair inside never raises for reasons of
    order (it may still for a feature or a payload)."""
    s = _session_in(state)
    msg = Message(msg.request, 1, msg.payload, ())
    lo, _ = vu.fd_range(msg)
    msg = Message(msg.request, 1, msg.payload, tuple(range(100, 100 + lo)))
    if (state, msg.request) not in vu.TRANSITIONS:
        with pytest.raises(VhostUserError, match="not allowed"):
            s.receive(msg)
    else:
        try:
            s.receive(msg)
        except VhostUserError as e:
            assert "not allowed" not in str(e)


def test_out_of_order_examples() -> None:
    s = BackendSession(FEATURES, PROTO)
    with pytest.raises(VhostUserError, match=r"SET_VRING_CALL.*not allowed"):
        s.receive(Message(R.SET_VRING_CALL, 1, U64(0), (3,)))
    s = negotiated()
    with pytest.raises(VhostUserError, match=r"CHECK_DEVICE_STATE.*not allowed"):
        s.receive(Message(R.CHECK_DEVICE_STATE))
    s = _session_in(SessionState.TRANSFER)
    with pytest.raises(VhostUserError, match=r"SET_DEVICE_STATE_FD.*not allowed"):
        s.receive(Message(R.SET_DEVICE_STATE_FD, 1, DeviceStateTransfer(0, 0), (3,)))


def test_frontend_session_checks_replies() -> None:
    f = FrontendSession()
    f.send(Message(R.GET_FEATURES))
    with pytest.raises(VhostUserError, match="while waiting for the reply to GET_FEATURES"):
        f.receive_reply(reply(R.GET_PROTOCOL_FEATURES, U64(0)))
    f = FrontendSession()
    f.send(Message(R.GET_FEATURES))
    f.receive_reply(reply(R.GET_FEATURES, U64(FEATURES)))
    f.send(Message(R.GET_PROTOCOL_FEATURES))
    with pytest.raises(VhostUserError, match="flags 0xd"):
        f.receive_reply(Message(R.GET_PROTOCOL_FEATURES, REPLY_FLAGS | 8, U64(PROTO)))


def test_frontend_session_transfer_refused_stays_ready() -> None:
    f = FrontendSession()
    for req, val in ((R.GET_FEATURES, FEATURES), (R.GET_PROTOCOL_FEATURES, PROTO)):
        f.send(Message(req))
        f.receive_reply(reply(req, U64(val)))
    f.send(Message(R.SET_PROTOCOL_FEATURES, 1, U64(PROTO)))
    f.send(Message(R.SET_OWNER))
    f.send(Message(R.SET_DEVICE_STATE_FD, 1, DeviceStateTransfer(0, 0), (4,)))
    f.receive_reply(reply(R.SET_DEVICE_STATE_FD, U64(0x101)))
    assert f.state is SessionState.READY
    f.send(Message(R.SET_DEVICE_STATE_FD, 1, DeviceStateTransfer(0, 0), (4,)))
    f.receive_reply(reply(R.SET_DEVICE_STATE_FD, U64(0x100)))
    assert f.state is SessionState.TRANSFER
    f.send(Message(R.CHECK_DEVICE_STATE))
    f.receive_reply(reply(R.CHECK_DEVICE_STATE, U64(0)))
    assert f.state is SessionState.READY
