"""The main migration stream: header, configuration, sections, commands, EOF, JSON.

:class:`MainStreamDecoder` is a sans-I/O decoder in the h11 style: the I/O
layer owns a buffer, calls :meth:`MainStreamDecoder.parse` with the valid
region, and gets back events plus how far the decoder got. A record cut by
the end of the buffer is left unconsumed, so the caller reads more and calls
again. After an error the decoder is poisoned.

Device (FULL) sections have no length on the wire; they can only be split
with the JSON description QEMU appends after EOF. Without a description the
decoder stops at the first device section with :class:`DeviceStateTail`; the
caller collects the remaining bytes, finds the JSON with
:func:`find_vmdescription`, hands it over with :meth:`provide_description`
and parses the tail.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable

from livemig import limits
from livemig.errors import LimitExceeded, StreamFormatError, TruncatedStream
from livemig.wire.constants import (
    COMMAND_LENGTHS,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
    Command,
    SectionType,
)
from livemig.wire.cursor import Cursor, Incomplete
from livemig.wire.events import (
    CommandRecord,
    Configuration,
    DeviceSection,
    DeviceStateTail,
    EndOfStream,
    Event,
    FileHeader,
    SectionFooter,
    SectionHeader,
    Seek,
    VmDescriptionRecord,
)
from livemig.wire.ram import RamDecoder

#: Body length of a self-delimiting device section: (buffer, body start, buffer end) ->
#: length; raises ``Incomplete`` while the body is not all in the buffer.
LengthFn = Callable[[memoryview, int, int], int]
SectionLengths = Callable[[str, int], "LengthFn | None"]

CONFIG_SUBSECTION_CAPS = "configuration/capabilities"
CONFIG_SUBSECTION_UUID = "configuration/uuid"
CONFIG_SUBSECTION_PAGE_BITS = "configuration/target-page-bits"


def builtin_iterable_length(idstr: str) -> LengthFn | None:
    """How to split the START/PART/END sections of device kinds livemig knows
    without their handler: VFIO devices (``<qdev path>/vfio``). FULL sections
    of every device are split with the JSON description instead."""
    if idstr.endswith("/vfio"):
        from livemig.wire.vfio_section import iterable_body_length
        return iterable_body_length
    return None


class _State(enum.Enum):
    HEADER = "file header"
    CONFIG = "configuration"
    RECORDS = "record"
    RAM_BODY = "RAM section"
    FOOTER = "section footer"
    TAIL_WAIT = "device sections (waiting for the vmstate description)"
    VMDESC = "vmstate description"
    DONE = "end of stream"
    POISONED = "poisoned"


class MainStreamDecoder:
    """Decodes one main channel (or one migration file) into events."""

    def __init__(self, *, description: object | None = None,
                 section_lengths: SectionLengths | None = None) -> None:
        """``section_lengths(idstr, instance_id)`` may return a function that
        tells how long a section body of that device is (a livemig engine
        knows its own devices): such sections, iterable ones included, are
        split without the JSON description."""
        self.section_lengths = section_lengths
        self.state = _State.HEADER
        self.ram = RamDecoder()
        self.description = description  # a livemig.wire.vmstate.VmDescription
        self.configuration: Configuration | None = None
        self.sections: dict[int, SectionHeader] = {}
        self._open: SectionHeader | None = None
        self._error: StreamFormatError | None = None
        self.ram_section_id: int | None = None
        self.saw_eof = False

    @property
    def done(self) -> bool:
        return self.state is _State.DONE

    @property
    def waiting_for_description(self) -> bool:
        return self.state is _State.TAIL_WAIT

    def expecting(self) -> str:
        """What the decoder is in the middle of, for truncation messages."""
        if self.state is _State.RAM_BODY and self._open is not None:
            return f"RAM section {self._open.kind.name} (section id {self._open.section_id})"
        return self.state.value

    def provide_description(self, description: object) -> None:
        """Resume after :class:`DeviceStateTail` with the JSON description."""
        if self.state is not _State.TAIL_WAIT:
            raise StreamFormatError("vmstate description provided in state " + self.state.value)
        self.description = description
        self.state = _State.RECORDS

    def parse(self, buf: bytes | bytearray | memoryview, start: int, end: int, base: int,
              *, final: bool = False, max_events: int = 4096) -> tuple[list[Event], int]:
        """Decode records from ``buf[start:end]``; ``base`` is the stream offset of ``buf[0]``.

        Returns the events and the buffer position up to which bytes were used.
        With ``final`` the caller says no more bytes will come: a record cut
        short is then a :class:`TruncatedStream`.
        """
        if self._error is not None:
            raise self._error
        cur = Cursor(buf, start, end, base)
        out: list[Event] = []
        try:
            while len(out) < max_events:
                before, n_before, st_before = cur.pos, len(out), self.state
                self._step(cur, out)
                if out and isinstance(out[-1], (Seek, DeviceStateTail)):
                    break
                if cur.pos == before and len(out) == n_before and self.state is st_before:
                    break
            if final and cur.pos == cur.end and self.state is _State.VMDESC:
                # QEMU tolerates a stream that ends right after EOF.
                self.state = _State.DONE
            if final and cur.pos < cur.end and not out and self.state not in (
                    _State.DONE, _State.TAIL_WAIT):
                raise TruncatedStream(
                    f"stream ends inside a {self.expecting()} "
                    f"({cur.end - cur.pos} bytes left over)", offset=cur.offset)
            if final and cur.pos == cur.end and self.state not in (
                    _State.DONE, _State.TAIL_WAIT, _State.VMDESC) and not out:
                raise TruncatedStream(f"stream ends where a {self.expecting()} was expected",
                                      offset=cur.offset)
        except StreamFormatError as e:
            self._error = e
            self.state = _State.POISONED
            raise
        return out, cur.pos

    # -- one step ------------------------------------------------------------

    def _step(self, cur: Cursor, out: list[Event]) -> bool:
        st = self.state
        start = cur.pos
        try:
            if st is _State.RAM_BODY:
                assert self._open is not None
                if self.ram.parse_body(cur, self._open.kind, out):
                    self.state = _State.FOOTER
                return True
            if st is _State.RECORDS:
                return self._record(cur, out)
            if st is _State.FOOTER:
                self._footer(cur, out)
                return True
            if st is _State.HEADER:
                magic = cur.be32()
                version = cur.be32()
                if magic != QEMU_VM_FILE_MAGIC:
                    raise cur.error(f"bad magic {magic:#010x} (expected {QEMU_VM_FILE_MAGIC:#010x} "
                                    "'QEVM'): not a QEMU migration stream", at=start)
                if version == QEMU_VM_FILE_VERSION_COMPAT:
                    raise cur.error("stream version 2 is obsolete (QEMU refuses it too)", at=start)
                if version != QEMU_VM_FILE_VERSION:
                    raise cur.error(f"unsupported stream version {version} "
                                    f"(expected {QEMU_VM_FILE_VERSION})", at=start + 4)
                out.append(FileHeader(version, cur.base + start))
                self.state = _State.CONFIG
                return True
            if st is _State.CONFIG:
                if cur.peek_u8() != SectionType.CONFIGURATION:
                    self.state = _State.RECORDS
                    return True
                out.append(self._configuration(cur))
                self.state = _State.RECORDS
                return True
            if st is _State.VMDESC:
                t = cur.u8()
                if t != SectionType.VMDESCRIPTION:
                    raise cur.error(f"expected the vmstate description (0x06) after EOF, "
                                    f"found byte {t:#04x}", at=start)
                n = cur.be32()
                cur.check_limit(n, limits.MAX_VMDESC_JSON, "vmstate description length",
                                at=start)
                raw = bytes(cur.take(n))
                out.append(VmDescriptionRecord(raw, cur.base + start))
                self.state = _State.DONE
                return True
            if st is _State.DONE:
                if cur.remaining:
                    raise cur.error(f"{cur.remaining} bytes of garbage after the end of the "
                                    "stream", at=start)
                return False
            if st is _State.TAIL_WAIT:
                return False
        except Incomplete:
            cur.pos = start
            return False
        raise AssertionError(st)

    def _footer(self, cur: Cursor, out: list[Event]) -> None:
        start = cur.pos
        assert self._open is not None
        t = cur.u8()
        sid = cur.be32()
        if t != SectionType.SECTION_FOOTER:
            cur.pos = start
            raise cur.error(f"expected section footer 0x7e for {self._open.idstr} (section id "
                            f"{self._open.section_id}), found byte {t:#04x}", at=start)
        if sid != self._open.section_id:
            raise cur.error(f"footer section id {sid} does not match section "
                            f"{self._open.idstr} (id {self._open.section_id})", at=start)
        out.append(SectionFooter(sid, cur.base + start))
        self._open = None
        self.state = _State.RECORDS

    def _record(self, cur: Cursor, out: list[Event]) -> bool:
        start = cur.pos
        t = cur.u8()
        if t == SectionType.EOF:
            out.append(EndOfStream(cur.base + start))
            self.saw_eof = True
            self.state = _State.VMDESC
            return True
        if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            sid = cur.be32()
            idstr = cur.counted_string("section idstr")
            instance = cur.be32()
            version = cur.be32()
            hdr = SectionHeader(SectionType(t), sid, idstr, instance, version, cur.base + start)
            if idstr == RAM_SECTION_IDSTR:
                if t != SectionType.SECTION_START:
                    raise cur.error("the ram section must be iterable (START), not FULL",
                                    at=start)
                if self.ram_section_id is not None:
                    raise cur.error("a second ram START section", at=start)
                if instance != 0 or version != RAM_SECTION_VERSION:
                    raise cur.error(f"ram section instance {instance} version {version}, "
                                    f"expected instance 0 version {RAM_SECTION_VERSION}",
                                    at=start)
                self.ram_section_id = sid
                return self._open_section(cur, hdr, out, start)
            if sid in self.sections:
                raise cur.error(f"section id {sid} ({idstr}) used twice", at=start)
            length_of = self._length_fn(idstr, instance, SectionType(t))
            if length_of is not None:
                self._delimited_section(cur, hdr, start, out, length_of)
                self.sections[sid] = hdr
                return True
            if t == SectionType.SECTION_START:
                raise cur.error(f"iterable section {idstr!r} (instance {instance}) is not "
                                "supported: livemig splits only the iterable sections of ram and "
                                "of VFIO devices (idstr .../vfio)", at=start)
            if self.description is None:
                cur.pos = start
                out.append(DeviceStateTail(cur.base + start))
                self.state = _State.TAIL_WAIT
                return True
            self._device_section(cur, hdr, start, out)
            return True
        if t in (SectionType.SECTION_PART, SectionType.SECTION_END):
            sid = cur.be32()
            opened = self.sections.get(sid)
            if opened is None:
                raise cur.error(f"{SectionType(t).name} for unknown section id {sid}", at=start)
            hdr = SectionHeader(SectionType(t), sid, opened.idstr, opened.instance_id,
                                opened.version_id, cur.base + start)
            length_of = self._length_fn(opened.idstr, opened.instance_id, SectionType(t))
            if length_of is not None:
                self._delimited_section(cur, hdr, start, out, length_of)
                return True
            return self._open_section(cur, hdr, out, start)
        if t == SectionType.COMMAND:
            cmd = cur.be16()
            n = cur.be16()
            if cmd == Command.INVALID or cmd not in Command._value2member_map_:
                raise cur.error(f"unknown command {cmd} (length {n})", at=start)
            command = Command(cmd)
            fixed = COMMAND_LENGTHS[command]
            if fixed is not None and n != fixed:
                raise cur.error(f"command {command.name} with length {n}, expected {fixed}",
                                at=start)
            data = bytes(cur.take(n))
            self._command(cur, command, data, start)
            out.append(CommandRecord(command, data, cur.base + start))
            return True
        names = {int(x): x.name for x in SectionType}
        what = names.get(t)
        if what:
            raise cur.error(f"record type {what} ({t:#04x}) is not allowed here", at=start)
        raise cur.error(f"unknown record type {t:#04x}", at=start)

    def _open_section(self, cur: Cursor, hdr: SectionHeader, out: list[Event],
                      start: int) -> bool:
        if hdr.kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            self.sections[hdr.section_id] = hdr
        if hdr.idstr != RAM_SECTION_IDSTR:
            raise cur.error(f"section {hdr.idstr!r} {hdr.kind.name} is not supported", at=start)
        self._open = hdr
        out.append(hdr)
        self.state = _State.RAM_BODY
        return True

    def _length_fn(self, idstr: str, instance_id: int, kind: SectionType) -> LengthFn | None:
        if idstr == RAM_SECTION_IDSTR:
            return None
        if self.section_lengths is not None:
            fn = self.section_lengths(idstr, instance_id)
            if fn is not None:
                return fn
        if kind is not SectionType.SECTION_FULL:
            return builtin_iterable_length(idstr)
        return None

    def _delimited_section(self, cur: Cursor, hdr: SectionHeader, start: int,
                           out: list[Event], length_of: LengthFn) -> None:
        body = cur.pos
        view = memoryview(cur.buf)
        try:
            n = length_of(view, body, cur.end)
        except StreamFormatError as e:
            raise StreamFormatError(f"device section {hdr.idstr!r} instance {hdr.instance_id}: "
                                    f"{e.message}", offset=cur.base + body) from None
        cur.skip(n)
        ft = cur.u8()
        sid = cur.be32()
        if ft != SectionType.SECTION_FOOTER or sid != hdr.section_id:
            raise cur.error(f"device section {hdr.idstr!r} instance {hdr.instance_id}: no "
                            f"footer for section id {hdr.section_id} after its {n}-byte body",
                            at=body + n)
        out.append(DeviceSection(hdr, bytes(view[start:cur.pos]), body - start, n))

    def _device_section(self, cur: Cursor, hdr: SectionHeader, start: int,
                        out: list[Event]) -> None:
        from livemig.wire.vmstate import section_body_length

        desc = self.description.device(hdr.idstr, hdr.instance_id)  # type: ignore[union-attr]
        if desc is None:
            raise cur.error(f"device section {hdr.idstr!r} instance {hdr.instance_id} is not in "
                            "the vmstate description", at=start)
        body = cur.pos
        try:
            n = section_body_length(desc, memoryview(cur.buf)[:cur.end], body, base=cur.base)
        except StreamFormatError as e:
            raise StreamFormatError(f"device section {hdr.idstr!r} instance {hdr.instance_id}: "
                                    f"{e.message}", offset=e.offset, raw=e.raw) from None
        cur.skip(n)
        ft = cur.u8()
        sid = cur.be32()
        if ft != SectionType.SECTION_FOOTER or sid != hdr.section_id:
            raise cur.error(f"device section {hdr.idstr!r} instance {hdr.instance_id}: the "
                            f"vmstate description says its body is {n} bytes, but no footer "
                            f"for section id {hdr.section_id} follows", at=body + n)
        self.sections[hdr.section_id] = hdr
        raw = bytes(cur.buf[start:cur.pos])
        out.append(DeviceSection(hdr, raw, body - start, n))

    def _command(self, cur: Cursor, command: Command, data: bytes, start: int) -> None:
        if command == Command.POSTCOPY_ADVISE:
            if len(data) not in (0, 16):
                raise cur.error(f"POSTCOPY_ADVISE with length {len(data)}", at=start)
            if len(data) == 16:
                summary, tps = struct.unpack(">QQ", data)
                if tps != limits.TARGET_PAGE_SIZE:
                    raise cur.error(f"POSTCOPY_ADVISE target page size {tps}", at=start)
                if summary != tps:
                    raise cur.error("postcopy with hugepage-backed RAM is not supported",
                                    at=start)
        elif command in (Command.PACKAGED, Command.POSTCOPY_LISTEN, Command.POSTCOPY_RUN,
                         Command.POSTCOPY_RAM_DISCARD, Command.POSTCOPY_RESUME,
                         Command.RECV_BITMAP, Command.ENABLE_COLO):
            raise cur.error(f"command {command.name}: postcopy and COLO are not supported",
                            at=start)

    def _configuration(self, cur: Cursor) -> Configuration:
        start = cur.pos
        cur.u8()
        n = cur.be32()
        cur.check_limit(n, limits.MAX_MACHINE_NAME, "machine type name length", at=start)
        raw_name = bytes(cur.take(n))
        try:
            machine = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise cur.error(f"machine type name is not ASCII: {raw_name[:32]!r}",
                            at=start) from None
        caps: tuple[str, ...] = ()
        uuid = None
        page_bits = None
        seen: set[str] = set()
        while cur.peek_u8() == SectionType.SUBSECTION:
            sub_at = cur.pos
            cur.u8()
            name = cur.counted_string("configuration subsection name")
            version = cur.be32()
            if name in seen:
                raise cur.error(f"configuration subsection {name!r} twice", at=sub_at)
            seen.add(name)
            if version != 1:
                raise cur.error(f"configuration subsection {name!r} version {version}",
                                at=sub_at)
            if name == CONFIG_SUBSECTION_CAPS:
                count = cur.be32()
                cur.check_limit(count, limits.MAX_CONFIG_CAPABILITIES,
                                "configuration capability count", at=sub_at)
                caps = tuple(cur.counted_string("capability name") for _ in range(count))
            elif name == CONFIG_SUBSECTION_UUID:
                uuid = bytes(cur.take(16))
            elif name == CONFIG_SUBSECTION_PAGE_BITS:
                page_bits = cur.be32()
                if page_bits != limits.TARGET_PAGE_SIZE.bit_length() - 1:
                    raise cur.error(f"target page bits {page_bits}: only 4 KiB target pages "
                                    "are supported", at=sub_at)
            else:
                raise cur.error(f"unknown configuration subsection {name!r}", at=sub_at)
        known = {"x-ignore-shared", "mapped-ram"}
        for c in caps:
            if c not in known:
                raise cur.error(f"unknown validated capability {c!r} in the configuration",
                                at=start)
        self.ram.ignore_shared = "x-ignore-shared" in caps
        self.ram.mapped_ram = "mapped-ram" in caps
        cfg = Configuration(machine, caps, uuid, page_bits, bytes(cur.buf[start:cur.pos]))
        self.configuration = cfg
        return cfg


def encode_configuration(machine: str, capabilities: tuple[str, ...] = (),
                         uuid: bytes | None = None) -> bytes:
    """The 0x07 record as QEMU writes it (capabilities before uuid)."""
    name = machine.encode("ascii")
    out = bytearray([SectionType.CONFIGURATION]) + struct.pack(">I", len(name)) + name
    if capabilities:
        out += _subsection_header(CONFIG_SUBSECTION_CAPS) + struct.pack(">I", len(capabilities))
        for c in capabilities:
            out += _counted(c)
    if uuid is not None:
        out += _subsection_header(CONFIG_SUBSECTION_UUID) + uuid
    return bytes(out)


def _counted(s: str) -> bytes:
    raw = s.encode("ascii")
    if len(raw) > limits.MAX_IDSTR:
        raise ValueError(f"counted string too long: {s!r}")
    return bytes([len(raw)]) + raw


def _subsection_header(name: str) -> bytes:
    return bytes([SectionType.SUBSECTION]) + _counted(name) + struct.pack(">I", 1)


def encode_file_header() -> bytes:
    return struct.pack(">II", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def encode_section_header(kind: SectionType, section_id: int, idstr: str = "",
                          instance_id: int = 0, version_id: int = 0) -> bytes:
    if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
        return (struct.pack(">BI", kind, section_id) + _counted(idstr)
                + struct.pack(">II", instance_id, version_id))
    return struct.pack(">BI", kind, section_id)


def encode_footer(section_id: int) -> bytes:
    return struct.pack(">BI", SectionType.SECTION_FOOTER, section_id)


def encode_command(cmd: Command, data: bytes = b"") -> bytes:
    return struct.pack(">BHH", SectionType.COMMAND, cmd, len(data)) + data


def encode_vmdescription(raw_json: bytes) -> bytes:
    return struct.pack(">BI", SectionType.VMDESCRIPTION, len(raw_json)) + raw_json


def find_vmdescription(buf: bytes | bytearray | memoryview, *,
                       exact: bool = True) -> tuple[int, int, int] | None:
    """Where a complete stream's tail ends: ``(eof_offset, json_offset, json_end)`` or None.

    With ``exact=False`` (used once the input ended) the JSON may be followed
    by other bytes, so that those can be reported as garbage.

    The stream ends with ``00`` (EOF) ``06`` be32 length and the JSON, whose
    text holds no NUL byte; so the last NUL of a complete tail is the EOF byte
    or one of the length bytes. A candidate counts only if the length lands
    exactly on the end of ``buf`` and the JSON starts with ``{``; the caller
    still proves it by walking the device sections up to that EOF byte.
    """
    mv = memoryview(buf)
    n = len(mv)
    if not exact:
        raw = bytes(mv)
        c = raw.rfind(b"\x00\x06")
        tries = 0
        while c >= 0 and tries < 1 << 20:
            if c + 6 < n and raw[c + 6] == ord("{"):
                (length,) = struct.unpack_from(">I", raw, c + 2)
                end = c + 6 + length
                if end <= n and raw[end - 1] == ord("}"):
                    return c, c + 6, end
            c = raw.rfind(b"\x00\x06", 0, c + 1) if c > 0 else -1
            tries += 1
        return None
    if n < 7 or mv[n - 1] != ord("}"):
        return None
    whole = buf if isinstance(buf, bytes | bytearray) else bytes(mv)
    return VmDescriptionScanner().find(whole)


class VmDescriptionScanner:
    """:func:`find_vmdescription` (exact) over a tail that only grows, in linear time.

    The loader asks after every read whether the tail now ends with a complete
    description. Searching the last :data:`~livemig.limits.MAX_VMDESC_JSON`
    bytes for their last NUL on every read cost O(64 MiB) per MiB read (a
    tail of ``}`` bytes took minutes to refuse); this scanner remembers the
    last NUL seen and looks at each byte once. ``bytes_scanned`` counts the
    bytes searched, so that the bound can be tested.

    The buffer passed to :meth:`find` must be the same one each time, only
    ever appended to.
    """

    def __init__(self) -> None:
        self.scanned = 0  # bytes of the buffer already searched for NUL
        self.last_nul = -1  # position of the last NUL in buf[:scanned]
        self.bytes_scanned = 0

    def find(self, buf: bytes | bytearray) -> tuple[int, int, int] | None:
        """``(eof_offset, json_offset, json_end)`` if ``buf`` ends a stream, else None."""
        n = len(buf)
        if n < self.scanned:
            raise ValueError("VmDescriptionScanner: the buffer shrank")
        # bytes before the window can never hold the EOF byte of a description
        # that ends at n or later, so they need not be searched at all
        window = max(0, n - limits.MAX_VMDESC_JSON - 6)
        start = max(self.scanned, window)
        found = buf.rfind(b"\x00", start, n)
        self.bytes_scanned += n - start
        self.scanned = n
        if found >= 0:
            self.last_nul = found
        if n < 7 or buf[n - 1] != ord("}") or self.last_nul < window:
            return None
        last_nul = self.last_nul
        for c in range(max(0, last_nul - 5), last_nul + 1):
            if c + 6 >= n or buf[c] != 0 or buf[c + 1] != SectionType.VMDESCRIPTION:
                continue
            (length,) = struct.unpack_from(">I", buf, c + 2)
            if c + 6 + length == n and buf[c + 6] == ord("{"):
                return c, c + 6, n
        return None


def check_json_object(raw: bytes, where: str = "vmstate description") -> dict[str, object]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StreamFormatError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise StreamFormatError(f"{where} is not a JSON object")
    return obj


__all__ = [
    "LimitExceeded",
    "MainStreamDecoder",
    "VmDescriptionScanner",
    "encode_command",
    "encode_configuration",
    "encode_file_header",
    "encode_footer",
    "encode_section_header",
    "encode_vmdescription",
    "find_vmdescription",
]


def fork_for_tail(decoder: MainStreamDecoder, description: object) -> MainStreamDecoder:
    """A copy of ``decoder`` (waiting at a device section) that parses the tail
    with ``description``; if the tail turns out not to be complete yet, the
    copy is thrown away and the original stays usable."""
    import copy

    if decoder.state not in (_State.TAIL_WAIT, _State.VMDESC):
        raise StreamFormatError("internal: decoder is not waiting for the tail")
    lengths, decoder.section_lengths = decoder.section_lengths, None
    try:
        trial = copy.deepcopy(decoder)  # the callback belongs to the caller: not copied
    finally:
        decoder.section_lengths = lengths
    trial.section_lengths = lengths
    trial.description = description
    if trial.state is _State.TAIL_WAIT:
        trial.state = _State.RECORDS
    return trial
