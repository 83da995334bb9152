"""Training-step throughput: jaxclf against timm under PyTorch (eager and torch.compile), side by side.

    .venv/bin/python bench/train_step.py --models resnet18,vit_small_patch16_224 --batch 16 --size 224

Every (framework, model) measurement runs in a fresh subprocess (own peak memory, own threads),
and the frameworks alternate within each round, so machine noise hits them alike. Each measures
the full step: forward, backward and an SGD-momentum update, on the same batch size, image size
and thread count. Prints a table (median images/s over rounds, ratio to timm eager, first-step
time including compilation, peak RSS, CPU time per image (all threads: less sensitive to a loaded
machine than wall time) and, on GPUs, peak device memory; for jaxclf also XLA's FLOP
count per image, the FLOP/s reached and, on GPUs of known peak, model FLOP utilisation) and writes
JSON (after each model, so a run cut short keeps what it measured). On a GPU it runs unchanged:
bf16 (timm under autocast, channels-last, TF32). `bench/gpu.sh` holds the GPU settings.

`--base-tree DIR` adds `jaxclf_base`: the same measurement with the jaxclf of another checkout
(e.g. `git worktree add /tmp/base main`), alternated with this one: does an edit change speed?
`--linear-probe` trains the classifier only (jaxclf: config.optim.freeze="^(?!head/)"; timm:
requires_grad on `get_classifier()` alone), to compare a probe's step with full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

FRAMEWORKS = ("jaxclf", "timm_eager", "timm_compiled")


# Head-only training for --linear-probe: jaxclf's freeze regex (every parameter but the head).
PROBE_FREEZE = "^(?!head/)"


def _size_option(model_name: str, size: int) -> dict:
    """The image-size keyword of the transformers (their position embeddings fix it); convnets take none."""
    return {"img_size": size} if "patch" in model_name else {}


def measure_jaxclf(model_name: str, batch: int, size: int, steps: int, kernels: str = "auto",
                   linear_probe: bool = False) -> dict:
    import jax

    on_gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if on_gpu else "float32"
    train_step, state, batch_data = _jaxclf_step(model_name, batch, size, dtype, jax.devices()[:1], kernels,
                                                 linear_probe)
    start = time.perf_counter()
    lowered = train_step.lower(state, batch_data)
    compiled = lowered.compile()
    state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    images_per_sec = steps * batch / (time.perf_counter() - start)
    record = {"images_per_sec": images_per_sec, "first_step_s": first, "device": jax.devices()[0].device_kind,
              "cpu_ms_per_image": 1e3 * (time.process_time() - cpu_start) / (steps * batch)}
    memory = jax.devices()[0].memory_stats() if on_gpu else None
    if memory and "peak_bytes_in_use" in memory:
        record["peak_device_mb"] = memory["peak_bytes_in_use"] / 2**20
    flops = _flops(lowered)
    if flops is None and jax.default_backend() != "cpu":
        # The GPU client counts nothing; the same step lowered for a CPU device has the same FLOPs
        # (with plain attention: the model's FLOPs, not those of cuDNN's padded tokens).
        cpu_step, cpu_state, cpu_batch = _jaxclf_step(model_name, batch, size, dtype, jax.devices("cpu")[:1], "plain",
                                                      linear_probe)
        flops = _flops(cpu_step.lower(cpu_state, cpu_batch))
    if flops:
        record["gflops_per_image"] = flops / batch / 1e9
        record["achieved_tflops"] = flops / batch * images_per_sec / 1e12
        peak = _peak_flops(jax.devices()[0].device_kind)
        if peak:
            record["mfu"] = flops / batch * images_per_sec / peak
    return record


def _jaxclf_step(model_name: str, batch: int, size: int, dtype: str, devices: list, kernels: str,
                 linear_probe: bool = False):
    """(jitted train step, state, batch) for `model_name` on `devices`, SGD-momentum like the timm side."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxclf import models
    from jaxclf.training import optim, sharding, steps as steps_lib
    from jaxclf.config import base_config

    config = base_config()
    config.optim.update(dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="constant",
                             freeze=PROBE_FREEZE if linear_probe else ""))
    config.dtype = dtype
    config.model_name = model_name
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    from jaxclf import kernels as kernels_lib

    kwargs = _size_option(model_name, size)
    kernels = kernels_lib.resolve(kernels, devices[0].platform)
    with jax.default_device(devices[0]):
        model = models.create(model_name, num_classes=1000, dtype=jnp.dtype(dtype), kernels=kernels, **kwargs)
    mesh = sharding.make_mesh(devices)
    tx, _ = optim.make_optimizer(config.optim, model, 1000, 1000)
    graphdef, _, state = steps_lib.create_train_state(model, tx)
    state_sharding = sharding.state_sharding(state, mesh, "replicate")
    state = jax.device_put(state, state_sharding)
    options = model.xla_cpu_train_options() if kernels == "cpu" else {}
    train_step = steps_lib.make_train_step(graphdef, tx, mesh, config, 1000, state_sharding, steps_lib.cross_entropy_loss(),
                                           compiler_options=options, frozen_params=optim.frozen_mask(config.optim, model))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, batch).astype(np.int32)
    return train_step, state, sharding.shard_batch({"image": images, "label": labels}, mesh)


