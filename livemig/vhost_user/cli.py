"""``livemig vhost-user-backend``: the virtio-fs test back-end as a program.

Follows vhost-user.rst "Backend program conventions": ``--socket-path`` or ``--fd``,
``--print-capabilities`` prints the JSON capabilities and exits 0, no daemonizing, and
SIGTERM ends it at once with status 0. The command line parser imports only this
module's :func:`add_arguments`; the back-end is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from types import FrameType


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH",
                       help="listen on this Unix socket (created once it listens)")
    where.add_argument("--fd", type=int, metavar="N",
                       help="use the inherited socket N (listening, or already connected)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="start with the state derived from N (default: an empty state)")
    p.add_argument("--state-size", type=int, metavar="BYTES",
                   help="payload size of the seeded state (default: 200000 + seed %% 1000)")
    p.add_argument("--state-file", metavar="PATH",
                   help="write the state's sha256, size and save/load counts here as JSON, "
                        "at start and after every save and load")
    p.add_argument("--reply-fd", action="store_true",
                   help="answer SET_DEVICE_STATE_FD with a pipe of our own (the reply-fd "
                        "variant) instead of using the front-end's")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user.json capabilities and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log every vhost-user message on stderr")


def run(args: argparse.Namespace) -> int:
    from livemig.vhost_user.backend import BackendServer
    from livemig.vhost_user.fs_backend import FsBackend

    if args.print_capabilities:
        print(json.dumps(FsBackend().capabilities()))
        return 0
    if args.socket_path is None and args.fd is None:
        raise ValueError("one of --socket-path and --fd is required")
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="livemig vhost-user-backend: %(message)s")
    backend = FsBackend(args.seed, state_size=args.state_size, state_file=args.state_file)
    server = BackendServer(backend, socket_path=args.socket_path, fd=args.fd,
                           reply_fd=args.reply_fd)

    def terminate(signum: int, frame: FrameType | None) -> None:
        # No exception from here: everything serve_forever() waits on is woken by the
        # shutdown, and it returns once it has joined what it started.
        server.shutdown()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    info = backend.info()
    logging.getLogger("livemig.vhost_user").info(
        "virtio-fs back-end on %s, state %d bytes sha256 %s",
        args.socket_path or f"fd {args.fd}", info.size, info.sha256[:16])
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return 0
