"""bench/scale.py runs dry (1 and 3 MB of text, a 2-layer model) so the scale benchmark cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_scale_benchmark_dry_run_fills_its_rows(tmp_path):
    out = tmp_path / "scale.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| 1 lmforge preprocess", "| 3 lmforge train from shards"] * 2
    assert all("cached re-run" in r and "disk" in r for r in rows[::2])
    disks = [float(r.split("disk ")[1].split(" MB")[0]) for r in rows[::2]]
    assert disks[1] > 2 * disks[0]  # 3 MB of text makes about three times the shards of 1 MB
