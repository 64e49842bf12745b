"""The vmstate JSON description (``VMDESCRIPTION``, ``0x06``) and what it is for.

Theory of operation
-------------------
A FULL section carries one device's state as a vmstate body
(``vmstate_save_state_v()`` in QEMU's ``migration/vmstate.c``): the device's
fields in order, then its optional subsections, each ``0x05`` + counted name +
be32 version + a nested body. Nothing says how long the body is. After the
``EOF`` byte QEMU appends ``0x06`` + be32 length + a JSON document that
describes every FULL section it sent, with the number of bytes each field
took on the wire. Walking a body with that description is the only way to
know where it ends, and livemig keeps every section's bytes exactly, so the
walk has to land exactly on the ``0x7E`` footer.

What the description promises, and where it does not:

* ``size`` is *measured* by QEMU around each element it wrote, so for a
  struct it covers the struct's subsections too, and for ``tmp`` / ``vstruct``
  entries (which carry their own inline ``fields``) it covers everything.
* An ``array_len`` entry ("compressed array") describes only its first
  element; QEMU compresses only arrays whose elements have a fixed layout.
* Subsections appear only when they were sent, in wire order; the walk
  checks each marker, name and version against the description.
* ``capability`` (used only by the 10.0 ``configuration`` object) is a
  counted string on the wire whose JSON ``size`` can be wrong, so it is read
  as a counted string, not as ``size`` bytes.

The JSON comes from the peer and is treated as hostile: every length,
count and nesting level is checked against the limits below before it is
used, and every malformed shape becomes a :class:`StreamFormatError` (or its
subclass :class:`LimitExceeded`), never another Python exception.

This module does no I/O: it reads bytes it is given.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from livemig.errors import LimitExceeded, StreamFormatError, TruncatedStream
from livemig.limits import MAX_VMDESC_JSON
from livemig.wire.constants import VMS_NULLPTR_MARKER, SectionType
from livemig.wire.cursor import Cursor, Incomplete

__all__ = [
    "MAX_DEPTH",
    "MAX_SECTION_BYTES",
    "MAX_WALK_STEPS",
    "Register",
    "VmDescription",
    "decode_fields",
    "describe_sections",
    "parse_vmdescription",
    "section_body_length",
]

#: Bytes one FULL section body may take. The largest sections of a pc/q35
#: guest are a few KiB (cpu with xsave, fdc, ide); VGA and virtio devices stay
#: well below 1 MiB. 64 MiB bounds what a hostile description can make us
#: wait for or hold while keeping far from any real device.
MAX_SECTION_BYTES = 64 << 20

#: Nesting of structs and subsections. QEMU nests a handful of levels
#: (device > struct > struct > subsection); 64 bounds our recursion well
#: below Python's own limit.
MAX_DEPTH = 64

#: Field entries and struct elements visited while walking one section. A pc
#: or q35 section visits at most a few hundred; the bound stops a description
#: such as ``array_len: 10**9`` of an empty struct from looping for hours.
MAX_WALK_STEPS = 1 << 20

#: Raw fields longer than this are shown as a preview plus their length.
HEX_PREVIEW_BYTES = 64

#: Bitmaps up to this many bytes are shown as be64 words, longer ones as hex.
MAX_BITMAP_WORDS_BYTES = 512

_SUBSECTION = int(SectionType.SUBSECTION)
_BE32_MAX = 0xFFFFFFFF

#: Integer vmstate types (migration/vmstate-types.c): type -> (bytes, signed).
_INT_TYPES: dict[str, tuple[int, bool]] = {
    "int8": (1, True),
    "int16": (2, True),
    "int32": (4, True),
    "int64": (8, True),
    "uint8": (1, False),
    "uint16": (2, False),
    "uint32": (4, False),
    "uint64": (8, False),
    "int8 equal": (1, True),
    "int16 equal": (2, True),
    "int32 equal": (4, True),
    "int64 equal": (8, True),
    "uint8 equal": (1, False),
    "uint16 equal": (2, False),
    "uint32 equal": (4, False),
    "uint64 equal": (8, False),
    # timer_put() writes the expiry as a signed int64; -1 = not armed.
    "timer": (8, True),
    # float64 is written as the be64 of its bits; shown as those bits.
    "float64": (8, False),
}

#: Key under which a body's decoded subsections are collected.
SUBSECTIONS_KEY = "subsections"


class VmDescription:
    """A validated VMDESCRIPTION document; build it with :func:`parse_vmdescription`.

    Only the top level and the device list are checked here; a device's
    field list is checked when it is walked, so one odd device does not hide
    the others.
    """

    __slots__ = ("_devices", "_doc", "_index", "_raw")

    def __init__(self, raw: bytes, doc: dict[str, Any],
                 devices: list[dict[str, Any]],
                 index: dict[tuple[str, int], dict[str, Any]]) -> None:
        self._raw = raw
        self._doc = doc
        self._devices = devices
        self._index = index

    @property
    def raw_json(self) -> bytes:
        """The JSON exactly as received, for re-sending or storing unchanged."""
        return self._raw

    @property
    def page_size(self) -> int:
        """The source's target page size (checked against ours by the caller)."""
        value: int = self._doc["page_size"]
        return value

    @property
    def devices(self) -> list[dict[str, Any]]:
        """One entry per FULL section, in the order the source sent them."""
        return list(self._devices)

    @property
    def has_configuration(self) -> bool:
        """Whether the JSON describes the configuration section (10.0 does, 7.2 not)."""
        return "configuration" in self._doc

    @property
    def configuration(self) -> dict[str, Any] | None:
        """The description of the configuration bytes, if present."""
        value: dict[str, Any] | None = self._doc.get("configuration")
        return value

    def device(self, idstr: str, instance_id: int) -> dict[str, Any] | None:
        """The description of FULL section ``(idstr, instance_id)``, or None."""
        return self._index.get((idstr, instance_id))

    def __repr__(self) -> str:
        return (f"<VmDescription page_size={self.page_size} devices={len(self._devices)}"
                f" configuration={self.has_configuration} json={len(self._raw)} bytes>")


