"""Input pipeline throughput: jaxclf's grain loader against torchvision's ImageFolder + DataLoader.

Both decode JPEGs, take a random-resized crop to 224 and flip, with the same number of worker
processes, in one run, rotating which goes first each round. torchvision also runs ToTensor
and Normalize in its workers (its model needs float tensors); jaxclf ships uint8 and normalises
on the device inside the jitted step, so that work is not in its column. Three loaders:
  jaxclf        decode|inception_crop(224)|flip_lr: with jaxclf[fastjpeg], the crop box drawn
                from the JPEG header, the JPEG decoded at the crop's DCT scale by libjpeg-turbo,
                the crop resampled by OpenCV (jaxclf/data/ops/fast.py)
  jaxclf_exact  decode|inception_crop(224, exact=True)|flip_lr: Pillow's resize, torchvision's pixels
  torchvision   RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize
Reported, steady state (after the first batch), median over rounds: images per CPU-second of
the worker processes (read from /proc, so other jobs on a shared machine distort it little) and
images per wall-clock second; then CPU milliseconds per image of each stage in one process.

    .venv/bin/python bench/input_pipeline.py --workers 1 --rounds 5 --out bench/results/input_pipeline_cpu.json

Images are scikit-image's sample photos, randomly cropped and resized to ImageNet-like sizes
(500x375, 375x500, 500x333, 500x500) and saved as JPEG quality 90, plus 40 "phone photos"
(2016x1512) for the per-stage table.
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


def jaxclf_rate(root: str, workers: int, batches: int, batch_size: int, seed: int,
                spec: str = "decode|inception_crop(224)|flip_lr") -> dict[str, float]:
    from jaxclf.data import pipeline, sources

    train = sources.load_image_folder_splits(root, val_fraction=0.05)["train"]  # a val split is required; unused
    loader = pipeline.make_train_loader(train, spec, global_batch_size=batch_size, seed=seed, num_workers=workers)
    iterator = iter(loader)
    rate = time_batches(iterator, batches, batch_size)
    del iterator  # stops the workers before the next measurement
    return rate


def jaxclf_exact_rate(root: str, workers: int, batches: int, batch_size: int, seed: int) -> dict[str, float]:
    return jaxclf_rate(root, workers, batches, batch_size, seed, "decode|inception_crop(224, exact=True)|flip_lr")


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


def per_image_costs(root: str, split: str, count: int = 200, rounds: int = 5) -> dict[str, float]:
    """CPU milliseconds per image of `root/<split>` in this process for each stage (where the time goes):
    the stages alternate within each round; median over rounds."""
    import torch
    import torchvision.transforms as T

    from jaxclf.data import ops

    torch.set_num_threads(1)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, split)) for f in fs)[:count]
    decode, decode_reduced, flip = ops.Decode(), ops.Decode(224), ops.FlipLr()
    crop, exact_crop = ops.InceptionCrop(224), ops.InceptionCrop(224, exact=True)
    tv_crop = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip()])
    tv_float = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    decoded = [np.asarray(decode.map({"path": p})["image"]) for p in paths]
    as_pillow = [Image.fromarray(image) for image in decoded]
    rng = np.random.default_rng(0)
    boxes = [crop.crop_box(*image.shape[:2], rng) for image in decoded]
    for_crop = [crop.decode_for_crop({"path": p}, rng) for p in paths]  # the fast path's decodes and boxes
    crops = [crop.resize_box(example["image"], box) for example, box in for_crop]

    def pil_open(path):
        with Image.open(path) as img:
            return img.convert("RGB")

    def header(path):
        with ops.decode.open_image(path) as image_file:
            return image_file.height

    stages = {
        "read + Pillow's header (open_image)": lambda i, rng: header(paths[i]),
        "decode for the crop: box from the header, JPEG at the crop's DCT scale (decode_for_crop)":
            lambda i, rng: crop.decode_for_crop({"path": paths[i]}, rng),
        "resample the crop to 224 (resize_box: OpenCV up to 3x downscale, else Pillow)":
            lambda i, rng: crop.resize_box(for_crop[i][0]["image"], for_crop[i][1]),
        "flip_lr of a 224 crop (uint8 array)": lambda i, rng: flip.random_map({"image": crops[i]}, rng),
        "jaxclf decode|inception_crop(224)|flip_lr -> uint8 (all of the above)": lambda i, rng: np.asarray(
            flip.random_map(crop.crop_while_decoding({"path": paths[i]}, rng), rng)["image"]),
        "decode in full, Pillow (+ convert('RGB'), as ImageFolder)": lambda i, rng: pil_open(paths[i]),
        "decode in full, jaxclf `decode` (libjpeg-turbo via simplejpeg where installed)":
            lambda i, rng: decode.map({"path": paths[i]}),
        "resample the full-size crop to 224, Pillow antialiased bilinear (exact=True)":
            lambda i, rng: exact_crop.resize_box(as_pillow[i], boxes[i]),
        "jaxclf decode|inception_crop(224, exact=True)|flip_lr -> uint8": lambda i, rng: np.asarray(
            flip.random_map(exact_crop.random_map(decode.map({"path": paths[i]}), rng), rng)["image"]),
        "jaxclf decode(224)|inception_crop(224)|flip_lr -> uint8 (decode reduced for the whole image)":
            lambda i, rng: np.asarray(
                flip.random_map(crop.random_map(decode_reduced.map({"path": paths[i]}), rng), rng)["image"]),
        "torchvision decode + RRC + flip": lambda i, rng: tv_crop(pil_open(paths[i])),
        "torchvision decode + RRC + flip + ToTensor + Normalize": lambda i, rng: tv_float(tv_crop(pil_open(paths[i]))),
    }
    times = {name: [] for name in stages}
    for r in range(rounds):
        names = list(stages)
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            rng = np.random.default_rng(r)
            start = time.process_time()
            for i in range(len(paths)):
                stages[name](i, rng)
            times[name].append((time.process_time() - start) / len(paths) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1", help="comma-separated worker counts (>= 1), e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=800, help="images in the generated folder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--root", default="", help="reuse this folder instead of a temporary one")
    parser.add_argument("--only", default="", help="comma-separated loaders to time (default: jaxclf,jaxclf_exact,torchvision)")
    parser.add_argument("--stage_images", type=int, default=200, help="images per stage in the per-stage table")
    parser.add_argument("--stage_rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/input_pipeline_cpu.json")
    args = parser.parse_args(argv)
    if (args.batches + 1) * args.batch > args.images * 0.95:
        parser.error("--batches + 1 batches must fit in one epoch of --images (torchvision's loader ends there)")

    root = args.root or tempfile.mkdtemp(prefix="jaxclf-input-bench-")
    if not os.path.isdir(os.path.join(root, "train")):
        write_jpeg_folder(root, args.images)
    if not os.path.isdir(os.path.join(root, "phone")):
        write_jpeg_folder(root, 40, sizes=PHONE_SIZES, split="phone")
    runners = {"jaxclf": jaxclf_rate, "jaxclf_exact": jaxclf_exact_rate, "torchvision": torchvision_rate}
    if args.only:
        runners = {name: runners[name] for name in args.only.split(",")}
    loads, results = [load_average()], []
    for workers in [int(w) for w in args.workers.split(",")]:
        rates = {name: [] for name in runners}
        for r in range(args.rounds):
            names = list(runners)
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                rates[name].append(runners[name](root, workers, args.batches, args.batch, seed=r))
        row = {"workers": workers}
        for name in runners:
            for metric in ("wall", "worker_cpu", "main_cpu"):
                row[f"{name}_{metric}"] = statistics.median(r[metric] for r in rates[name])
        if "torchvision" in runners:
            for name in set(runners) - {"torchvision"}:
                row[f"{name}_ratio_per_worker_cpu"] = row[f"{name}_worker_cpu"] / row["torchvision_worker_cpu"]
                row[f"{name}_ratio_wall"] = row[f"{name}_wall"] / row["torchvision_wall"]
        row["rounds"] = rates
        results.append(row)
        loads.append(load_average())
    costs = {"imagenet_like": per_image_costs(root, "train", args.stage_images, args.stage_rounds),
             "phone_photos": per_image_costs(root, "phone", args.stage_images, args.stage_rounds)}
    loads.append(load_average())

    print(f"\nload average (1, 5, 15 min) at the start, after each worker count, at the end: {' | '.join(loads)}")
    print("\nImages per worker CPU-second (images per wall-clock second); ratios to torchvision:")
    print("| workers | " + " | ".join(runners) + " | " + " | ".join(f"{n} / torchvision" for n in runners
                                                               if n != "torchvision" and "torchvision" in runners) + " |")
    print("| --- " * (1 + len(runners) + (len(runners) - 1 if "torchvision" in runners else 0)) + "|")
    for row in results:
        cells = [f"{row[f'{n}_worker_cpu']:.0f} ({row[f'{n}_wall']:.0f})" for n in runners]
        cells += [f"{row[f'{n}_ratio_per_worker_cpu']:.2f}x ({row[f'{n}_ratio_wall']:.2f}x)" for n in runners
                  if n != "torchvision" and "torchvision" in runners]
        print(f"| {row['workers']} | " + " | ".join(cells) + " |")
    print("\njaxclf: uint8 out (normalise runs on the device); torchvision: float32 out.")
    for images, stages in costs.items():
        print(f"\nOne process, CPU milliseconds per image, {images}:")
        for name, ms in stages.items():
            print(f"  {ms:6.2f}  {name}")

    from jaxclf.data.ops import fast

    record = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "pillow": Image.__version__, "load_average": loads,
                    "simplejpeg": fast.simplejpeg.__version__ if fast.AVAILABLE else None,
                    "opencv": fast.cv2.__version__ if fast.AVAILABLE else None},
        "images": args.images, "batch": args.batch, "batches": args.batches, "rounds": args.rounds,
        "results": results, "cpu_ms_per_image_one_process": costs,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
