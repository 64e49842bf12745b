"""The ``livemig`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Any

from livemig import __version__
from livemig.errors import MigrationError
from livemig.io.interrupts import interrupt

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _multifd_options(p: argparse.ArgumentParser, prefix: str, channels_help: str) -> None:
    """QEMU's multifd-channels / multifd-compression parameters, spelled as QEMU spells them."""
    p.add_argument(f"--{prefix}multifd-channels", type=int, default=0, metavar="N",
                   help=f"{channels_help}; 0 = multifd off (default)")
    p.add_argument(f"--{prefix}multifd-compression", default="none",
                   choices=["none", "zlib", "zstd"],
                   help="QEMU's multifd-compression parameter (default: none)")


def _accept_timeout_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accept-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="give up if no source connects within this time (default: 3600)")


def _max_ram_size(text: str) -> int:
    from livemig.errors import ConfigError
    from livemig.io.uri import parse_size
    from livemig.limits import MAX_RAM_TOTAL_BYTES

    try:
        value = parse_size(text)
    except (ConfigError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64G, 1T)") from None
    if not 0 < value <= MAX_RAM_TOTAL_BYTES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside 1 byte .. {MAX_RAM_TOTAL_BYTES >> 40}T")
    return value


def _max_ram_option(p: argparse.ArgumentParser) -> None:
    from livemig.limits import DEFAULT_MAX_GUEST_RAM

    p.add_argument("--max-ram", type=_max_ram_size, default=DEFAULT_MAX_GUEST_RAM,
                   metavar="SIZE",
                   help="refuse a VM that declares more guest RAM than this, before "
                        f"anything is sized for it (default: {DEFAULT_MAX_GUEST_RAM >> 30}G; "
                        "at most 1T)")


def _tls_options(p: argparse.ArgumentParser, prefix: str, role: str) -> None:
    """``--{prefix}tls-*``: QEMU's tls-creds-x509 object and tls-* migration parameters;
    ``role`` is "server" (a listening side) or "client"."""
    p.add_argument(f"--{prefix}tls-creds", metavar="DIR",
                   help="TLS on every channel, with the x509 credentials in DIR, laid out as "
                        "QEMU's tls-creds-x509 dir: ca-cert.pem, "
                        + ("server-cert.pem, server-key.pem" if role == "server"
                           else "client-cert.pem, client-key.pem (optional)"))
    if role == "client":
        p.add_argument(f"--{prefix}tls-hostname", metavar="NAME",
                       help="the name the destination's certificate must carry (default: "
                            "the host of a tcp: URI; required over unix:)")
    else:
        p.add_argument(f"--{prefix}tls-authz", metavar="IDENTITY", action="append",
                       default=[],
                       help="let in only clients whose certificate subject is IDENTITY, "
                            "written as QEMU's authz-simple identity, e.g. O=example,CN=client "
                            "(repeatable)")
    p.add_argument(f"--{prefix}tls-verify-peer", choices=("on", "off"), default="on",
                   help="on (default): " + (
                       "require a client certificate signed by the CA" if role == "server"
                       else "check the destination's certificate") + "; off: do not")


