#!/usr/bin/env python3
"""Record real QEMU 7.2 / 10.0 migration streams into tests/data (see README.md there).

Every source is a paused (-S) guest with 32 MiB of RAM and two blobs of known content
(``peers.make_blob``), so tests can rebuild the expected guest memory from
``captures.json`` alone. Run from anywhere:

    python3 tests/data/make_captures.py            # all captures
    python3 tests/data/make_captures.py --only qemu7.2-precopy

The captures are not byte-for-byte reproducible (packet ordering between multifd channels,
which channel a page lands on, timing), but every run records the same kinds of stream.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA.parent))  # tests/, for peers

# after the path entry above: a script run from anywhere still finds tests/peers.py
from peers import QemuPeer, RecordingSink, make_blob, parse_size, qemu_version  # noqa: E402

MEMORY = "32M"
BLOBS = [
    {"addr": 0x100000, "size": 256 * 1024, "seed": 1},
    {"addr": 0x400000, "size": 64 * 1024, "seed": 2},
]
MAIN_MACHINE = {"7.2": "pc-i440fx-7.2", "10.0": "pc-i440fx-10.0"}
COMPRESSIONS = ["none", "zlib", "zstd"]
CHANNELS = 2
SIZE_BUDGET = 5_000_000  # bytes for all of tests/data
MULTIFD_MAGIC = bytes.fromhex("11223344")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _store_xz(path: Path, data: bytes) -> str:
    """Write ``data`` xz-compressed to ``path`` + ".xz"; return the stored file's name.

    Every binary capture is stored this way: the guest blobs are random (incompressible)
    but the rest of a stream is mostly zeros, headers and firmware, and together the raw
    captures would not fit the tests/data size budget.
    """
    out = path.with_name(path.name + ".xz")
    out.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                  preset=9 | lzma.PRESET_EXTREME))
    return out.name


def _remove_outputs(name: str) -> None:
    shutil.rmtree(DATA / name, ignore_errors=True)
    for p in DATA.glob(f"{name}.*"):
        p.unlink()


# Migration parameters worth recording (the rest are defaults unrelated to the stream).
_PARAMS = ("multifd-channels", "multifd-compression", "multifd-zlib-level",
           "multifd-zstd-level", "zero-page-detection", "mode", "direct-io")


def _start_source(version: str, machine: str, work: Path) -> QemuPeer:
    blobs = []
    for i, b in enumerate(BLOBS):
        p = work / f"blob{i}.bin"
        make_blob(p, b["size"], b["seed"])
        blobs.append((p, b["addr"]))
    vm = QemuPeer(version, machine=machine, memory=MEMORY, blobs=blobs, paused=True,
                  workdir=work, name=f"src{version}")
    # the loader really put the blobs where captures.json says
    for b in BLOBS:
        if vm.read_memory(b["addr"], b["size"]) != make_blob(None, b["size"], b["seed"]):
            vm.close()
            raise SystemExit(f"QEMU {version}: blob at {b['addr']:#x} not found in guest RAM")
    return vm


def _entry(name: str, version: str, machine: str, kind: str, vm: QemuPeer,
           seconds: float) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "qemu_version": version,
        "qemu_full_version": qemu_version(vm.binary),
        "machine": machine,
        "memory": MEMORY,
        "memory_bytes": parse_size(MEMORY),
        "paused": True,
        "uuid": None,
        "blobs": BLOBS,
        "capabilities": {k: v for k, v in vm.query_caps().items() if v},
        "parameters": {k: v for k, v in vm.query_params().items() if k in _PARAMS},
        "migration_seconds": round(seconds, 3),
    }


def capture_precopy(version: str, work: Path) -> dict[str, Any]:
    machine = MAIN_MACHINE[version]
    name = f"qemu{version}-precopy"
    _remove_outputs(name)
    raw = work / "precopy.stream"
    with _start_source(version, machine, work) as vm:
        t0 = time.monotonic()
        vm.migrate(f"exec:cat > {raw}")
        info = vm.wait_migration(timeout=120)
        seconds = time.monotonic() - t0
        entry = _entry(name, version, machine, "precopy", vm, seconds)
    data = raw.read_bytes()
    if data[:4] != b"QEVM":
        raise SystemExit(f"{raw}: does not start with QEVM")
    stored = _store_xz(DATA / f"{name}.stream", data)
    _write_json(DATA / f"{name}.query-migrate.json", info)
    entry["files"] = {"stream": stored, "query_migrate": f"{name}.query-migrate.json"}
    entry["compressed"] = "xz"
    entry["uncompressed_size"] = {stored: len(data)}
    return entry


def capture_multifd(version: str, machine: str, compression: str, name: str,
                    work: Path) -> dict[str, Any]:
    outdir = DATA / name
    _remove_outputs(name)
    outdir.mkdir()
    with RecordingSink(work / "mfd.sock") as sink, _start_source(version, machine, work) as vm:
        vm.set_caps({"multifd": True})
        vm.set_params(multifd_channels=CHANNELS, multifd_compression=compression)
        t0 = time.monotonic()
        vm.migrate(sink.uri)
        info = vm.wait_migration(timeout=120)
        seconds = time.monotonic() - t0
        conns = sink.wait(count=CHANNELS + 1, timeout=60)
        timing = sink.info()
        entry = _entry(name, version, machine, "multifd", vm, seconds)
    if len(conns) != CHANNELS + 1:
        raise SystemExit(f"{name}: expected {CHANNELS + 1} connections, got {len(conns)}")
    described = []
    for i, (data, t) in enumerate(zip(conns, timing, strict=True)):
        stored = _store_xz(outdir / f"conn{i}.bin", data)
        if data[:4] == b"QEVM":
            role, channel = "main", None
        elif data[:4] == MULTIFD_MAGIC:
            role, channel = "multifd", data[24]
        else:
            raise SystemExit(f"{name}: connection {i} starts with {data[:8].hex()}")
        described.append({
            "file": stored,
            "accept_index": i,
            "role": role,
            "channel_id": channel,
            "nbytes": len(data),
            "accepted_at": round(t["accepted_at"], 6),
            "first_byte_at": None if t["first_byte_at"] is None else round(t["first_byte_at"], 6),
        })
    roles = sorted((d["role"], d["channel_id"] if d["channel_id"] is not None else -1)
                   for d in described)
    want = sorted([("main", -1)] + [("multifd", i) for i in range(CHANNELS)])
    if roles != want:
        raise SystemExit(f"{name}: unexpected connections {described}")
    _write_json(outdir / "query-migrate.json", info)
    entry["multifd"] = {"channels": CHANNELS, "compression": compression}
    entry["connections"] = described
    entry["files"] = {
        "dir": name,
        "connections": [d["file"] for d in described],
        "query_migrate": f"{name}/query-migrate.json",
    }
    entry["compressed"] = "xz"
    entry["uncompressed_size"] = {d["file"]: d["nbytes"] for d in described}
    return entry


def capture_mapped_ram(work: Path) -> dict[str, Any]:
    version, machine = "10.0", MAIN_MACHINE["10.0"]
    name = f"qemu{version}-mapped-ram"
    _remove_outputs(name)
    raw = work / "mapped-ram.bin"
    with _start_source(version, machine, work) as vm:
        vm.set_caps({"mapped-ram": True})
        t0 = time.monotonic()
        vm.migrate(f"file:{raw}")
        info = vm.wait_migration(timeout=120)
        seconds = time.monotonic() - t0
        entry = _entry(name, version, machine, "mapped-ram", vm, seconds)
    data = raw.read_bytes()
    if data[:4] != b"QEVM":
        raise SystemExit(f"{raw}: does not start with QEVM")
    stored = _store_xz(DATA / f"{name}.bin", data)
    _write_json(DATA / f"{name}.query-migrate.json", info)
    entry["files"] = {"file": stored, "query_migrate": f"{name}.query-migrate.json"}
    entry["compressed"] = "xz"
    entry["uncompressed_size"] = {stored: len(data)}
    return entry


def all_jobs() -> list[tuple[str, Callable[[Path], dict[str, Any]]]]:
    jobs: list[tuple[str, Callable[[Path], dict[str, Any]]]] = []
    for version in ("7.2", "10.0"):
        jobs.append((f"qemu{version}-precopy", partial(capture_precopy, version)))
        for comp in COMPRESSIONS:
            name = f"qemu{version}-multifd-{comp}-{CHANNELS}ch"
            jobs.append((name, partial(capture_multifd, version, MAIN_MACHINE[version], comp,
                                       name)))
    name = f"qemu10.0-m7.2-multifd-none-{CHANNELS}ch"
    jobs.append((name, partial(capture_multifd, "10.0", "pc-i440fx-7.2", "none", name)))
    jobs.append(("qemu10.0-mapped-ram", capture_mapped_ram))
    return jobs


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[],
                    help="capture name to (re)record; repeatable; default all")
    args = ap.parse_args()
    jobs = all_jobs()
    names = [n for n, _ in jobs]
    unknown = set(args.only) - set(names)
    if unknown:
        raise SystemExit(f"unknown capture(s) {sorted(unknown)}; known: {names}")

    index_path = DATA / "captures.json"
    index: dict[str, Any] = json.loads(index_path.read_text()) if index_path.exists() else {}
    entries = {e["name"]: e for e in index.get("captures", [])}
    for name, job in jobs:
        if args.only and name not in args.only:
            continue
        work = Path(tempfile.mkdtemp(prefix="lmcap-"))  # short: holds unix sockets
        try:
            t0 = time.monotonic()
            entries[name] = job(work)
            print(f"{name}: {time.monotonic() - t0:.2f}s", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    index = {
        "about": "QEMU migration captures; regenerate with tests/data/make_captures.py",
        "page_size": 4096,
        "blob_generator": "peers.make_blob(path, size, seed) == peers.blob_bytes(size, seed): "
                          "numpy.random.default_rng(seed).bit_generator.random_raw(ceil(size/8))"
                          " as little-endian uint64, truncated to size bytes",
        "guest_ram": "blobs are at guest-physical == pc.ram offset; all other pc.ram is zero "
                     "(the guest never ran)",
        "compression": "every binary capture file is stored xz-compressed (name ends in .xz; "
                       "'uncompressed_size' per file); peers.read_capture() decompresses",
        "captures": [entries[n] for n in names if n in entries],
    }
    _write_json(index_path, index)

    total = tree_size(DATA)
    print(f"tests/data: {total} bytes", flush=True)
    if total > SIZE_BUDGET:
        raise SystemExit(f"tests/data is {total} bytes, over the {SIZE_BUDGET} byte budget")


if __name__ == "__main__":
    os.umask(0o022)
    main()