# Dense bf16 peak FLOP/s by device kind (vendor data sheets, SXM parts); CPUs: none (no MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def _peak_flops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_FLOPS.items() if name in device_kind), None)


def _flops(lowered) -> float | None:
    """FLOPs of one train step as XLA counts them (forward, backward and update), if it reports them.

    Counted on the program before optimisation: once compiled for a GPU, convolutions and matmuls
    are cuDNN/cuBLAS custom calls that XLA's count skips (0.4 GFLOP/img for ResNet-50 on an H100)."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and analysis.get("flops") else None


def measure_timm(model_name: str, batch: int, size: int, steps: int, compiled: bool, linear_probe: bool = False) -> dict:
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On GPUs timm gets its fast settings: channels-last memory (timm train.py --channels-last) and
    # TF32 matmuls outside autocast, so the comparison is against PyTorch at its best.
    memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = timm.create_model(model_name, pretrained=False, num_classes=1000, **_size_option(model_name, size))
    model = model.to(device, memory_format=memory_format).train()
    if linear_probe:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(forward(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step().item()
    sync()
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step()
    loss.item()
    sync()
    record = {"images_per_sec": steps * batch / (time.perf_counter() - start), "first_step_s": first,
              "cpu_ms_per_image": 1e3 * (time.process_time() - cpu_start) / (steps * batch)}
    if device == "cuda":
        record["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def run_one(framework: str, model: str, batch: int, size: int, steps: int, kernels: str,
            linear_probe: bool = False) -> dict:
    """Run in this process (the child): measure, add peak RSS, return the record."""
    if framework == "jaxclf":
        record = measure_jaxclf(model, batch, size, steps, kernels, linear_probe)
    else:
        record = measure_timm(model, batch, size, steps, compiled=framework == "timm_compiled",
                              linear_probe=linear_probe)
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def child(args) -> None:
    print(json.dumps(run_one(args.framework, args.model, args.batch, args.size, args.steps, args.kernels,
                             args.linear_probe)))


def spawn(framework: str, model: str, args) -> dict:
    """One measurement in a fresh process; `jaxclf_base` runs the base tree's own copy of this script."""
    script, env = __file__, dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if framework == "jaxclf_base":
        script, framework = os.path.join(args.base_tree, "bench", "train_step.py"), "jaxclf"
        env["PYTHONPATH"] = os.path.abspath(args.base_tree)
    command = [
        sys.executable, script, "--child", "--framework", framework, "--model", model,
        "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
        *(["--kernels", args.kernels] if args.kernels != "auto" else []),
        *(["--linear-probe"] if args.linear_probe else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        return {"error": "\n".join(result.stderr.strip().splitlines()[-8:]) or "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vit_small_patch16_224,vit_base_patch16_224,"
                                            "efficientnet_b0,mobilenetv3_large_100,convnext_tiny")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement, after one untimed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--kernels", default="auto", choices=("auto", "plain", "cpu", "gpu"),
                        help="jaxclf's kernel set (jaxclf/kernels; auto: the one for this platform)")
    parser.add_argument("--base-tree", help="another checkout of jaxclf, measured as framework jaxclf_base")
    parser.add_argument("--linear-probe", action="store_true", help="train the classifier only (frozen backbone)")
    parser.add_argument("--out", default="bench/results/train_step.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    frameworks = args.frameworks.split(",") + (["jaxclf_base"] if args.base_tree else [])
    results = {}
    for model in args.models.split(","):
        runs = {f: [] for f in frameworks}
        for _ in range(args.rounds):
            for framework in frameworks:  # alternate, so drifts in machine load hit all alike
                runs[framework].append(spawn(framework, model, args))
        results[model] = {f: _summary(r) for f, r in runs.items()}
        _write(results, args)  # after each model, so a run cut short keeps what it measured
    _print_table(results, args)
    print(f"wrote {args.out}")


def _write(results: dict, args) -> None:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "load_average": os.getloadavg(), "results": results}, f, indent=2)


