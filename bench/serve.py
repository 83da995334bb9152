"""Serving under load: throughput and latency of `python -m jaxclf.serve` with dynamic batching on and off.

Two server processes on 127.0.0.1 serve the same run, one batching (--max_batch 32) and one not
(--max_batch 1); N concurrent clients (closed loop: each sends its next request when the last is
answered) post one image per request to each in turn, alternating which goes first each round.
Each measurement is bounded by --requests per client and --seconds. Reported per server and N:
requests/s, client-side latency p50/p99, and from the responses' `latency_ms` the server's own
decode, queue and model times; the JSON also has the CPU seconds of the servers and the clients.

    make quickstart   # runs/quickstart: ResNet-18 on the digits, 32 px
    .venv/bin/python bench/serve.py --workdir runs/quickstart --clients 1,4,16 --rounds 2 \\
        --out bench/results/serve_cpu.json

The check of the issue: batching raises throughput at 16 clients (the ratio), and the p99 latency
with batching stays under max_wait_ms + one full batch's model time + decode time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxclf import predict  # noqa: E402  (this tree's jaxclf)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Server:
    """`python -m jaxclf.serve` as a child process on a free loopback port."""

    def __init__(self, workdir: str, extra: list[str], log_dir: str, name: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(log_dir, f"{name}.log")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jaxclf.serve", "--workdir", workdir, "--host", "127.0.0.1",
                 "--port", str(self.port), *extra],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                with open(self.log) as f:
                    sys.exit(f"the server exited with status {self.process.returncode}:\n{f.read()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                sys.exit(f"{self.url} not ready after {timeout} s; see {self.log}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _load_test(url: str, images: list[tuple[str, bytes]], clients: int, requests: int, seconds: float) -> dict:
    """`clients` closed-loop clients, each sending up to `requests` one-image requests within `seconds`."""
    latencies, server_times, errors = [], [], 0
    # Multipart bodies encoded once, so the clients spend their CPU on sending, not on encoding.
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    bodies = [_multipart(name, data) for name, data in images]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        started = time.perf_counter()
        stop_at = started + seconds

        async def one_client(index: int) -> None:
            nonlocal errors
            for i in range(requests):
                if time.perf_counter() > stop_at:
                    return
                body = bodies[(index * requests + i) % len(bodies)]
                sent = time.perf_counter()
                response = await client.post("/v1/classify?top_k=1", content=body, headers=headers)
                if response.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                body = response.json()
                server_times.append({**body["latency_ms"], "batch_images": body["predictions"][0]["batch_images"]})

        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000

    def server_ms(key: str, q: float) -> float:
        return float(np.percentile([t[key] for t in server_times], q))

    return {
        "requests": len(latencies), "errors": errors, "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())},
        "server_ms": {key: {"p50": server_ms(key, 50), "p99": server_ms(key, 99)}
                      for key in ("total", "decode", "queue", "model")},
        "mean_batch_images": float(np.mean([t["batch_images"] for t in server_times])),
    }


BOUNDARY = "jaxclf-bench-boundary"


def _multipart(name: str, data: bytes) -> bytes:
    """A multipart/form-data body holding one file field "images", as a browser sends it."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def _full_batch_model_ms(url: str, image: tuple[str, bytes], max_batch: int, repeats: int = 5) -> dict:
    """The model time of one full batch: `max_batch` images in one request, as the server reports it."""
    files = [("images", (image[0], image[1], "image/png"))] * max_batch
    times = [httpx.post(f"{url}/v1/classify", files=files, timeout=60).json()["latency_ms"] for _ in range(repeats)]
    return {key: statistics.median(t[key] for t in times) for key in ("model", "decode")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="a finished training run (make quickstart)")
    parser.add_argument("--import_file", default="", help="passed to the server: a file registering the run's model")
    parser.add_argument("--images", default="~/.cache/jaxclf/digits/val", help="files, folders or globs to send")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=100, help="requests per client per measurement, at most")
    parser.add_argument("--seconds", type=float, default=15.0, help="longest a measurement runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_batch", type=int, default=32)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--out", default="bench/results/serve_cpu.json")
    args = parser.parse_args(argv)
    paths, _ = predict.expand_inputs([os.path.expanduser(args.images)])
    if not paths:
        sys.exit(f"--images {args.images}: no image files (run `make quickstart` to write the digits)")
    images = []
    for path in paths[:200]:
        with open(path, "rb") as f:
            images.append((os.path.basename(path), f.read()))
    counts = [int(c) for c in args.clients.split(",")]
    common = ["--import_file", args.import_file] if args.import_file else []
    modes = {
        "batching": [*common, "--max_batch", str(args.max_batch), "--max_wait_ms", str(args.max_wait_ms)],
        "no_batching": [*common, "--max_batch", "1"],
    }
    load_before = _load()
    with tempfile.TemporaryDirectory() as logs:
        servers = {mode: Server(args.workdir, extra, logs, mode) for mode, extra in modes.items()}
        try:
            for server in servers.values():
                server.wait_ready()
            full_batch = _full_batch_model_ms(servers["batching"].url, images[0], args.max_batch)
            results = {mode: {str(n): [] for n in counts} for mode in modes}
            cpu = {mode: 0.0 for mode in modes}
            for round_index in range(args.rounds):
                order = list(modes) if round_index % 2 == 0 else list(modes)[::-1]
                for n in counts:
                    for mode in order:
                        server = servers[mode]
                        asyncio.run(_load_test(server.url, images, n, 3, 5))  # warm connections and caches
                        cpu_before, clients_before = _cpu_seconds(server.process.pid), time.process_time()
                        measured = asyncio.run(_load_test(server.url, images, n, args.requests, args.seconds))
                        measured["server_cpu_s"] = _cpu_seconds(server.process.pid) - cpu_before
                        measured["client_cpu_s"] = time.process_time() - clients_before
                        cpu[mode] += measured["server_cpu_s"]
                        results[mode][str(n)].append(measured)
                        print(f"round {round_index + 1} {mode:<12} {n:>3} clients: {measured['requests_per_s']:7.1f} req/s  "
                              f"p50 {measured['latency_ms']['p50']:6.1f} ms  p99 {measured['latency_ms']['p99']:6.1f} ms  "
                              f"batch {measured['mean_batch_images']:.1f}", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    def median(mode: str, n: int, *keys: str) -> float:
        values = []
        for measured in results[mode][str(n)]:
            value = measured
            for key in keys:
                value = value[key]
            values.append(value)
        return float(statistics.median(values))

    table = []
    for n in counts:
        row = {"clients": n}
        for mode in modes:
            row[mode] = {"requests_per_s": median(mode, n, "requests_per_s"),
                         "p50_ms": median(mode, n, "latency_ms", "p50"), "p99_ms": median(mode, n, "latency_ms", "p99"),
                         "mean_batch_images": median(mode, n, "mean_batch_images"),
                         "server_decode_p99_ms": median(mode, n, "server_ms", "decode", "p99")}
        row["throughput_ratio"] = row["batching"]["requests_per_s"] / row["no_batching"]["requests_per_s"]
        table.append(row)
    largest = max(counts)
    at_largest = next(r for r in table if r["clients"] == largest)
    bound_ms = args.max_wait_ms + full_batch["model"] + at_largest["batching"]["server_decode_p99_ms"]
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before,
                    "load_after": _load()},
        "settings": vars(args) | {"images_sent": len(images)},
        "full_batch_ms": full_batch,
        "table": table,
        "p99_check": {"clients": largest, "p99_ms": at_largest["batching"]["p99_ms"], "bound_ms": bound_ms,
                      "bound": "max_wait_ms + one full batch's model time + p99 decode time",
                      "within": at_largest["batching"]["p99_ms"] <= bound_ms},
        "results": results,
    }
    print(f"\nmedian of {args.rounds} rounds; full batch of {args.max_batch}: model {full_batch['model']:.1f} ms; "
          f"load {load_before} -> {report['machine']['load_after']}")
    print(f"{'clients':>7}  {'batching req/s':>14}  {'p50/p99 ms':>13}  {'batch':>5}  {'no batching req/s':>17}  "
          f"{'p50/p99 ms':>13}  {'ratio':>6}")
    for row in table:
        on, off = row["batching"], row["no_batching"]
        print(f"{row['clients']:>7}  {on['requests_per_s']:>14.1f}  {on['p50_ms']:>6.1f}/{on['p99_ms']:<6.1f}  "
              f"{on['mean_batch_images']:>5.1f}  {off['requests_per_s']:>17.1f}  {off['p50_ms']:>6.1f}/{off['p99_ms']:<6.1f}  "
              f"{row['throughput_ratio']:>5.2f}x")
    check = report["p99_check"]
    print(f"p99 with batching at {largest} clients: {check['p99_ms']:.1f} ms; bound {check['bound_ms']:.1f} ms "
          f"({check['bound']}): {'within' if check['within'] else 'OVER'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