def _tls_kwargs(args: argparse.Namespace, prefix: str = "") -> dict[str, object]:
    """The keyword arguments of :func:`_tls_options`' options (hostname for a client,
    authz for a server)."""
    a = prefix.replace("-", "_")
    out: dict[str, object] = {
        f"{a}tls_creds": getattr(args, f"{a}tls_creds"),
        f"{a}tls_verify_peer": getattr(args, f"{a}tls_verify_peer") == "on"}
    for opt in ("tls_hostname", "tls_authz"):
        if hasattr(args, a + opt):
            out[a + opt] = getattr(args, a + opt)
    return out


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livemig",
        description="A live-migration engine that speaks QEMU's migration protocol.",
        epilog="Run 'livemig COMMAND --help' for the options of one command.")
    p.add_argument("--version", action="version", version=f"livemig {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show Python tracebacks for errors (for bug reports)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "receive", help="receive a migration from QEMU into a snapshot file",
        description="Listen for (or read) a QEMU migration and keep the whole VM, RAM and "
                    "device state, in a QEMU mapped-ram snapshot file. Point QEMU's "
                    "'migrate' at the same URI. Exits 0 once the snapshot is on disk.",
        epilog="Example: livemig receive tcp:127.0.0.1:4444 -o vm.snap, then in QEMU's "
               "monitor: migrate tcp:127.0.0.1:4444. QEMU 10 restores it with "
               "'migrate-set-capabilities mapped-ram on' and 'migrate-incoming file:vm.snap'.")
    r.add_argument("uri", metavar="URI",
                   help="tcp:HOST:PORT, unix:PATH (listen), exec:COMMAND (read its stdout) or "
                        "file:PATH (a file written by QEMU's 'migrate file:')")
    r.add_argument("-o", "--output", required=True, metavar="SNAPSHOT",
                   help="the snapshot file to write (created only when complete)")
    _multifd_options(r, "", "expect N multifd channels (QEMU's multifd capability with "
                            "multifd-channels=N)")
    _accept_timeout_option(r)
    _max_ram_option(r)
    _tls_options(r, "", "server")
    _output_options(r)

    s = sub.add_parser(
        "send", help="migrate a snapshot into a QEMU destination",
        description="Migrate a snapshot into a QEMU started with -incoming (or -incoming defer "
                    "plus --dest-qmp). Writes the stream QEMU's own source would write for "
                    "that VM. Exits 0 once the destination confirmed the migration (tcp:/unix:) "
                    "or the command exited 0 (exec:).",
        epilog="Example: qemu-system-x86_64 -M pc-i440fx-10.0 -m 1G -incoming "
               "unix:/tmp/mig.sock ... ; livemig send vm.snap unix:/tmp/mig.sock")
    s.add_argument("snapshot", metavar="SNAPSHOT")
    s.add_argument("uri", metavar="URI",
                   help="tcp:HOST:PORT or unix:PATH (the destination's -incoming address), or "
                        "exec:COMMAND (the stream goes to its stdin)")
    _multifd_options(s, "", "use N multifd channels (must match the destination)")
    s.add_argument("--dest-qmp", metavar="unix:PATH",
                   help="the destination's QMP socket: check machine type and RAM size before "
                        "sending, set the capabilities and parameters that must match, start "
                        "migrate-incoming if needed, and report QEMU's own error on failure")
    _tls_options(s, "", "client")
    _output_options(s)

    y = sub.add_parser(
        "relay", help="pass a live migration from one QEMU to another",
        description="Accept a migration from a QEMU source on LISTEN_URI and forward it, as it "
                    "arrives, to a QEMU destination listening on DEST_URI (started with "
                    "-incoming). Each hop has its own multifd settings. Enable the source's "
                    "return-path capability: the source then completes only once the "
                    "destination confirmed, and fails (and keeps running) otherwise.",
        epilog="Example: livemig relay unix:/tmp/in.sock unix:/tmp/out.sock "
               "--in-multifd-channels 4 --out-multifd-channels 2 --out-multifd-compression zstd")
    y.add_argument("listen", metavar="LISTEN_URI", help="tcp:HOST:PORT or unix:PATH")
    y.add_argument("dest", metavar="DEST_URI", help="tcp:HOST:PORT or unix:PATH")
    _multifd_options(y, "in-", "expect N multifd channels from the source")
    _multifd_options(y, "out-", "use N multifd channels to the destination")
    y.add_argument("--record", metavar="SNAPSHOT", help="also keep a snapshot of what passed")
    y.add_argument("--dest-qmp", metavar="unix:PATH",
                   help="the destination's QMP socket: once the source's stream says its "
                        "machine type and RAM, check them against the destination before "
                        "forwarding, set the capabilities and parameters that must match, "
                        "start migrate-incoming if needed, and report QEMU's own error on "
                        "failure")
    _max_ram_option(y)
    _accept_timeout_option(y)
    _tls_options(y, "in-", "server")
    _tls_options(y, "out-", "client")
    _output_options(y)

    i = sub.add_parser(
        "inspect", help="show what a snapshot or a migration stream file holds",
        description="Machine type, stream version, RAM blocks (pages present, zero pages) "
                    "and every device section (size, sha256 of its body) of a snapshot or of "
                    "a stream QEMU wrote with 'migrate exec:cat > FILE' or 'migrate file:'; "
                    "for a snapshot of a migration with device state over multifd, the "
                    "device-state packets of each device (--json lists every packet).")
    i.add_argument("path", metavar="SNAPSHOT_OR_STREAM")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--fields", action="store_true",
                   help="also decode every device section's vmstate fields")
    _max_ram_option(i)

    e = sub.add_parser(
        "extract", help="write one RAM block of a snapshot as a raw image",
        description="Write one RAM block as a raw file: byte N of the file is byte N of the "
                    "block (for pc.ram below 3.5 GiB, guest-physical address N).")
    e.add_argument("snapshot", metavar="SNAPSHOT")
    e.add_argument("--block", required=True, metavar="NAME", help="RAM block name, e.g. pc.ram")
    e.add_argument("-o", "--output", required=True, metavar="RAWFILE")
    _max_ram_option(e)

    v = sub.add_parser(
        "vhost-user-backend", help="run a virtio-fs vhost-user back-end with a migratable state",
        description="A vhost-user back-end that QEMU's vhost-user-fs-pci can front. It serves "
                    "no files; it holds a state (from --seed) that moves with the VM through "
                    "vhost-user state transfer (SET_DEVICE_STATE_FD), for testing migrations. "
                    "Exits 0 on SIGTERM.",
        epilog="Example: livemig vhost-user-backend --socket-path /tmp/vufs.sock --seed 7 "
               "--state-file /tmp/vufs.json; then qemu-system-x86_64 ... -chardev "
               "socket,id=c0,path=/tmp/vufs.sock -device vhost-user-fs-pci,chardev=c0,tag=t0")
    from livemig.vhost_user.cli import add_arguments as _vhost_user_arguments

    _vhost_user_arguments(v)
    from livemig.cli import demo as demo_cli
    from livemig.cli import run as run_cli

    run_cli.add_parser(sub)
    demo_cli.add_parser(sub)
    return p


