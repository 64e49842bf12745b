"""Progress on a terminal for long transfers (bytes, rate, pages), via rich."""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

from livemig.migration.common.stats import TransferStats

if TYPE_CHECKING:
    # rich is imported only when a terminal is there to draw on
    from rich.live import Live


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressDisplay:
    """Redraws one status line from a TransferStats in a thread of its own.

    Only draws when stderr is a terminal; ``quiet`` turns it off entirely.
    """

    def __init__(self, stats: TransferStats, *, quiet: bool = False, label: str = "",
                 verb: str = "received") -> None:
        self.verb = verb
        self.stats = stats
        self.enabled = not quiet and sys.stderr.isatty()
        self.label = label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    def _line(self) -> str:
        s = self.stats
        el = max(s.elapsed, 1e-6)
        total = f" of {_fmt_bytes(s.total_ram)} RAM" if s.total_ram else ""
        return (f"{self.label}{s.phase}: {_fmt_bytes(s.bytes)} {self.verb}{total}, "
                f"{_fmt_bytes(s.bytes / el)}/s, {s.normal_pages} pages + "
                f"{s.zero_pages} zero pages, {el:.1f} s")

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            live = Live(Text(self._line()), console=Console(stderr=True),
                        refresh_per_second=4, transient=True)
            self._live = live
            live.__enter__()

            def loop() -> None:
                while not self._stop.wait(0.25):
                    live.update(Text(self._line()))

            self._thread = threading.Thread(target=loop, name="progress")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._live is not None:
            self._live.__exit__(None, None, None)


class MigrationProgress:
    """A live view of a live migration from ``query-migrate`` answers: pass,
    transferred, remaining, rate, dirty rate, expected downtime.

    The caller feeds it (it polls QMP anyway); drawn on stderr when it is a
    terminal, nothing otherwise.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._live: Live | None = None

    @staticmethod
    def line(q: Mapping[str, Any]) -> str:
        """One line from a ``query-migrate`` answer (a QMP JSON object)."""
        ram = q.get("ram", {})
        st = q.get("status", "?")
        parts = [f"{st}", f"pass {ram.get('dirty-sync-count', 0)}",
                 f"{_fmt_bytes(ram.get('transferred', 0))} sent",
                 f"{_fmt_bytes(ram.get('remaining', 0))} left",
                 f"{ram.get('mbps', 0):.0f} Mbit/s",
                 f"dirtying {_fmt_bytes(ram.get('dirty-pages-rate', 0) * 4096)}/s"]
        if "expected-downtime" in q:
            parts.append(f"expected downtime {q['expected-downtime']} ms")
        if "cpu-throttle-percentage" in q:
            parts.append(f"throttle {q['cpu-throttle-percentage']}%")
        return ", ".join(parts)

    def update(self, q: Mapping[str, Any]) -> None:
        if self._live is not None:
            from rich.text import Text
            self._live.update(Text(self.line(q)))

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            live = Live(Text("starting"), console=Console(stderr=True),
                        refresh_per_second=8, transient=True)
            self._live = live
            live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
