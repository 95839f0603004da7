"""bench/scale.py runs dry (1 and 3 MB of text, a 2-layer model, resumes at steps 2 and 5, cutoff_len 64 and 128)
so the scale benchmark cannot rot."""

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
    names = [r.split(" | ")[0] for r in rows]
    assert names == ["| 1 lmforge preprocess", "| 3 lmforge train from shards"] * 2 + ["| 4 streamed resume"] * 2 + \
        ["| 5 LoRA SFT"] * 2
    assert all("cached re-run" in r and "disk" in r for r in rows[:4:2])
    disks = [float(r.split("disk ")[1].split(" MB")[0]) for r in rows[:4:2]]
    assert disks[1] > 2 * disks[0]  # 3 MB of text makes about three times the shards of 1 MB
    assert "killed at step 2 " in rows[4] and "killed at step 5 " in rows[5]
    assert all("with the saved position" in r and "re-reading and skipping" in r for r in rows[4:6])
    assert "cutoff_len 64 " in rows[6] and "cutoff_len 128 " in rows[7]
    rss = [float(r.split("peak RSS ")[1].split(" MB")[0]) for r in rows[6:]]
    speeds = [float(r.split("MB, ")[1].split(" tokens/s")[0]) for r in rows[6:]]
    assert all(v > 0 for v in speeds)  # measured, not nan
    if Path("/usr/bin/time").is_file():  # Debian's `time` package takes the peak; without it the row says nan
        assert all(v > 100 for v in rss)
