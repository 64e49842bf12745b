# ruff: noqa: F811 - the engine tests' ``pairs`` fixture is imported, then requested
"""vfio-sim devices in live migrations (issue 5): both transfer paths, and hostile
device-state packets injected on the wire by a source that misbehaves."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_engine import MIB, Pair, make_pair, pairs, wait_passes  # noqa: F401 - fixture

from livemig.devices.vfio_sim import VfioSimHandler
from livemig.migration.device_state_send import OutgoingDeviceStatePacket
from livemig.wire.multifd import encode_device_state_header

DEVICES = 4


def add_devices(p: Pair, size: int, transfer: str, cls: type = VfioSimHandler,
                **kw: Any) -> None:
    for i in range(DEVICES):
        p.src_m.add_device(cls(p.src_m, i, state_size=size, transfer=transfer, **kw))
        p.dst_m.add_device(VfioSimHandler(p.dst_m, i, state_size=size, transfer=transfer,
                                          source=False))
    # the devices' workers start with the machine
    p.src_m.stop()
    p.src_m.cont()


@pytest.mark.parametrize("transfer,channels", [("main", 1), ("main", 4), ("multifd", 1),
                                               ("multifd", 4)])
def test_four_devices_live(pairs: list[Pair], workdir: Path, transfer: str,
                           channels: int) -> None:
    p = make_pair(pairs, workdir, 64 * MIB, rate=40 * MIB)
    add_devices(p, 64 * MIB, transfer)
    p.configure(channels, **{"max-bandwidth": 0})
    wait_passes(p.src_w, 1)
    q = p.migrate()
    assert q["status"] == "completed", q
    assert p.dst_w.verified is True
    devs = [d for d in p.dst_m.devices if isinstance(d, VfioSimHandler)]
    assert len(devs) == DEVICES
    for d in devs:
        s = d.summary()
        assert s["verified"] is True and s["kind"] == "vfio-sim", s
        assert s["transfer"] == transfer and s["state_bytes"] >= 64 * MIB


def _vfio_header(version: int, idx: int, flags: int) -> bytes:
    return struct.pack(">III", version, idx, flags)


def _raw(idstr: str, payload: bytes) -> OutgoingDeviceStatePacket:
    hdr = encode_device_state_header(idstr, 0, len(payload))
    return OutgoingDeviceStatePacket(idstr, 0, 0, False, (hdr, payload))


def tamper(kind: str, packets: list[OutgoingDeviceStatePacket]) -> list[OutgoingDeviceStatePacket]:
    idstr = packets[0].idstr
    data = [p for p in packets if not p.is_config]
    if kind == "short":
        return [_raw(idstr, b"\0" * 8), *packets]
    if kind == "version":
        return [_raw(idstr, _vfio_header(7, 0, 0) + b"x" * 16), *packets[1:]]
    if kind == "invalid-idx":
        return [_raw(idstr, _vfio_header(0, 0xFFFFFFFF, 0) + b"x" * 16), *packets]
    if kind == "duplicate":
        return [data[0], *packets]
    if kind == "after-config":
        nxt = len(packets)
        return [*packets, _raw(idstr, _vfio_header(0, nxt, 0) + b"x" * 16)]
    if kind == "no-config":
        return data
    if kind == "unknown-device":
        return [_raw("0000:00:99.0/vfio", _vfio_header(0, 0, 0) + b"x" * 16), *packets]
    raise AssertionError(kind)


class HostileVfio(VfioSimHandler):
    """A source device whose device-state packets are damaged in one way."""

    damage = ""

    def device_state_packets(self) -> Iterator[OutgoingDeviceStatePacket] | None:
        good = super().device_state_packets()
        assert good is not None
        if self.idstr != "0000:00:04.0/vfio":
            return good
        return iter(tamper(self.damage, list(good)))


@pytest.mark.parametrize("damage,expect", [
    ("short", "shorter"), ("version", "version"), ("invalid-idx", "0xffffffff"),
    ("duplicate", "idx"), ("after-config", "after"), ("no-config", "config"),
    ("unknown-device", "0000:00:99.0/vfio")])
def test_malformed_packets_fail_cleanly(pairs: list[Pair], workdir: Path, damage: str,
                                        expect: str) -> None:
    p = make_pair(pairs, workdir, 16 * MIB, rate=10 * MIB)
    cls = type("H", (HostileVfio,), {"damage": damage})
    add_devices(p, 8 * MIB, "multifd", cls=cls)
    p.configure(2, **{"max-bandwidth": 0})
    wait_passes(p.src_w, 1)
    q = p.migrate()
    assert q["status"] == "failed", q
    d = p.dst.query_migrate()
    assert d["status"] == "failed"
    err = d["error-desc"]
    assert expect.lower() in err.lower(), err
    if damage != "unknown-device":
        assert "0000:00:04.0/vfio" in err, err
    assert p.src_m.state == "running"
    passes = p.src_w.passes
    wait_passes(p.src_w, passes + 1)
