"""When the multifd channels and the main stream meet: QEMU's two sync modes.

Both ends must agree on the mode and nothing on the wire negotiates it; the
destination's machine type decides (``multifd-flush-after-each-section`` is on
for machine types up to 8.0, see ``spec/ram.md`` section 6.1):

* ``PER_SECTION`` (QEMU 7.2, and machine types <= 8.0 on newer QEMUs): a SYNC
  packet on every channel before every RAM ``EOS``; the EOS is the marker.
* ``PER_ROUND`` (QEMU 9.0+ default): a SYNC on every channel at setup and each
  time the dirty-page scan wraps, marked by ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` on
  the main channel; an EOS does not sync.

The source side (:class:`~livemig.migration.source.outgoing_stream.OutgoingStream`)
applies these rules in one place: callers only say "a round ended" and "the RAM
section ends here".
"""

from __future__ import annotations

import enum
import re

__all__ = ["SyncMode"]

#: Machine types up to this version sync at every section (``hw_compat_8_0``).
_LAST_PER_SECTION_MACHINE = (8, 0)


class SyncMode(enum.Enum):
    PER_SECTION = "per-section"
    PER_ROUND = "per-round"

    @classmethod
    def for_machine(cls, machine: str) -> SyncMode:
        """The mode a QEMU destination of machine type ``machine`` expects."""
        m = re.search(r"-(\d+)\.(\d+)$", machine)
        if m and (int(m.group(1)), int(m.group(2))) <= _LAST_PER_SECTION_MACHINE:
            return cls.PER_SECTION
        return cls.PER_ROUND

    @property
    def syncs_at_section_end(self) -> bool:
        """A SYNC before every RAM EOS (the EOS is the marker)."""
        return self is SyncMode.PER_SECTION

    @property
    def syncs_at_round_end(self) -> bool:
        """A SYNC, marked by MULTIFD_FLUSH, each time the scan wraps."""
        return self is SyncMode.PER_ROUND