def _fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _cmd_receive(args: argparse.Namespace) -> int:
    from livemig.cli.progress import ProgressDisplay
    from livemig.commands.receive import receive
    from livemig.migration.common.stats import TransferStats

    stats = TransferStats()

    def listening(addr: str) -> None:
        if not args.quiet and not args.json:
            print(f"livemig: waiting for a migration on {addr}", file=sys.stderr, flush=True)

    with ProgressDisplay(stats, quiet=args.quiet):
        res = receive(args.uri, args.output, multifd_channels=args.multifd_channels,
                      multifd_compression=args.multifd_compression, stats=stats,
                      accept_timeout=args.accept_timeout, on_listening=listening,
                      max_ram=args.max_ram, **_tls_kwargs(args))  # type: ignore[arg-type]
    summary = {
        "snapshot": res.snapshot,
        "snapshot_bytes": res.snapshot_bytes,
        "machine": res.load.configuration.machine if res.load.configuration else None,
        "ram_total": stats.total_ram,
        "normal_pages": stats.normal_pages,
        "zero_pages": stats.zero_pages,
        "device_sections": len(res.load.device_sections),
        "bytes_received": stats.bytes,
        "seconds": round(stats.elapsed, 3),
    }
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        el = max(stats.elapsed, 1e-9)
        print(f"livemig: {summary['machine']}: {_fmt_size(stats.total_ram)} RAM "
              f"({stats.normal_pages} pages, {stats.zero_pages} zero pages) and "
              f"{summary['device_sections']} device sections in {stats.elapsed:.2f} s "
              f"({_fmt_size(int(stats.bytes / el))}/s) -> {res.snapshot}", file=sys.stderr)
    return EXIT_OK


