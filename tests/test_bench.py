"""The benchmarks under bench/ still run (they time nothing here: tiny settings, output shape only).

Slow (torch subprocesses): `make test-all` runs them, `make test` does not.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run_bench(script: str, out, *args: str) -> dict:
    """Run `bench/<script> ... --out out` and return the JSON it wrote."""
    result = subprocess.run([sys.executable, f"bench/{script}", *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_host_overhead_bench_runs_the_training_loop(tmp_path):
    report = _run_bench("host_overhead.py", tmp_path / "host_overhead.json",
                        "--steps", "20", "--rounds", "1", "--log_every", "10")
    assert set(report["us_per_step"]) == {"bare", "loop", "sync"}
    assert all(value > 0 for value in report["us_per_step"].values())


def test_trackers_bench_times_writes_with_and_without_trackers(tmp_path):
    report = _run_bench("trackers.py", tmp_path / "trackers.json", "--writes", "20")
    assert set(report["results"]) == {"none", "offline", "stuck"}
    assert all(row["us_per_write"] > 0 for row in report["results"].values())
    assert report["results"]["offline"]["dropped"] == 0


def test_train_step_bench_compares_jaxclf_with_timm(tmp_path):
    report = _run_bench("train_step.py", tmp_path / "train_step.json", "--models", "resnet18",
                        "--frameworks", "jaxclf,timm_eager", "--size", "32", "--batch", "2", "--steps", "1", "--rounds", "1")
    measured = report["results"]["resnet18"]
    assert set(measured) == {"jaxclf", "timm_eager"}
    assert all(entry["images_per_sec"] > 0 for entry in measured.values())
    assert measured["jaxclf"]["gflops_per_image"] > 0


def test_profile_step_groups_thunk_times_by_op(tmp_path):
    rows = _run_bench("profile_step.py", tmp_path / "profile.json",
                      "--model", "resnet18", "--size", "32", "--batch", "2", "--top", "5")["rows"]
    assert rows and all(row["ms"] >= 0 and row["thunks"] >= 1 for row in rows)
    assert any(row["op"].startswith("transpose(jvp") for row in rows)  # the backward pass is in it
    assert [row["ms"] for row in rows] == sorted((row["ms"] for row in rows), reverse=True)


def test_matmul_bench_times_xla_and_torch_on_vit_shapes(tmp_path):
    report = _run_bench("matmul.py", tmp_path / "matmul.json", "--model", "vit_small_patch16_224",
                        "--batch", "1", "--size", "64", "--rounds", "1")
    products = {row["product"] for row in report["rows"]}
    assert {"qkv x W", "fc2 x^T dy", "attn P V"} <= products and len(products) == 15
    assert all(row["xla_ms"] > 0 and row["torch_ms"] > 0 for row in report["rows"])


def test_serve_bench_loads_both_servers(tmp_path, trained_workdir, digits_root):
    report = _run_bench("serve.py", tmp_path / "serve.json", "--workdir", trained_workdir,
                        "--import_file", "tests/tiny_config.py", "--image_size", "16",
                        "--images", f"{digits_root}/val", "--clients", "1,4", "--requests", "5", "--seconds", "5",
                        "--rounds", "1", "--max_batch", "4")
    assert [row["clients"] for row in report["table"]] == [1, 4]
    for row in report["table"]:
        for mode in ("batching", "no_batching"):
            assert row[mode]["requests_per_s"] > 0 and row[mode]["server_cpu_ms_per_request"] > 0
    assert all(m["errors"] == 0 and m["requests"] == 20 for m in report["results"]["batching"]["4"])
    assert report["table"][0]["no_batching"]["mean_batch_images"] == 1


def test_inference_bench_times_jax_onnx_tflite_and_int8(tmp_path):
    report = _run_bench("inference.py", tmp_path / "inference.json", "--models", "resnet18", "--size", "32",
                        "--batch", "2", "--rounds", "1", "--latency_calls", "1", "--throughput_calls", "1",
                        "--calibration", "2")
    measured = report["results"]["resnet18"]["runtimes"]
    assert set(measured) == {"jax", "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static", "tflite_fp32", "tflite_int8"}
    assert all(entry["latency_ms"] > 0 and entry["images_per_sec"] > 0 for entry in measured.values())
    assert measured["onnx_int8_static"]["file_mib"] < measured["onnx_fp32"]["file_mib"] / 3
    assert measured["tflite_int8"]["file_mib"] < measured["tflite_fp32"]["file_mib"] / 3
    assert "| resnet18 32px | onnx_fp32 |" in report["table"]


def test_edge_bench_measures_sparse_and_channel_pruned_models(tmp_path):
    report = _run_bench("edge.py", tmp_path / "edge.json", "--no-digits", "--models", "resnet18", "--size", "32",
                        "--prunings", "dense,sparse80,channels30", "--batch", "2", "--rounds", "1",
                        "--calibration", "2")
    results = {key.split("/")[1]: entry for key, entry in report["results"].items()}
    assert results["sparse80"]["zero_fraction"] > 0.75 and results["dense"]["zero_fraction"] < 0.01
    assert results["channels30"]["params"] < 0.8 * results["dense"]["params"]
    fp32 = {name: entry["runtimes"]["onnx_fp32"] for name, entry in results.items()}
    assert fp32["sparse80"]["file_mib"] == pytest.approx(fp32["dense"]["file_mib"], rel=1e-3)  # same shapes
    assert fp32["sparse80"]["zipped_mib"] < 0.5 * fp32["dense"]["zipped_mib"]  # zeros compress
    assert fp32["channels30"]["file_mib"] < 0.8 * fp32["dense"]["file_mib"]


def test_input_pipeline_bench_compares_the_loaders_and_times_the_stages(tmp_path):
    report = _run_bench("input_pipeline.py", tmp_path / "input.json", "--images", "120", "--batch", "8",
                        "--batches", "3", "--rounds", "1", "--stage_images", "3", "--stage_rounds", "1",
                        "--only", "jaxclf,torchvision", "--root", str(tmp_path / "images"))
    (row,) = report["results"]
    assert row["jaxclf_worker_cpu"] > 0 and row["torchvision_worker_cpu"] > 0 and row["jaxclf_ratio_per_worker_cpu"] > 0
    stages = report["cpu_ms_per_image_one_process"]["imagenet_like"]
    assert all(ms > 0 for ms in stages.values()) and any("decode_for_crop" in name for name in stages)


def test_train_loop_bench_runs_the_loop_against_the_step(tmp_path):
    report = _run_bench("train_loop.py", tmp_path / "loop.json", "--models", "tiny_cnn", "--batch", "8",
                        "--log_every", "2", "--windows", "1", "--images", "40", "--root", str(tmp_path / "images"))
    result = report["results"]["tiny_cnn"]
    assert result["step_images_per_sec"] > 0 and 0 < result["fraction"]
    assert result["loop"]["steps"] == 2 and result["loop"]["parts_ms_per_step"]["input wait"] >= 0
    assert isinstance(result["workers_needed_for_the_step_rate"], int) and result["workers_needed_for_the_step_rate"] >= 0


def test_step_program_compares_two_trees(tmp_path):
    report = _run_bench("step_program.py", tmp_path / "program.json", "--base-tree", ".", "--models", "resnet18",
                        "--kernels", "plain", "--size", "32", "--batch", "2")
    assert [(row["model"], row["same"]) for row in report["rows"]] == [("resnet18", True)]


def test_lora_bench_reports_what_each_way_trains_and_keeps(tmp_path):
    report = _run_bench("lora.py", tmp_path / "lora.json", "--models", "vit_tiny_patch16_224",
                        "--size", "32", "--batch", "2", "--rounds", "1", "--steps", "1")
    for ways in report["steps"].values():
        full, lora, probe = ways["full"], ways["lora"], ways["probe"]
        assert full["trainable_fraction"] == 1.0 > lora["trainable_fraction"] > probe["trainable_fraction"] > 0
        assert full["optimizer_state_bytes"] > lora["optimizer_state_bytes"] > probe["optimizer_state_bytes"]
        assert full["step_time_vs_full"] == 1.0 and all(w["step_s"] > 0 for w in ways.values())


def test_representations_bench_agrees_with_scikit_learn(tmp_path):
    report = _run_bench("representations.py", tmp_path / "representations.json")
    for name, row in report["results"].items():
        if "reference" in row:
            assert abs(row["jaxclf"] - row["reference"]) <= 0.005, name
    assert report["results"]["knn k=20 T=0.07"]["max_relative_score_difference"] < 1e-4


def test_tensorrt_bench_exports_and_skips_without_a_gpu(tmp_path):
    """Here (no GPU, no tensorrt): the ONNX models and their QDQ int8 twins are made, then the GPU part is skipped."""
    report = _run_bench("tensorrt_bench.py", tmp_path / "tensorrt.json", "--models", "mobilenetv3_small_100",
                        "--size", "32", "--calibration", "2")
    assert "tensorrt package is not installed" in report["skipped"] or "no GPU" in report["skipped"]
    sizes = report["onnx_mib"]["mobilenetv3_small_100"]
    assert 0 < sizes["int8"] < sizes["fp32"] / 3


def test_gpu_script_skips_its_tensorrt_part_without_tensorrt(tmp_path):
    result = subprocess.run(["bash", "bench/gpu.sh", str(tmp_path)], env={**os.environ, "GPU_PARTS": "tensorrt",
                            "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tensorrt: skipped" in result.stdout


def test_memory_bench_measures_remat_against_none(tmp_path):
    rows = _run_bench("memory.py", tmp_path / "memory.json", "--models", "vit_tiny_patch16_224", "--batch", "8",
                      "--size", "64", "--time_batch", "2", "--time_size", "32", "--steps", "1", "--rounds", "1")["rows"]
    assert [row["remat"] for row in rows] == ["none", "dots_saveable", "nothing_saveable"]
    assert rows[2]["temporaries_bytes"] < rows[1]["temporaries_bytes"] < rows[0]["temporaries_bytes"]
    assert all(row["step_s"] > 0 for row in rows)


def test_model_create_bench_times_a_build_in_a_fresh_process(tmp_path):
    report = _run_bench("model_create.py", tmp_path / "model_create.json", "--models", "mobilenetv3_small_100",
                        "--rounds", "1")
    row = report["table"]["mobilenetv3_small_100"]["this"]
    assert row["seconds"] > 0 and row["compiles"] >= 1
