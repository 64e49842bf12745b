"""The public API in ``livemig/__init__.py``: real signatures, and results that print
without their bytes.

The functions there import their machinery lazily, so their parameters are written out a
second time; these tests hold them to the functions in ``livemig/commands/`` they call.
A result printed in a REPL or a log line must say how many device sections it holds and
how large they are, not dump megabytes of raw device state.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import livemig_env
from peers import read_capture

import livemig
from livemig.commands import inspect as inspect_cmd
from livemig.commands import receive as receive_cmd
from livemig.commands import relay as relay_cmd
from livemig.commands import send as send_cmd
from livemig.migration.common.stats import TransferStats

#: A printed result longer than this dumps something it should summarise: a LoadResult
#: of a pc guest is ~450 characters, a ReceiveResult around it ~700.
MAX_REPR = 1500

PUBLIC = {
    "receive": receive_cmd.receive,
    "send": send_cmd.send,
    "relay": relay_cmd.relay,
    "inspect": inspect_cmd.inspect_file,
    "extract": inspect_cmd.extract,
}


def _params(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_signature_is_real(name: str) -> None:
    fn = getattr(livemig, name)
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds, name
    assert inspect.Parameter.VAR_KEYWORD not in kinds, name
    assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, name
    doc = inspect.getdoc(fn) or ""
    # what it does, what it returns, and which errors say what went wrong
    assert len(doc.splitlines()) >= 5 and "Error`" in doc, f"{name}: {doc!r}"


@pytest.mark.parametrize("name", ["receive", "send", "relay", "inspect"])
def test_signature_mirrors_the_command(name: str) -> None:
    """Names, kinds (positional or keyword-only) and defaults, in order."""
    assert _params(getattr(livemig, name)) == _params(PUBLIC[name])


def test_extract_signature() -> None:
    # The public name of the first argument has been ``snapshot`` since 0.1.0; the
    # command's is ``path``. Same positions, no defaults.
    assert [(n, k) for n, k, _ in _params(livemig.extract)] == [
        ("snapshot", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("block", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("output", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("max_ram", inspect.Parameter.KEYWORD_ONLY)]
    assert [k for _, k, _ in _params(PUBLIC["extract"])] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3 + [inspect.Parameter.KEYWORD_ONLY]
    assert _params(livemig.extract)[3] == _params(PUBLIC["extract"])[3]


def test_import_stays_light() -> None:
    """``import livemig`` (every CLI start does it) loads no numpy and no command."""
    code = ("import sys, livemig; print(sorted(m for m in sys.modules if m == 'numpy' "
            "or m.startswith('livemig.commands')))")
    r = subprocess.run([sys.executable, "-c", code], env=livemig_env(), capture_output=True,
                       text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Printing results
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """QEMU 10's precopy stream of a 32 MiB pc guest: device sections and a JSON."""
    path = tmp_path_factory.mktemp("api") / "qemu10.stream"
    path.write_bytes(read_capture("qemu10.0-precopy.stream"))
    return path


def assert_summarised(obj: object) -> str:
    text = repr(obj)
    assert len(text) < MAX_REPR, f"{type(obj).__name__}: {len(text)} characters:\n{text}"
    for raw in ("b'", 'b"', "\\x", "bytearray"):
        assert raw not in text, f"{type(obj).__name__} shows raw bytes ({raw}):\n{text}"
    return text


def test_received_result_prints_a_summary(stream: Path, tmp_path: Path) -> None:
    result = livemig.receive(f"file:{stream}", str(tmp_path / "vm.snap"))
    assert len(result.load.device_sections) > 5  # there is something to leave out
    text = assert_summarised(result)
    n = len(result.load.device_sections)
    size = sum(len(s.raw) for s in result.load.device_sections)
    assert f"{n} device sections" in text
    assert f"{size / 1024:.1f} KiB" in text, text
    assert "vmdesc_json=" in text and "machine='pc-i440fx-10.0'" in text
    assert_summarised(result.load)


def test_loaded_and_inspected_results_print_a_summary(stream: Path) -> None:
    load, sink = inspect_cmd.load_file(str(stream))
    assert_summarised(load)
    assert_summarised(inspect_cmd.Inspection(str(stream), load, sink,
                                             description=object(),
                                             report=livemig.inspect(str(stream))))


def test_inspect_report_holds_no_bytes(stream: Path) -> None:
    """``livemig.inspect`` returns JSON-ready data: digests of the sections, not them."""
    def walk(v: object) -> None:
        assert not isinstance(v, bytes | bytearray | memoryview), v
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    report = livemig.inspect(str(stream))
    assert report["devices"] and all("sha256" in d for d in report["devices"])
    walk(report)


def test_send_and_relay_results_print_a_summary(stream: Path) -> None:
    load, _ = inspect_cmd.load_file(str(stream))
    stats = TransferStats(main_bytes=1 << 20, multifd_bytes=[1 << 30] * 4)
    assert_summarised(send_cmd.SendResult(5 << 30, stats, "confirmed by the destination"))
    text = assert_summarised(relay_cmd.RelayResult(load, stats, "/tmp/vm.snap"))
    assert "device sections" in text
    assert_summarised(receive_cmd.ReceiveResult("/tmp/vm.snap", 1 << 30, load, stats))
