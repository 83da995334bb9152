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


def test_train_step_bench_compares_jaxclf_with_timm(tmp_path):
    out = tmp_path / "train_step.json"
    result = subprocess.run(
        [sys.executable, "bench/train_step.py", "--models", "resnet18", "--frameworks", "jaxclf,timm_eager",
         "--size", "32", "--batch", "2", "--steps", "1", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())["results"]["resnet18"]
    assert set(measured) == {"jaxclf", "timm_eager"}
    assert all(entry["images_per_sec"] > 0 for entry in measured.values())
    assert measured["jaxclf"]["gflops_per_image"] > 0