def _summary(records: list[dict]) -> dict:
    good = [r for r in records if "error" not in r]
    if not good:
        return {"error": records[0]["error"]}
    return {
        "images_per_sec": statistics.median(r["images_per_sec"] for r in good),
        "images_per_sec_all": [r["images_per_sec"] for r in good],
        # The first round's: torch.compile reuses its on-disk cache in later rounds, JAX does not.
        "first_step_s": good[0]["first_step_s"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
        **({"peak_device_mb": max(r["peak_device_mb"] for r in good)} if "peak_device_mb" in good[0] else {}),
        # jaxclf only: XLA's FLOP count, the FLOP/s reached, and model FLOP utilisation on known GPUs.
        **{k: good[0][k] for k in ("device", "gflops_per_image") if k in good[0]},
        **{k: statistics.median(r[k] for r in good) for k in ("achieved_tflops", "mfu", "cpu_ms_per_image")
           if k in good[0]},
    }


def _print_table(results: dict, args) -> None:
    print(f"\nbatch {args.batch}, {args.size} px, {args.threads} threads, median of {args.rounds} rounds")
    header = (f"{'model':<24}{'framework':<15}{'img/s':>9}{'vs eager':>10}{'1st step s':>12}{'peak MB':>9}{'dev MB':>8}"
              f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'MFU':>7}{'CPU-ms/img':>11}")
    print(header)
    print("-" * len(header))
    for model, by_framework in results.items():
        eager = by_framework.get("timm_eager", by_framework.get("jaxclf_base", {})).get("images_per_sec")
        for framework, r in by_framework.items():
            if "error" in r:
                print(f"{model:<24}{framework:<15}  error: {_exception_line(r['error'])[:80]}")
                continue
            ratio = f"{r['images_per_sec'] / eager:.2f}x" if eager else "-"
            print(
                f"{model:<24}{framework:<15}{r['images_per_sec']:>9.2f}{ratio:>10}"
                f"{r['first_step_s']:>12.1f}{r['peak_rss_mb']:>9.0f}{_cell(r, 'peak_device_mb', 8, '.0f')}"
                f"{_cell(r, 'gflops_per_image', 11, '.1f')}{_cell(r, 'achieved_tflops', 9, '.3f')}{_cell(r, 'mfu', 7, '.1%')}"
                f"{_cell(r, 'cpu_ms_per_image', 11, '.1f')}"
            )


def _exception_line(stderr_tail: str) -> str:
    """The `SomeError: message` line of a child's stderr tail (JAX appends notes after it)."""
    lines = stderr_tail.splitlines()
    return next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1])


def _cell(record: dict, key: str, width: int, spec: str) -> str:
    return f"{format(record[key], spec):>{width}}" if key in record else f"{'-':>{width}}"


if __name__ == "__main__":
    main()