def _desc_error(message: str) -> StreamFormatError:
    return StreamFormatError(f"vmstate description: {message}")


def _is_int(value: object) -> bool:
    # JSON true/false become Python bools, which are ints; they are not sizes.
    return type(value) is int


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def parse_vmdescription(raw: bytes | bytearray | memoryview) -> VmDescription:
    """Parse and validate the JSON that follows ``0x06`` + be32 length.

    Raises :class:`StreamFormatError` naming what is wrong (not UTF-8, not
    JSON, a missing or mistyped key, a device described twice), or
    :class:`LimitExceeded` for a document above ``MAX_VMDESC_JSON``.
    """
    if len(raw) > MAX_VMDESC_JSON:
        raise LimitExceeded(f"vmstate description of {len(raw)} bytes exceeds the limit "
                            f"{MAX_VMDESC_JSON}")
    data = bytes(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _desc_error(f"not UTF-8 (byte {exc.start})") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _desc_error("JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, huge integers, NaN
        raise _desc_error(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _desc_error(f"top level is a JSON {type(doc).__name__}, not an object")

    page_size = doc.get("page_size")
    if page_size is None:
        raise _desc_error("no 'page_size'")
    if not _is_int(page_size) or page_size <= 0 or page_size & (page_size - 1):
        raise _desc_error(f"'page_size' {page_size!r} is not a power of two")
    if "configuration" in doc and not isinstance(doc["configuration"], dict):
        raise _desc_error("'configuration' is not an object")
    devices = doc.get("devices")
    if devices is None:
        raise _desc_error("no 'devices'")
    if not isinstance(devices, list):
        raise _desc_error("'devices' is not a list")

    index: dict[tuple[str, int], dict[str, Any]] = {}
    for number, dev in enumerate(devices):
        if not isinstance(dev, dict):
            raise _desc_error(f"device {number} is not an object")
        name = dev.get("name")
        if name is None:
            raise _desc_error(f"device {number} has no 'name'")
        if not isinstance(name, str):
            raise _desc_error(f"device {number} has a 'name' that is not a string")
        instance = dev.get("instance_id")
        if instance is None:
            raise _desc_error(f"device {number} ({name!r}) has no 'instance_id'")
        if not _is_int(instance) or not 0 <= instance <= _BE32_MAX:
            raise _desc_error(f"device {number} ({name!r}) has an invalid 'instance_id' "
                              f"{instance!r}")
        if "version" in dev and not _is_int(dev["version"]):
            raise _desc_error(f"device {number} ({name!r}) has a 'version' that is not an "
                              "integer")
        key = (name, instance)
        if key in index:
            raise _desc_error(f"device {number}: {name!r} instance {instance} is described "
                              "twice")
        index[key] = dev
    return VmDescription(data, doc, devices, index)


def describe_sections(desc: VmDescription) -> list[tuple[str, int, int | None]]:
    """``(idstr, instance_id, version)`` per described section, in JSON order.

    ``version`` is None for old-style sections, which the JSON gives no version.
    """
    out: list[tuple[str, int, int | None]] = []
    for dev in desc.devices:
        version = dev.get("version")
        out.append((dev["name"], dev["instance_id"], version if _is_int(version) else None))
    return out


#: Unsigned fields this wide are machine words (registers, addresses, flags): shown
#: in hex by a reader for people (:class:`Register`).
_REGISTER_TYPES = frozenset({"uint32", "uint64", "uint32 equal", "uint64 equal",
                             "CPU_Double_U"})

#: Bytes a text buffer may hold: printable ASCII (space to tilde).
_PRINTABLE = frozenset(range(0x20, 0x7F))


class Register(int):
    """A 32- or 64-bit unsigned field: an ``int`` everywhere (JSON writes it in
    decimal), which a report for people shows in hex."""

    def __str__(self) -> str:
        return f"0x{int(self):x}"


def _text(data: memoryview) -> str | None:
    """A ``buffer`` field that holds a C string (printable ASCII, then only NULs, as
    QEMU's ``globalstate`` runstate): that text; None for anything else."""
    raw = bytes(data)
    text, _, pad = raw.partition(b"\0")
    if not text or pad.strip(b"\0") or not _PRINTABLE.issuperset(text):
        return None
    return text.decode("ascii")


def _hex(data: memoryview) -> str:
    if len(data) <= HEX_PREVIEW_BYTES:
        return data.hex()
    return f"{data[:HEX_PREVIEW_BYTES].hex()}... ({len(data)} bytes)"


def _decode_primitive(ftype: str, data: memoryview) -> object:
    """One element of a non-struct field; anything without a known layout -> hex."""
    n = len(data)
    spec = _INT_TYPES.get(ftype)
    if spec is not None:
        if spec[0] == n:
            value = int.from_bytes(data, "big", signed=spec[1])
            return Register(value) if ftype in _REGISTER_TYPES else value
    elif ftype == "buffer":
        text = _text(data)
        if text is not None:
            return text
    elif ftype == "bool":
        if n == 1:
            return data[0] != 0
    elif ftype == "int32 le":
        if n == 4:
            return int.from_bytes(data, "little", signed=True)
    elif ftype == "CPU_Double_U":
        if n == 8:
            upper = int.from_bytes(data[:4], "big")
            lower = int.from_bytes(data[4:], "big")
            return Register(upper << 32 | lower)
    elif ftype == "bitmap":
        if n % 8 == 0 and n <= MAX_BITMAP_WORDS_BYTES:
            return [int.from_bytes(data[i:i + 8], "big") for i in range(0, n, 8)]
    elif ftype == "nullptr" and n == 1 and data[0] == VMS_NULLPTR_MARKER:
        return None
    return _hex(data)


def _store(out: dict[str, object], arrays: set[str], key: str, values: list[object],
           is_array: bool) -> None:
    """Put a field's value(s) under its name.

    Array entries (``array_len`` or ``index``) become lists; entries that
    repeat a name (QEMU splits arrays of pointers around NULL elements into
    several entries) are joined into one list in wire order.
    """
    if key not in out:
        if is_array:
            out[key] = values
            arrays.add(key)
        else:
            out[key] = values[0] if values else None
        return
    if key not in arrays:
        out[key] = [out[key]]
        arrays.add(key)
    current = out[key]
    assert isinstance(current, list)
    current.extend(values)


class _Walk:
    """One walk over one body: checks the description as it goes, optionally decodes."""

    __slots__ = ("cur", "decode", "start", "steps", "variable")

    def __init__(self, cur: Cursor, *, decode: bool, steps: int = 0) -> None:
        self.cur = cur
        self.start = cur.pos
        self.steps = steps
        self.decode = decode
        # Bumped by every subsection and counted string: the parts of a layout
        # that depend on the bytes rather than on the description alone.
        self.variable = 0

    def fail(self, path: str, message: str, *, at: int | None = None,
             cls: type[StreamFormatError] = StreamFormatError) -> StreamFormatError:
        return self.cur.error(f"vmstate {path}: {message}", at=at, cls=cls)

    def too_many_steps(self, path: str) -> StreamFormatError:
        return self.fail(path, f"description needs more than {MAX_WALK_STEPS} steps",
                         cls=LimitExceeded)

    def step(self, path: str) -> None:
        self.steps += 1
        if self.steps > MAX_WALK_STEPS:
            raise self.too_many_steps(path)

    def charge(self, n: int, path: str) -> None:
        """Account for ``n`` elements up front, before looping over them."""
        if n > MAX_WALK_STEPS - self.steps:
            raise self.too_many_steps(path)

    def reserve(self, n: int, path: str) -> None:
        """Refuse to consume ``n`` more bytes if the section would outgrow its limit."""
        if self.cur.pos - self.start + n > MAX_SECTION_BYTES:
            raise self.fail(path, f"section would exceed {MAX_SECTION_BYTES} bytes",
                            cls=LimitExceeded)

    def int_key(self, entry: dict[str, Any], key: str, path: str, what: str) -> int:
        value = entry.get(key)
        if value is None:
            raise self.fail(path, f"{what} has no {key!r}")
        if not _is_int(value) or value < 0:
            raise self.fail(path, f"{what} has an invalid {key!r} {value!r}")
        result: int = value
        return result

    def body(self, vmsd: object, path: str, depth: int) -> dict[str, object]:
        """Fields then subsections of one vmsd; returns the decoded dict (empty if not decoding)."""
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested deeper than {MAX_DEPTH} levels", cls=LimitExceeded)
        self.step(path)
        if not isinstance(vmsd, dict):
            raise self.fail(path, "description is not an object")
        fields = vmsd.get("fields", [])
        if not isinstance(fields, list):
            raise self.fail(path, "'fields' is not a list")
        subsections = vmsd.get("subsections", [])
        if not isinstance(subsections, list):
            raise self.fail(path, "'subsections' is not a list")

        out: dict[str, object] = {}
        arrays: set[str] = set()
        for number, field in enumerate(fields):
            self.field(field, number, path, depth, out, arrays)

        subs: dict[str, object] = {}
        for number, sub in enumerate(subsections):
            name, value = self.subsection(sub, number, path, depth)
            if self.decode:
                key, n = name, 2
                while key in subs:
                    key, n = f"{name}#{n}", n + 1
                subs[key] = value
        if subs:
            key = SUBSECTIONS_KEY
            while key in out:
                key += "_"
            out[key] = subs
        return out

    def field(self, field: object, number: int, path: str, depth: int,
              out: dict[str, object], arrays: set[str]) -> None:
        # The hot path of the walk: a destination walks every device section at
        # switchover, so plain fields are checked and skipped without helpers.
        self.steps += 1
        if self.steps > MAX_WALK_STEPS:
            raise self.too_many_steps(path)
        if not isinstance(field, dict):
            raise self.fail(path, f"field {number} is not an object")
        name = field.get("name")
        if not isinstance(name, str):
            raise self.fail(path, f"field {number} has no 'name'")
        ftype = field.get("type")
        if not isinstance(ftype, str):
            raise self.fail(f"{path} > {name}", "field has no 'type'")
        size = field.get("size")
        if type(size) is not int or size < 0:
            size = self.int_key(field, "size", f"{path} > {name}", "field")  # raises
        count = 1
        is_array = False
        if "array_len" in field:
            count = self.int_key(field, "array_len", f"{path} > {name}", "field")
            is_array = True
        elif "index" in field:
            self.int_key(field, "index", f"{path} > {name}", "field")
            is_array = True

        cur = self.cur
        if not self.decode and ftype not in {"struct", "capability"}:
            end = cur.pos + count * size
            if end - self.start > MAX_SECTION_BYTES:
                self.reserve(count * size, f"{path} > {name}")
            if end > cur.end:
                raise Incomplete
            cur.pos = end
            return

        fpath = f"{path} > {name}"
        values: list[object] = []
        if ftype == "struct":
            inner = field.get("struct")
            if not isinstance(inner, dict):
                raise self.fail(fpath, "struct field has no 'struct' object")
            self.reserve(count * size, fpath)
            variable = self.variable
            for i in range(count):
                if i == 1:
                    if not self.decode and self.variable == variable:
                        # The first element read no subsection and no counted string:
                        # its layout is fixed, so every element takes ``size`` bytes.
                        self.cur.skip((count - 1) * size)
                        break
                    self.charge(count - 1, fpath)
                epath = f"{fpath}[{i}]" if count > 1 else fpath
                elem_start = self.cur.pos
                value = self.body(inner, epath, depth + 1)
                used = self.cur.pos - elem_start
                if used != size:
                    raise self.fail(epath, f"struct element took {used} bytes, the "
                                    f"description says {size}", at=elem_start)
                if self.decode:
                    values.append(value)
        elif ftype == "capability":
            # A counted string; the JSON size of these is not reliable (see module doc).
            self.charge(count, fpath)
            self.steps += count
            self.variable += 1
            for _ in range(count):
                self.reserve(1, fpath)
                length = self.cur.peek_u8()
                self.reserve(1 + length, fpath)
                text = self.cur.counted_string(f"vmstate {fpath}: capability name")
                if self.decode:
                    values.append(text)
        else:
            # Decoding (walking alone returned above). Each element becomes a
            # list entry: bound them like walk steps.
            self.reserve(count * size, fpath)
            self.charge(count, fpath)
            self.steps += count
            self.cur.need(count * size)
            for _ in range(count):
                elem_start = self.cur.pos
                data = self.cur.take(size)
                values.append(self.element(field, ftype, data, elem_start, fpath, depth))
        if self.decode:
            _store(out, arrays, name, values, is_array)

    def element(self, field: dict[str, Any], ftype: str, data: memoryview, at: int,
                path: str, depth: int) -> object:
        """Decode one non-struct element; inline descriptions (tmp, vstruct) when they fit."""
        if isinstance(field.get("fields"), list):
            inner = _Walk(Cursor(data, base=self.cur.base + at), decode=True,
                          steps=self.steps)
            try:
                value = inner.body(field, path, depth + 1)
            except (StreamFormatError, Incomplete):
                value = None
            self.steps = inner.steps
            if value is not None and inner.cur.remaining == 0:
                return value
        return _decode_primitive(ftype, data)

    def subsection(self, sub: object, number: int, path: str,
                   depth: int) -> tuple[str, object]:
        self.step(path)
        if not isinstance(sub, dict):
            raise self.fail(path, f"subsection {number} is not an object")
        name = sub.get("vmsd_name")
        if not isinstance(name, str):
            raise self.fail(path, f"subsection {number} has no 'vmsd_name'")
        version = sub.get("version")
        if version is not None and not _is_int(version):
            raise self.fail(path, f"subsection {name!r} has an invalid 'version' {version!r}")
        self.variable += 1
        at = self.cur.pos
        self.reserve(2, path)
        marker = self.cur.u8()
        if marker != _SUBSECTION:
            raise self.fail(path, f"expected subsection marker 0x05 for {name!r}, found "
                            f"{marker:#04x}", at=at)
        length = self.cur.peek_u8()
        self.reserve(1 + length + 4, path)
        wire_name = self.cur.counted_string(f"vmstate {path}: subsection name")
        if wire_name != name:
            raise self.fail(path, f"expected subsection {name!r}, found {wire_name!r}", at=at)
        wire_version = self.cur.be32()
        if version is not None and wire_version != version:
            raise self.fail(path, f"subsection {name!r} has version {wire_version} on the "
                            f"wire, the description says {version}", at=at)
        value = self.body(sub, f"{path} > {name}", depth + 1)
        return name, value


def _label(desc: object) -> str:
    if isinstance(desc, dict):
        for key in ("name", "vmsd_name"):
            value = desc.get(key)
            if isinstance(value, str):
                return repr(value)
    return "section"


def section_body_length(desc: dict[str, Any], buf: bytes | bytearray | memoryview,
                        offset: int, *, base: int = 0) -> int:
    """Length of the FULL section body that starts at ``buf[offset]``.

    ``desc`` is the device's entry from :meth:`VmDescription.device`; the body
    is the bytes after the section header, up to but not including the
    ``0x7E`` footer (which the caller checks). ``base`` is the stream offset of
    ``buf[0]``, used in error offsets.

    Raises :class:`Incomplete` if the buffer ends before the body does (read
    more and call again), :class:`StreamFormatError` if the bytes disagree with
    the description or the description is malformed, :class:`LimitExceeded`
    if it would exceed ``MAX_SECTION_BYTES``, ``MAX_DEPTH`` or ``MAX_WALK_STEPS``.
    """
    if not 0 <= offset <= len(buf):
        raise ValueError(f"offset {offset} outside a buffer of {len(buf)} bytes")
    walk = _Walk(Cursor(buf, offset, base=base), decode=False)
    walk.body(desc, _label(desc), 0)
    return walk.cur.pos - offset


def decode_fields(desc: dict[str, Any], body: bytes | bytearray | memoryview, *,
                  base: int = 0) -> dict[str, object]:
    """Decode one whole section body into nested dicts, for display.

    Keys are the field names of the description (QEMU already made repeated
    names unique with ``[k]``); arrays are lists, structs dicts, integers
    decoded by type (32- and 64-bit unsigned ones as :class:`Register`, an
    ``int`` that prints in hex), a ``buffer`` holding a NUL-padded printable
    ASCII string as that text, anything else a hex string (long ones cut to
    ``HEX_PREVIEW_BYTES`` plus their length). Subsections are under
    ``"subsections"`` keyed by their vmsd name.

    The body must be exactly what :func:`section_body_length` delimited: a
    short body or bytes after the described fields raise
    :class:`StreamFormatError` (offsets are ``base`` + position in ``body``).
    """
    if len(body) > MAX_SECTION_BYTES:
        raise LimitExceeded(f"vmstate {_label(desc)}: body of {len(body)} bytes exceeds "
                            f"{MAX_SECTION_BYTES}")
    label = _label(desc)
    walk = _Walk(Cursor(body, base=base), decode=True)
    try:
        out = walk.body(desc, label, 0)
    except Incomplete:
        raise TruncatedStream(f"vmstate {label}: body of {len(body)} bytes ends before the "
                              "described fields do", offset=base + len(body)) from None
    if walk.cur.remaining:
        raise walk.fail(label, f"{walk.cur.remaining} bytes after the described fields")
    return out
