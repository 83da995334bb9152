"""The data check's speed: the fast check (headers and end markers, what `train` runs at start) and the
full check (decode, sha256, pHash), on a folder of small JPEGs written to a temp dir.

    .venv/bin/python bench/data_check.py --images 20000 --rounds 3 --out bench/results/data_check_cpu.json

Rounds alternate fast and full, so both see the same machine load; reported: the median wall time,
images per second, seconds per 100k images, and the CPU seconds of this process (all of the work
for the fast check's threads and for a full check with 0 workers). The files are in the page cache
(just written): on a network file system the fast check waits on storage, which its threads
overlap. The full check's time includes starting its workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from jaxclf.config import base_config
from jaxclf.data import check, load_splits


def write_small_jpegs(root: str, num_images: int, seed: int = 0) -> None:
    """`root/{train,val}/c<k>/<i>.jpg`: 80% train, 20% val, 10 classes; smooth random colour pictures of
    64-160 px a side, JPEG quality 90."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        split = "val" if i % 5 == 4 else "train"
        folder = os.path.join(root, split, f"c{(i // 5) % 10}")
        os.makedirs(folder, exist_ok=True)
        width, height = (int(s) for s in rng.integers(64, 161, 2))
        cells = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        Image.fromarray(cells).resize((width, height), Image.BICUBIC).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def time_check(splits: dict, data, *, full: bool, workers: int) -> dict:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    report = check.check_splits(splits, data, full=full, workers=workers)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    assert not report["unreadable"], "the bench folder should be readable"
    return {"wall_s": wall, "main_cpu_s": cpu, "problems": report["problems"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fast-threads", default=f"1,{check.FAST_THREADS}", help="comma-separated thread counts")
    parser.add_argument("--full-workers", default=f"0,{len(os.sched_getaffinity(0))}",
                        help="comma-separated process counts (0: in this process, which gives its CPU seconds)")
    parser.add_argument("--out", default="bench/results/data_check_cpu.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_small_jpegs(root, args.images)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - start:.1f} s")
        config = base_config()
        config.data.root = root
        config.data.pp_train = "decode|inception_crop(64)"  # small images: none below the crop
        splits = load_splits(config.data)
        variants = ([("fast", int(t)) for t in args.fast_threads.split(",")]
                    + [("full", int(w)) for w in args.full_workers.split(",")])
        timings = {v: [] for v in variants}
        for round_ in range(args.rounds):
            for mode, workers in variants if round_ % 2 == 0 else reversed(variants):
                timings[(mode, workers)].append(time_check(splits, config.data, full=mode == "full", workers=workers))
        load = os.getloadavg()

    rows = []
    for (mode, workers), runs in timings.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu = statistics.median(r["main_cpu_s"] for r in runs)
        kind = "threads" if mode == "fast" else "processes" if workers else "in-process"
        rows.append({"check": mode, "workers": workers, "kind": kind,
                     "wall_s": wall, "images_per_s": args.images / wall, "s_per_100k": 1e5 * wall / args.images,
                     "main_cpu_s": cpu, "runs": runs})
    print(f"{args.images} images, {len(os.sched_getaffinity(0))} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'check':6} {'workers':>13} {'wall s':>8} {'img/s':>9} {'s/100k':>8} {'main CPU s':>11}")
    for r in rows:
        print(f"{r['check']:6} {r['workers']:>2} {r['kind']:>10} {r['wall_s']:8.2f} {r['images_per_s']:9.0f} "
              f"{r['s_per_100k']:8.1f} {r['main_cpu_s']:11.2f}")
    record = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "platform": platform.platform(), "pillow": Image.__version__},
        "images": args.images, "rounds": args.rounds, "load_average": load, "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
