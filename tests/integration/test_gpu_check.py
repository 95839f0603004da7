"""bench/gpu_check.py, the prepared device check, runs dry on the CPU (tiny sizes, the same code paths), so it
cannot rot between the sessions that have a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_device_check_dry_run_fills_every_row(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    checks = {r[0].lstrip("| ") for r in rows[1:]}
    assert checks == {"1 gpu tests", "2 packed = unpacked", "3 LoRA SFT", "4 QLoRA", "5 pre-training",
                      "6 generation"}, rows
    assert not any(r[1] == "failed" for r in rows)
    packed = next(r for r in rows if r[0] == "| 2 packed = unpacked" and "sdpa" in r[1])
    assert float(packed[2].split()[4]) < 1e-4  # float32 on CPU: packed and alone agree
    assert "(falls)" in next(r for r in rows if r[0] == "| 4 QLoRA")[2]