def _cmd_send(args: argparse.Namespace) -> int:
    from livemig.cli.progress import ProgressDisplay
    from livemig.commands.send import send
    from livemig.migration.common.stats import TransferStats

    if not os.path.exists(args.snapshot):
        raise _UsageError(f"{args.snapshot}: no such file")
    stats = TransferStats()
    with ProgressDisplay(stats, quiet=args.quiet, verb="sent"):
        res = send(args.snapshot, args.uri, multifd_channels=args.multifd_channels,
                   multifd_compression=args.multifd_compression, dest_qmp=args.dest_qmp,
                   stats=stats, **_tls_kwargs(args))  # type: ignore[arg-type]
    summary = {"snapshot": args.snapshot, "uri": args.uri, "verdict": res.verdict,
               "ram_total": stats.total_ram, "normal_pages": stats.normal_pages,
               "zero_pages": stats.zero_pages, "bytes_sent": stats.bytes,
               "seconds": round(stats.elapsed, 3)}
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        el = max(stats.elapsed, 1e-9)
        print(f"livemig: sent {_fmt_size(stats.total_ram)} RAM ({stats.normal_pages} pages, "
              f"{stats.zero_pages} zero pages) to {args.uri} in {stats.elapsed:.2f} s "
              f"({_fmt_size(int(stats.bytes / el))}/s): {res.verdict}", file=sys.stderr)
    return EXIT_OK


def _cmd_relay(args: argparse.Namespace) -> int:
    from livemig.cli.progress import ProgressDisplay
    from livemig.commands.relay import relay
    from livemig.migration.common.stats import TransferStats

    stats = TransferStats()

    def listening(addr: str) -> None:
        if not args.quiet and not args.json:
            print(f"livemig: waiting for a migration on {addr}", file=sys.stderr, flush=True)

    with ProgressDisplay(stats, quiet=args.quiet, verb="relayed"):
        res = relay(args.listen, args.dest, in_multifd_channels=args.in_multifd_channels,
                    in_multifd_compression=args.in_multifd_compression,
                    out_multifd_channels=args.out_multifd_channels,
                    out_multifd_compression=args.out_multifd_compression, record=args.record,
                    stats=stats, accept_timeout=args.accept_timeout, on_listening=listening,
                    dest_qmp=args.dest_qmp, max_ram=args.max_ram,
                    **_tls_kwargs(args, "in-"), **_tls_kwargs(args, "out-"))  # type: ignore[arg-type]
    summary = {"machine": res.load.configuration.machine if res.load.configuration else None,
               "ram_total": stats.total_ram, "normal_pages": stats.normal_pages,
               "zero_pages": stats.zero_pages, "bytes_in": stats.bytes,
               "recorded": res.recorded, "seconds": round(stats.elapsed, 3),
               "verdict": stats.phase}
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(f"livemig: relayed {_fmt_size(stats.total_ram)} RAM ({stats.normal_pages} pages, "
              f"{stats.zero_pages} zero pages) in {stats.elapsed:.2f} s: {stats.phase}",
              file=sys.stderr)
    return EXIT_OK


