# ruff: noqa: F811 - the engine tests' ``pairs`` fixture is imported, then requested
"""vfio-sim devices in live migrations (issue 5): both transfer paths, and hostile
device-state packets injected on the wire by a source that misbehaves."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_engine import MIB, Pair, make_pair, pairs, wait_passes  # noqa: F401 - fixture

from livemig.commands.inspect import inspect_file
from livemig.devices.vfio import VfioSimHandler
from livemig.errors import MigrationError
from livemig.migration.source.device_state_packets import OutgoingDeviceStatePacket
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


@pytest.mark.parametrize(("transfer", "channels"), [("main", 1), ("main", 4), ("multifd", 1),
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


def hostile_pair(pairs: list[Pair], workdir: Path, damage: str, size: int) -> Pair:
    """A running pair whose source devices send multifd device state with ``damage``."""
    p = make_pair(pairs, workdir, 16 * MIB, rate=8 * MIB)
    add_devices(p, size, "multifd", cls=type("H", (HostileVfio,), {"damage": damage}))
    p.configure(2, **{"max-bandwidth": 0})
    wait_passes(p.src_w, 1)
    return p


@pytest.mark.parametrize(("damage", "expect"), [
    ("short", "shorter"), ("version", "version"), ("invalid-idx", "0xffffffff"),
    ("duplicate", "idx"), ("after-config", "after"), ("no-config", "config"),
    ("unknown-device", "0000:00:99.0/vfio")])
def test_malformed_packets_fail_cleanly(pairs: list[Pair], workdir: Path, damage: str,
                                        expect: str) -> None:
    p = hostile_pair(pairs, workdir, damage, 8 * MIB)
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


# --------------------------------------------------------------------------------------------
# Captures: a machine with vfio-sim devices -> livemig receive -> snapshot -> inspect
# --------------------------------------------------------------------------------------------


def _capture(p: Pair, workdir: Path, receive_in_thread: Any, channels: int) -> Path:
    snap = workdir / "vm.snap"
    recv = receive_in_thread(p.uri, snap, multifd_channels=channels)
    recv.wait_listening()
    p.src.migrate(p.uri)
    assert p.src.wait_migration(60) == "completed", p.src.query_migrate()
    recv.join()
    return snap


@pytest.mark.parametrize("transfer", ["main", "multifd"])
def test_capture_lists_device_state(pairs: list[Pair], workdir: Path, receive_in_thread: Any,
                                    transfer: str) -> None:
    """A stream with device state over multifd, captured by ``receive``, is listed by
    ``inspect`` packet by packet per device; the main path keeps the VFIO sections."""
    size = 4 * MIB
    p = make_pair(pairs, workdir, 16 * MIB, rate=8 * MIB)
    add_devices(p, size, transfer)
    p.configure(2, **{"max-bandwidth": 0})
    wait_passes(p.src_w, 1)
    snap = _capture(p, workdir, receive_in_thread, 2)
    sent = {d.idstr: d.state_bytes for d in p.src_m.devices if isinstance(d, VfioSimHandler)}
    config = {d.idstr: d.config_size for d in p.src_m.devices if isinstance(d, VfioSimHandler)}
    report = inspect_file(str(snap))
    vfio = [d for d in report["devices"] if d["idstr"].endswith("/vfio")]
    kinds = {name: [d["kind"] for d in vfio if d["idstr"] == name] for name in sent}
    for name, k in kinds.items():
        # setup, precopy parts, the end of the iterable, the FULL section
        assert k[0] == "START" and k[-2:] == ["END", "FULL"] and "PART" in k, (name, k)
    states = {d["idstr"]: d for d in report["device_state"]}
    if transfer == "main":
        assert states == {}
        return
    assert sorted(states) == sorted(sent)
    for name, d in states.items():
        assert d["complete"] is True and d["missing"] is None, d
        # DEV_CONFIG_STATE <config> END_OF_STATE
        assert d["instance_id"] == 0 and d["config_bytes"] == config[name] + 16
        idx = sorted(pk["idx"] for pk in d["packets"])
        assert idx == list(range(d["packet_count"])) and d["config_idx"] == idx[-1]
        assert [pk["kind"] for pk in d["packets"] if pk["idx"] == idx[-1]] == ["config"]
        assert sum(pk["bytes"] for pk in d["packets"] if pk["kind"] == "data") == d["data_bytes"]
        # the stop-copy data is part of what the device read from its data fd
        assert 0 < d["data_bytes"] <= sent[name]
    # the trailer does not disturb anything before it
    assert report["ram_blocks"][0]["pages_present"] == 16 * MIB // 4096
    # a trailer edited since: the packet's idx made a duplicate of the first one's
    raw = bytearray(snap.read_bytes())
    first = min(states.values(), key=lambda d: d["packets"][0]["offset"])["packets"]
    a, b = first[0]["offset"], first[1]["offset"]
    raw[b + 280:b + 284] = raw[a + 280:a + 284]  # multifd header (276) + VFIO version (4)
    bad = workdir / "edited.snap"
    bad.write_bytes(bytes(raw))
    with pytest.raises(MigrationError, match="duplicate idx") as e:
        inspect_file(str(bad))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("transfer", "channels"), [("main", 0), ("multifd", 2)])
def test_capture_restores_into_a_machine(pairs: list[Pair], workdir: Path,
                                         receive_in_thread: Any, transfer: str,
                                         channels: int) -> None:
    """What a snapshot keeps of VFIO devices -- their sections, and the device-state
    packets of its trailer -- goes back into a machine whose devices verify it."""
    from livemig.commands.send import send
    from livemig.errors import ConfigError

    p = make_pair(pairs, workdir, 16 * MIB, rate=8 * MIB)
    add_devices(p, 4 * MIB, transfer)
    p.configure(channels, **{"max-bandwidth": 0})
    wait_passes(p.src_w, 1)
    snap = _capture(p, workdir, receive_in_thread, channels)
    back = f"unix:{workdir}/back.sock"
    if channels:
        with pytest.raises(ConfigError, match="device state that travels over multifd"):
            send(str(snap), back)
    p.dst.migrate_incoming(back)
    send(str(snap), back, multifd_channels=channels)
    assert p.dst.wait_migration(60) == "completed", p.dst.query_migrate()
    assert p.dst_w.verified is True
    for d in p.dst_m.devices:
        if isinstance(d, VfioSimHandler):
            assert d.summary()["verified"] is True, d.summary()


@pytest.mark.parametrize(("damage", "expect"), [
    ("duplicate", "duplicate idx 0"), ("after-config", "after the config packet"),
    ("no-config", "no config packet arrived"), ("invalid-idx", "0xffffffff")])
def test_receive_refuses_malformed_device_state(pairs: list[Pair], workdir: Path,
                                                receive_in_thread: Any, damage: str,
                                                expect: str) -> None:
    p = hostile_pair(pairs, workdir, damage, 4 * MIB)
    snap = workdir / "vm.snap"
    # (a livemig source fences its packets: nothing is worth waiting for after EOF)
    recv = receive_in_thread(p.uri, snap, multifd_channels=2, device_state_drain=1.0)
    recv.wait_listening()
    p.src.migrate(p.uri)
    assert p.src.wait_migration(60) == "failed"
    with pytest.raises(MigrationError) as e:
        recv.join()
    assert expect in str(e.value).lower() and "0000:00:04.0/vfio" in str(e.value), e.value
    assert not snap.exists() and [f for f in os.listdir(workdir) if ".part" in f] == []
    assert p.src_m.state == "running"


@pytest.mark.parametrize("record", [False, True])
def test_relay_forwards_device_state(pairs: list[Pair], workdir: Path, record: bool) -> None:
    """Device state over multifd goes through ``livemig relay`` packet by packet; the
    destination's devices verify it, and a recording keeps it in its trailer."""
    import threading

    from livemig.commands.relay import relay

    p = make_pair(pairs, workdir, 16 * MIB, rate=8 * MIB)
    add_devices(p, 4 * MIB, "multifd")
    p.configure(2, **{"max-bandwidth": 0})
    wait_passes(p.src_w, 1)
    p.dst.migrate_incoming(p.uri)
    listen = f"unix:{workdir}/relay.sock"
    snap = workdir / "relayed.snap"
    out: dict[str, Any] = {}
    listening = threading.Event()

    def run() -> None:
        try:
            out["result"] = relay(listen, p.uri, in_multifd_channels=2, out_multifd_channels=2,
                                  record=str(snap) if record else None, accept_timeout=60,
                                  on_listening=lambda addr: listening.set())
        except BaseException as e:  # noqa: BLE001 - checked below
            out["error"] = e
            listening.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert listening.wait(30)
    p.src.migrate(listen)
    assert p.src.wait_migration(60) == "completed", p.src.query_migrate()
    t.join(60)
    assert "error" not in out, out
    assert p.dst.wait_migration(60) == "completed", p.dst.query_migrate()
    for d in p.dst_m.devices:
        if isinstance(d, VfioSimHandler):
            assert d.summary()["verified"] is True, d.summary()
    if record:
        states = inspect_file(str(snap))["device_state"]
        assert len(states) == DEVICES and all(s["complete"] for s in states), states
