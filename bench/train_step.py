"""Training-step throughput: jaxclf against timm under PyTorch (eager and torch.compile), side by side.

    .venv/bin/python bench/train_step.py --models resnet18,vit_small_patch16_224 --batch 16 --size 224

Every (framework, model) measurement runs in a fresh subprocess (own peak memory, own threads),
and the frameworks alternate within each round, so machine noise hits them alike. Each measures
the full step: forward, backward and an SGD-momentum update, on the same batch size, image size
and thread count. Prints a table (median images/s over rounds, ratio to timm eager, first-step
time including compilation, peak RSS; for jaxclf also XLA's FLOP count per image, the FLOP/s reached
and, on GPUs of known peak, model FLOP utilisation) and writes JSON. On a GPU it runs unchanged
(bf16 there).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

FRAMEWORKS = ("jaxclf", "timm_eager", "timm_compiled")


def measure_jaxclf(model_name: str, batch: int, size: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxclf import models, optim, sharding, steps as steps_lib
    from jaxclf.config import base_config

    on_gpu = jax.default_backend() == "gpu"
    config = base_config()
    config.optim.update(dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="constant"))
    config.dtype = "bfloat16" if on_gpu else "float32"
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    kwargs = {"img_size": size} if model_name.startswith("vit") else {}
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    model = models.create(model_name, num_classes=1000, dtype=dtype, **kwargs)
    mesh = sharding.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(config.optim, nnx.state(model, nnx.Param), 1000, 1000)
    graphdef, _, state = steps_lib.create_train_state(model, tx)
    state_sharding = sharding.state_sharding(state, mesh, "replicate")
    state = jax.device_put(state, state_sharding)
    train_step = steps_lib.make_train_step(graphdef, tx, mesh, config, 1000, state_sharding)
    rng = np.random.default_rng(0)
    batch_data = sharding.shard_batch(
        {
            "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 1000, batch).astype(np.int32),
        },
        mesh,
    )
    start = time.perf_counter()
    compiled = train_step.lower(state, batch_data).compile()
    flops = _flops(compiled)
    state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    images_per_sec = steps * batch / (time.perf_counter() - start)
    record = {"images_per_sec": images_per_sec, "first_step_s": first, "device": jax.devices()[0].device_kind}
    if flops:
        record["gflops_per_image"] = flops / batch / 1e9
        record["achieved_tflops"] = flops / batch * images_per_sec / 1e12
        peak = _peak_flops(jax.devices()[0].device_kind)
        if peak:
            record["mfu"] = flops / batch * images_per_sec / peak
    return record


# Dense bf16 peak FLOP/s by device kind (vendor data sheets, SXM parts); CPUs: none (no MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def _peak_flops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_FLOPS.items() if name in device_kind), None)


def _flops(compiled) -> float | None:
    """FLOPs of one train step as XLA counts them (forward, backward and update), if it reports them."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and analysis.get("flops") else None


def measure_timm(model_name: str, batch: int, size: int, steps: int, compiled: bool) -> dict:
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"img_size": size} if model_name.startswith("vit") else {}
    model = timm.create_model(model_name, pretrained=False, num_classes=1000, **kwargs).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=device)
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
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    sync()
    return {"images_per_sec": steps * batch / (time.perf_counter() - start), "first_step_s": first}


def run_one(framework: str, model: str, batch: int, size: int, steps: int) -> dict:
    """Run in this process (the child): measure, add peak RSS, return the record."""
    if framework == "jaxclf":
        record = measure_jaxclf(model, batch, size, steps)
    else:
        record = measure_timm(model, batch, size, steps, compiled=framework == "timm_compiled")
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def child(args) -> None:
    print(json.dumps(run_one(args.framework, args.model, args.batch, args.size, args.steps)))


def spawn(framework: str, model: str, args) -> dict:
    command = [
        sys.executable, __file__, "--child", "--framework", framework, "--model", model,
        "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement, after one untimed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench/results/train_step.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    frameworks = args.frameworks.split(",")
    results = {}
    for model in args.models.split(","):
        runs = {f: [] for f in frameworks}
        for _ in range(args.rounds):
            for framework in frameworks:  # alternate, so drifts in machine load hit all alike
                runs[framework].append(spawn(framework, model, args))
        results[model] = {f: _summary(r) for f, r in runs.items()}
    _print_table(results, args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=2)
    print(f"wrote {args.out}")


def _summary(records: list[dict]) -> dict:
    good = [r for r in records if "error" not in r]
    if not good:
        return {"error": records[0]["error"]}
    return {
        "images_per_sec": statistics.median(r["images_per_sec"] for r in good),
        "images_per_sec_all": [r["images_per_sec"] for r in good],
        "first_step_s": statistics.median(r["first_step_s"] for r in good),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
        # jaxclf only: XLA's FLOP count, the FLOP/s reached, and model FLOP utilisation on known GPUs.
        **{k: good[0][k] for k in ("device", "gflops_per_image") if k in good[0]},
        **{k: statistics.median(r[k] for r in good) for k in ("achieved_tflops", "mfu") if k in good[0]},
    }


def _print_table(results: dict, args) -> None:
    print(f"\nbatch {args.batch}, {args.size} px, {args.threads} threads, median of {args.rounds} rounds")
    header = (f"{'model':<24}{'framework':<15}{'img/s':>9}{'vs eager':>10}{'1st step s':>12}{'peak MB':>9}"
              f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'MFU':>7}")
    print(header)
    print("-" * len(header))
    for model, by_framework in results.items():
        eager = by_framework.get("timm_eager", {}).get("images_per_sec")
        for framework, r in by_framework.items():
            if "error" in r:
                print(f"{model:<24}{framework:<15}  error: {r['error'][:60]}")
                continue
            ratio = f"{r['images_per_sec'] / eager:.2f}x" if eager else "-"
            print(
                f"{model:<24}{framework:<15}{r['images_per_sec']:>9.2f}{ratio:>10}"
                f"{r['first_step_s']:>12.1f}{r['peak_rss_mb']:>9.0f}"
                f"{_cell(r, 'gflops_per_image', 11, '.1f')}{_cell(r, 'achieved_tflops', 9, '.3f')}{_cell(r, 'mfu', 7, '.1%')}"
            )


def _cell(record: dict, key: str, width: int, spec: str) -> str:
    return f"{format(record[key], spec):>{width}}" if key in record else f"{'-':>{width}}"


if __name__ == "__main__":
    main()
