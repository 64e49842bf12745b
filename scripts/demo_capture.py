#!/usr/bin/env python3
"""The main job, end to end, with nothing to configure.

1. Start a QEMU 10 guest (SeaBIOS running, nothing to boot) whose RAM holds
   64 MiB of known random data.
2. Run ``livemig receive`` on a unix socket and point QEMU's ``migrate`` at it
   (multifd, 4 channels): the running VM becomes a snapshot file.
3. ``livemig inspect`` the snapshot.
4. Restore the snapshot into a fresh QEMU 10 (``mapped-ram`` + ``migrate-incoming
   file:``) and check that its RAM equals the original's, byte for byte.

Run it from the project after ``scripts/install.sh``:  .venv/bin/python scripts/demo_capture.py
Options: --memory 512M --blob 64M --channels 4 --keep DIR (keep the snapshot there).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers import QemuPeer, make_blob, parse_size  # noqa: E402

BLOB_ADDR = 0x100000


def sha(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(size))
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--blob", default="64M")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--keep", metavar="DIR", help="keep the snapshot in DIR")
    args = ap.parse_args()
    blob_size = parse_size(args.blob)
    with tempfile.TemporaryDirectory(prefix="livemig-demo-") as tmp:
        work = Path(tmp)
        blob = work / "blob.bin"
        make_blob(blob, blob_size, seed=2026)
        snap = Path(args.keep or work) / "vm.snap"
        sock = work / "mig.sock"
        print(f"demo: starting a QEMU 10 guest with {args.memory} RAM, {args.blob} of random "
              f"data at {BLOB_ADDR:#x}")
        with QemuPeer("10.0", memory=args.memory, blobs=[(str(blob), BLOB_ADDR)],
                      paused=False, workdir=str(work / "src")) as src:
            cmd = [sys.executable, "-m", "livemig.cli.main", "receive", f"unix:{sock}",
                   "-o", str(snap), "--multifd-channels", str(args.channels)]
            print("demo: $ livemig " + " ".join(cmd[3:]))
            recv = subprocess.Popen(cmd)
            deadline = time.monotonic() + 30
            while not sock.exists():
                if recv.poll() is not None or time.monotonic() > deadline:
                    print("demo: livemig receive did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            src.set_caps({"multifd": True})
            src.set_params(**{"multifd-channels": args.channels, "max-bandwidth": 10 << 30})
            print(f"demo: (qemu) migrate unix:{sock}")
            src.migrate(f"unix:{sock}")
            info = src.wait_migration(timeout=300)
            rc = recv.wait(timeout=300)
            if rc != 0:
                print(f"demo: livemig receive failed (exit {rc})", file=sys.stderr)
                return 1
            print(f"demo: QEMU reports {info['status']} in {info.get('total-time')} ms: "
                  f"{info['ram']['normal']} pages, {info['ram']['duplicate']} zero pages")
            src.pmemsave(BLOB_ADDR, blob_size, str(work / "src.mem"))
        subprocess.run([sys.executable, "-m", "livemig.cli.main", "inspect", str(snap)],
                       check=True)
        print("demo: restoring the snapshot into a fresh QEMU 10")
        with QemuPeer("10.0", memory=args.memory, incoming="defer",
                      workdir=str(work / "dst")) as dst:
            dst.set_caps({"mapped-ram": True})
            dst.migrate_incoming(f"file:{snap}")
            dst.wait_migration(timeout=300)
            dst.pmemsave(BLOB_ADDR, blob_size, str(work / "dst.mem"))
        a = sha(work / "src.mem", blob_size)
        b = sha(work / "dst.mem", blob_size)
        same = a == b and a == hashlib.sha256(blob.read_bytes()).hexdigest()
        print(f"demo: RAM after restore {'equals' if same else 'DIFFERS FROM'} the original "
              f"(sha256 {b[:16]})")
        if args.keep:
            print(f"demo: snapshot kept at {snap}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
