"""Input pipeline throughput: jaxclf's grain loader against torchvision's ImageFolder + DataLoader.

Both decode JPEGs, take a random-resized crop to 224 and flip, with the same number of worker
processes, in one run, alternating which goes first each round. torchvision also runs ToTensor
and Normalize in its workers (its model needs float tensors); jaxclf ships uint8 and normalises
on the device inside the jitted step, so that work is not in its column. Reported, steady state
(after the first batch), median over rounds: images per CPU-second of the worker processes (read
from /proc, so other jobs on a shared machine distort it little) and images per wall-clock second.

    .venv/bin/python bench/input_pipeline.py --workers 1 --rounds 5 --out bench/results/input_pipeline_cpu.json

Images are scikit-image's sample photos, randomly cropped and resized to ImageNet-like sizes
(500x375, 375x500, 500x333, 500x500) and saved as JPEG quality 90.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (500, 333), (500, 500))
PHONE_SIZES = ((2016, 1512), (1512, 2016))  # where decode(224) pays: at least twice the target
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "cat", "motorcycle_left")


def write_jpeg_folder(root: str, num_images: int, seed: int = 0, sizes=SIZES, split: str = "train") -> None:
    """`root/<split>/c<k>/<i>.jpg`: crops of scikit-image's colour photos at `sizes`, JPEG quality 90."""
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in PHOTOS if hasattr(skimage.data, name)]
    photos = [p for p in photos if p.ndim == 3 and p.shape[2] == 3]
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        photo = photos[i % len(photos)]
        width, height = sizes[i % len(sizes)]
        h, w = photo.shape[:2]
        ch = int(h * rng.uniform(0.6, 1.0))
        cw = min(w, int(ch * width / height))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((width, height), Image.BICUBIC)
        folder = os.path.join(root, split, f"c{i % 10}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


def _descendants_cpu_seconds() -> float:
    """User + system CPU seconds of every live process descended from this one (the loader's workers)."""
    parents, ticks = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        parents[int(pid)] = int(fields[1])
        ticks[int(pid)] = int(fields[11]) + int(fields[12])
    found, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        todo += children
    return sum(ticks[pid] for pid in found) / os.sysconf("SC_CLK_TCK")


def time_batches(iterator, num_batches: int, batch_size: int) -> dict[str, float]:
    """Throughput over `num_batches`, timed from the end of the first one (workers started):
    images per wall-clock second, per worker CPU-second and per main-process CPU-second."""
    next(iterator)
    start, workers_cpu, main_cpu = time.perf_counter(), _descendants_cpu_seconds(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    images = num_batches * batch_size
    return {
        "wall": images / (time.perf_counter() - start),
        "worker_cpu": images / max(_descendants_cpu_seconds() - workers_cpu, 1e-9),
        "main_cpu": images / max(time.process_time() - main_cpu, 1e-9),
    }


def jaxclf_rate(root: str, workers: int, batches: int, batch_size: int, seed: int) -> dict[str, float]:
    from jaxclf.data import pipeline, sources

    train = sources.load_image_folder_splits(root, val_fraction=0.05)["train"]  # a val split is required; unused
    loader = pipeline.make_train_loader(
        train, "decode|inception_crop(224)|flip_lr", global_batch_size=batch_size, seed=seed, num_workers=workers
    )
    iterator = iter(loader)
    rate = time_batches(iterator, batches, batch_size)
    del iterator  # stops the workers before the next measurement
    return rate


def torchvision_rate(root: str, workers: int, batches: int, batch_size: int, seed: int) -> dict[str, float]:
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([
        T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset = ImageFolder(os.path.join(root, "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )
    iterator = iter(loader)
    rate = time_batches(iterator, batches, batch_size)
    del iterator
    return rate


def per_image_costs(root: str, split: str, count: int = 200) -> dict[str, float]:
    """Milliseconds per image of `root/<split>` in this process for each stage (where the time goes)."""
    import torch
    import torchvision.transforms as T

    from jaxclf.data import ops

    torch.set_num_threads(1)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, split)) for f in fs)[:count]
    rng = np.random.default_rng(0)
    decode, decode_reduced, crop, flip = ops.Decode(), ops.Decode(224), ops.InceptionCrop(224), ops.FlipLr()
    tv_crop = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip()])
    tv_float = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def pil_open(path):
        with Image.open(path) as img:
            return img.convert("RGB")

    stages = {
        "decode (PIL)": pil_open,
        "jaxclf decode|inception_crop(224)|flip_lr -> uint8": lambda p: np.asarray(
            flip.random_map(crop.random_map(decode.map({"path": p}), rng), rng)["image"]),
        "jaxclf decode(224)|inception_crop(224)|flip_lr -> uint8": lambda p: np.asarray(
            flip.random_map(crop.random_map(decode_reduced.map({"path": p}), rng), rng)["image"]),
        "torchvision decode + RRC + flip": lambda p: tv_crop(pil_open(p)),
        "torchvision decode + RRC + flip + ToTensor + Normalize": lambda p: tv_float(tv_crop(pil_open(p))),
    }
    costs = {}
    for name, stage in stages.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for path in paths:
                stage(path)
            best = min(best, (time.perf_counter() - start) / len(paths) * 1e3)
        costs[name] = best
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1", help="comma-separated worker counts (>= 1), e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=800, help="images in the generated folder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--root", default="", help="reuse this folder instead of a temporary one")
    parser.add_argument("--out", default="bench/results/input_pipeline_cpu.json")
    args = parser.parse_args(argv)
    if (args.batches + 1) * args.batch > args.images * 0.95:
        parser.error("--batches + 1 batches must fit in one epoch of --images (torchvision's loader ends there)")

    root = args.root or tempfile.mkdtemp(prefix="jaxclf-input-bench-")
    if not os.path.isdir(os.path.join(root, "train")):
        write_jpeg_folder(root, args.images)
    if not os.path.isdir(os.path.join(root, "phone")):
        write_jpeg_folder(root, 40, sizes=PHONE_SIZES, split="phone")
    runners = {"jaxclf": jaxclf_rate, "torchvision": torchvision_rate}
    results = []
    for workers in [int(w) for w in args.workers.split(",")]:
        rates = {name: [] for name in runners}
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                rates[name].append(runners[name](root, workers, args.batches, args.batch, seed=r))
        row = {"workers": workers}
        for name in runners:
            for metric in ("wall", "worker_cpu", "main_cpu"):
                row[f"{name}_{metric}"] = statistics.median(r[metric] for r in rates[name])
        row["ratio_per_worker_cpu"] = row["jaxclf_worker_cpu"] / row["torchvision_worker_cpu"]
        row["ratio_wall"] = row["jaxclf_wall"] / row["torchvision_wall"]
        row["rounds"] = rates
        results.append(row)
    costs = {"imagenet_like": per_image_costs(root, "train"), "phone_photos": per_image_costs(root, "phone")}

    print("\n| workers | jaxclf img per worker CPU-s | torchvision img per worker CPU-s | ratio "
          "| jaxclf img/s (wall) | torchvision img/s (wall) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in results:
        print(f"| {row['workers']} | {row['jaxclf_worker_cpu']:.0f} | {row['torchvision_worker_cpu']:.0f} "
              f"| {row['ratio_per_worker_cpu']:.2f}x | {row['jaxclf_wall']:.0f} | {row['torchvision_wall']:.0f} "
              f"| {row['ratio_wall']:.2f}x |")
    print("\njaxclf: decode|inception_crop(224)|flip_lr, uint8 out (normalise runs on the device).")
    print("torchvision: RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize, float32 out.")
    for images, stages in costs.items():
        print(f"\nOne process, milliseconds per image, {images}:")
        for name, ms in stages.items():
            print(f"  {ms:6.2f}  {name}")

    record = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "pillow": Image.__version__},
        "images": args.images, "batch": args.batch, "batches": args.batches, "rounds": args.rounds,
        "results": results, "ms_per_image_one_process": costs,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