def _print_inspection(r: dict[str, Any]) -> None:
    print(f"{r['file']}: {r['format']}, QEMU stream version {r['stream_version']}")
    print(f"  machine:      {r['machine']}")
    runstate = r.get("runstate")
    print(f"  run state:    {runstate} when captured" if runstate else
          "  run state:    not recorded (no globalstate section)")
    if r["capabilities"]:
        print(f"  capabilities: {', '.join(r['capabilities'])}")
    print(f"  RAM:          {_fmt_size(r['ram_total'])} in {len(r['ram_blocks'])} blocks")
    w = max((len(b["name"]) for b in r["ram_blocks"]), default=4)
    print(f"    {'block':<{w}}  {'size':>10}  {'present':>9}  {'zero':>9}")
    for b in r["ram_blocks"]:
        print(f"    {b['name']:<{w}}  {_fmt_size(b['size']):>10}  {b['pages_present']:>9}  "
              f"{b['zero_pages']:>9}")
    print(f"  devices:      {len(r['devices'])} sections")
    w = max((len(d["idstr"]) for d in r["devices"]), default=5)
    for d in r["devices"]:
        print(f"    {d['idstr']:<{w}}  inst {d['instance_id']:<3} v{d['version']:<3} "
              f"{d['kind']:<5} {d['size']:>7} B  {d['sha256'][:16]}")
        if "fields" in d:
            from livemig.commands.inspect import fields_lines
            for line in fields_lines(d["fields"], "      "):
                print(line)
    states = r.get("device_state") or []
    if states:
        total = sum(len(p["packets"]) for p in states)
        print(f"  device state over multifd: {len(states)} devices, {total} packets")
        w = max(len(d["idstr"]) for d in states)
        for d in states:
            idx = sorted(p["idx"] for p in d["packets"] if p["kind"] == "data")
            span = f"data idx {idx[0]}-{idx[-1]}" if idx else "no data"
            cfg = "no config" if d["config_idx"] is None else f"config idx {d['config_idx']}"
            state = "complete" if d["complete"] else f"INCOMPLETE: {d['missing']}"
            print(f"    {d['idstr']:<{w}}  inst {d['instance_id']:<3} {d['packet_count']:>5} "
                  f"packets ({span}, {cfg})  {_fmt_size(d['data_bytes']):>10}  "
                  f"{d['data_sha256'][:16]}  {state}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from livemig.commands.inspect import inspect_file

    if not os.path.exists(args.path):
        raise _UsageError(f"{args.path}: no such file")
    r = inspect_file(args.path, fields=args.fields, max_ram=args.max_ram)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        _print_inspection(r)
    return EXIT_OK


def _cmd_extract(args: argparse.Namespace) -> int:
    from livemig.commands.inspect import extract

    if not os.path.exists(args.snapshot):
        raise _UsageError(f"{args.snapshot}: no such file")
    n = extract(args.snapshot, args.block, args.output, max_ram=args.max_ram)
    print(f"livemig: wrote {args.block} ({_fmt_size(n)}) to {args.output}", file=sys.stderr)
    return EXIT_OK


def _cmd_vhost_user_backend(args: argparse.Namespace) -> int:
    from livemig.vhost_user.cli import run

    try:
        return run(args)
    except ValueError as e:
        raise _UsageError(str(e)) from None


class _UsageError(Exception):
    pass


class _Terminated(BaseException):
    pass


def _terminate(signum: int, frame: object) -> None:
    interrupt(_Terminated())


def _cmd_run(args: argparse.Namespace) -> int:
    from livemig.cli.run import cmd_run
    return cmd_run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from livemig.cli.demo import cmd_demo
    return cmd_demo(args)


_COMMANDS = {"receive": _cmd_receive, "send": _cmd_send, "relay": _cmd_relay,
             "inspect": _cmd_inspect, "extract": _cmd_extract,
             "vhost-user-backend": _cmd_vhost_user_backend,
             "run": _cmd_run, "demo": _cmd_demo}


def _import_numpy_single_threaded() -> None:
    """livemig does no linear algebra: numpy's OpenBLAS starts one thread, not one per
    CPU (about 30 ms and 0.1-0.15 CPU s of start-up), unless the user chose a number.
    The setting is not passed on to commands livemig starts (``exec:``)."""
    if "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command in ("receive", "send", "relay"):
        _import_numpy_single_threaded()
    # SIGTERM unwinds like Ctrl-C, so that half-written output is removed.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        rc = _COMMANDS[args.command](args)
        if args.command in ("receive", "send", "relay"):
            # The work is done and on disk; skip the interpreter's teardown
            # (tens of milliseconds with numpy loaded) on the way out.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        return rc
    except KeyboardInterrupt:
        print(f"livemig {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"livemig {args.command}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # the reader of our output went away (e.g. `livemig inspect X | head`)
        with contextlib.suppress(OSError):
            # stays open: it is stdout for the rest of the process
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    except (MigrationError, _UsageError) as e:
        if args.debug:
            raise
        msg = str(e).replace("\n", " ")
        print(f"livemig {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        if args.debug:
            raise
        print(f"livemig {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except MemoryError:
        # an allocation livemig did not name (those become OutOfMemory above)
        if args.debug:
            raise
        print(f"livemig {args.command}: error: out of memory (the host refused an "
              "allocation; --debug shows where)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
