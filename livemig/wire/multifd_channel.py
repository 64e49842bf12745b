"""The life of one incoming multifd channel, as a state table.

Theory of operation
-------------------
A multifd connection carries its initial packet, then (once the main channel
has delivered the RAM block list, without which no RAM packet can be checked)
packets until the source closes it. A packet with the ``SYNC`` flag stops the
channel until the main stream reaches the matching sync marker and every
channel has reached its SYNC (``spec/ram.md`` section 6.1); device-state
packets (QEMU 10.0) may come between any two RAM packets::

    HANDSHAKE --INIT_PACKET--> AWAIT_LAYOUT --LAYOUT--> PACKETS
    PACKETS   --RAM_PACKET, DEVICE_STATE_PACKET--> PACKETS
    PACKETS   --SYNC_PACKET--> AT_SYNC --RELEASED--> PACKETS
    PACKETS   --SOURCE_CLOSED--> ENDED

:data:`RECV_CHANNEL_TRANSITIONS` is that picture as ``(state, input) -> next
state``; a pair not in it is a protocol error, raised by
:meth:`RecvChannel.receive` as a :class:`~livemig.errors.StreamFormatError`
that names the channel and the packet, after which the channel is poisoned
(every later input raises the same error). Our own side ends a channel in any
state with :meth:`RecvChannel.close` (the main stream is complete, or the
migration failed); that is not an input from the peer and is not in the table.

Pure: the receiver that reads the socket
(:mod:`livemig.migration.destination.multifd_receiver`) says what arrived; this
module says whether it may arrive now. Mirrors the receive loop of QEMU's
``multifd_recv_thread()`` (``migration/multifd.c``, 7.2 and 10.0).
"""

from __future__ import annotations

import enum
from typing import Final

from livemig.errors import StreamFormatError

__all__ = ["RECV_CHANNEL_TRANSITIONS", "ChannelInput", "ChannelState", "RecvChannel"]


class ChannelState(enum.Enum):
    """Where one incoming multifd channel is (the value reads well in a message)."""

    HANDSHAKE = "waiting for its initial packet"
    AWAIT_LAYOUT = "waiting for the RAM block list of the main channel"
    PACKETS = "receiving packets"
    AT_SYNC = "waiting at a sync point"
    ENDED = "ended"


class ChannelInput(enum.Enum):
    """What can happen to a channel: something the source sent on it, or a step of the
    main stream that the channel waits for."""

    INIT_PACKET = "the initial packet"
    LAYOUT = "the RAM block list"
    RAM_PACKET = "a RAM packet"
    SYNC_PACKET = "a RAM packet with SYNC"
    DEVICE_STATE_PACKET = "a device-state packet"
    RELEASED = "the main stream's sync marker"
    SOURCE_CLOSED = "the end of the connection"


S = ChannelState
In = ChannelInput

#: ``(state, input) -> next state``; a pair not in the table is a protocol error.
RECV_CHANNEL_TRANSITIONS: Final[dict[tuple[ChannelState, ChannelInput], ChannelState]] = {
    (S.HANDSHAKE, In.INIT_PACKET): S.AWAIT_LAYOUT,
    (S.AWAIT_LAYOUT, In.LAYOUT): S.PACKETS,
    (S.PACKETS, In.RAM_PACKET): S.PACKETS,
    (S.PACKETS, In.DEVICE_STATE_PACKET): S.PACKETS,
    (S.PACKETS, In.SYNC_PACKET): S.AT_SYNC,
    (S.AT_SYNC, In.RELEASED): S.PACKETS,
    (S.PACKETS, In.SOURCE_CLOSED): S.ENDED,
}

#: Inputs that are packets: each one counts, so an error can name the packet.
_PACKETS: Final = frozenset({In.RAM_PACKET, In.SYNC_PACKET, In.DEVICE_STATE_PACKET})


class RecvChannel:
    """One incoming multifd connection's state (see the module docstring).

    ``connection`` is the connection's number in accept order; once the initial
    packet is in, :attr:`channel_id` (the id the source gave it) names it instead.
    :attr:`packets` counts the packets received after the initial packet, so it
    is also the index of the next one, as the receiver's messages number them.
    """

    def __init__(self, connection: int) -> None:
        self.connection = connection
        self.channel_id: int | None = None
        self.state = S.HANDSHAKE
        self.packets = 0
        self._error: StreamFormatError | None = None

    @property
    def where(self) -> str:
        if self.channel_id is None:
            return f"multifd connection {self.connection}"
        return f"multifd channel {self.channel_id}"

    @property
    def error(self) -> StreamFormatError | None:
        """The protocol error that poisoned the channel, if any."""
        return self._error

    def receive(self, event: ChannelInput, *, channel_id: int | None = None) -> ChannelState:
        """Apply ``event``; ``channel_id`` goes with :attr:`ChannelInput.INIT_PACKET`.

        Raises :class:`~livemig.errors.StreamFormatError` (located: channel and packet)
        for an input the table does not allow now, and the same error again for any
        input after that.
        """
        if self._error is not None:
            raise self._error
        nxt = RECV_CHANNEL_TRANSITIONS.get((self.state, event))
        if nxt is None:
            self._error = StreamFormatError(
                f"packet {self.packets}: {event.value} while the channel is "
                f"{self.state.value}", where=self.where)
            raise self._error
        if event is In.INIT_PACKET:
            self.channel_id = channel_id
        if event in _PACKETS:
            self.packets += 1
        self.state = nxt
        return nxt

    def close(self) -> None:
        """Our side ended the channel (main stream complete, or a failure anywhere)."""
        self.state = S.ENDED

    def __repr__(self) -> str:
        return f"<RecvChannel {self.where} {self.state.name}, {self.packets} packets>"
