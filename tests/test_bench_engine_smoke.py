"""Smoke test: ``benchmarks/bench_engine.py --quick`` runs to the end and reports ratios.

No timing is asserted (the machine is shared and noisy): only that the three variants
(QEMU -> QEMU, QEMU -> QEMU with -mem-prealloc, livemig -> livemig) each completed one
migration, that the table carries a livemig/QEMU ratio, and that the JSON agrees. A
benchmark that hangs is stopped with SIGTERM (it then kills its machines and removes its
files) and, if that is not enough, SIGKILL of its whole process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_engine.py"

#: Seconds for the whole --quick run: six machines of 256 MiB started, three migrations.
DEADLINE = 300.0
#: Seconds the benchmark has to clean up after SIGTERM before its group is killed.
TERM_GRACE = 20.0


@pytest.mark.qemu
def test_bench_engine_quick(tmp_path: Path) -> None:
    out_json = tmp_path / "engine.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--json-out", str(out_json),
           "--retries", "0", "--wait-idle", "5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=TERM_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"bench_engine.py --quick did not finish within {DEADLINE:.0f} s\n"
                    f"stdout:\n{stdout}\nstderr:\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"

    ratio = re.search(r"livemig / qemu: src_total_time (\d+\.\d+)x, src_wall (\d+\.\d+)x, "
                      r"dst_wall (\d+\.\d+)x", stdout)
    assert ratio, f"no livemig/qemu ratio in the table:\n{stdout}"
    assert all(float(x) > 0 for x in ratio.groups())
    assert "livemig / qemu-prealloc:" in stdout

    doc = json.loads(out_json.read_text())
    entry = doc["summary"]["4"]
    for variant in ("qemu", "qemu-prealloc", "livemig"):
        m = entry["variants"][variant]
        assert m["ok"] == 1, (variant, m)
        assert m["src_cpu_per_gib"] > 0 and m["dst_cpu_per_gib"] > 0, (variant, m)
        # every page of the 256 MiB guest had data: at least ~255 MiB went over
        assert m["transferred"] >= 255 << 20, (variant, m)
    assert entry["ratios"]["livemig/qemu dst_wall_s"] > 0
