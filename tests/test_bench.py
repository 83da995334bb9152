"""The benchmarks under bench/ still run (they time nothing here: tiny settings, output shape only)."""

import json
import subprocess
import sys


def test_host_overhead_bench_runs_the_training_loop(tmp_path):
    out = tmp_path / "host_overhead.json"
    result = subprocess.run(
        [sys.executable, "bench/host_overhead.py", "--steps", "20", "--rounds", "1", "--log_every", "10", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["us_per_step"]) == {"bare", "loop", "sync"}
    assert all(value > 0 for value in report["us_per_step"].values())
