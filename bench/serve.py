"""Serving under load: throughput and latency of `python -m jaxclf.serve` with dynamic batching on and off.

Two server processes on 127.0.0.1 serve the same run, one batching (--max_batch 32) and one not
(--max_batch 1); N concurrent clients (closed loop: each sends its next request when the last is
answered, each on its own keep-alive connection; h11 over asyncio, so the clients take little of
the CPU the server needs) post one image per request as multipart, to each server in turn,
alternating which goes first each round. Each measurement is bounded by --requests per client and
--seconds. Reported per server and N: requests/s, client-side latency p50/p99, the server's CPU
per request (from /proc: little disturbed by other jobs), and from the responses' `latency_ms` the
server's own read, decode, queue and model times.

    make quickstart   # runs/quickstart: ResNet-18 on the digits, 32 px
    .venv/bin/python bench/serve.py --workdir runs/quickstart --clients 1,4,16 --rounds 3 \\
        --out bench/results/serve_cpu.json

The check of the issue: batching raises throughput at 16 clients (the ratio), and the client-side
p99 with batching stays under max_wait_ms + one batch's model time + decode time, both taken as
the p99 the server reported in the same measurement (so the bound moves with the machine's load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import h11
import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxclf import predict  # noqa: E402  (this tree's jaxclf)
from jaxclf.serve.process import ServerProcess  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class _Connection:
    """One keep-alive HTTP/1.1 connection, h11 over asyncio streams: far less client CPU per request than httpx,
    so the clients leave the 2 cores to the server."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.connection = h11.Connection(h11.CLIENT)

    async def post(self, target: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        headers = [("Host", f"{self.host}:{self.port}"), ("Content-Type", content_type), ("Content-Length", str(len(body)))]
        self.writer.write(self.connection.send(h11.Request(method="POST", target=target, headers=headers))
                          + self.connection.send(h11.Data(data=body)) + self.connection.send(h11.EndOfMessage()))
        status, chunks = 0, []
        while True:
            event = self.connection.next_event()
            if event is h11.NEED_DATA:
                self.connection.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.connection.start_next_cycle()
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    def close(self) -> None:
        self.writer.close()


async def _load_test(url: str, images: list[tuple[str, bytes]], clients: int, requests: int, seconds: float) -> dict:
    """`clients` closed-loop clients, each on its own connection, sending up to `requests` one-image
    requests (multipart, as a browser sends them) within `seconds`."""
    host, port = url.removeprefix("http://").split(":")
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    bodies = [_multipart(name, data) for name, data in images]  # encoded once: the clients only send
    latencies, server_times, errors = [], [], 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def one_client(index: int) -> None:
        nonlocal errors
        connection = _Connection(host, int(port))
        await connection.open()
        try:
            for i in range(requests):
                if time.perf_counter() > stop_at:
                    return
                sent = time.perf_counter()
                status, body = await connection.post("/v1/classify?top_k=1", bodies[(index * requests + i) % len(bodies)],
                                                     content_type)
                if status != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                answer = json.loads(body)
                server_times.append({**answer["latency_ms"], "batch_images": answer["predictions"][0]["batch_images"]})
        finally:
            connection.close()

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
                      for key in ("total", "read", "decode", "queue", "model")},
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


def _add_derived(measured: dict, max_wait_ms: float) -> None:
    """The numbers the table shows, from one measurement."""
    server = measured["server_ms"]
    measured["summary"] = {
        "requests_per_s": measured["requests_per_s"],
        "p50_ms": measured["latency_ms"]["p50"],
        "p99_ms": measured["latency_ms"]["p99"],
        "server_p99_ms": server["total"]["p99"],
        "bound_ms": max_wait_ms + server["model"]["p99"] + server["decode"]["p99"],
        "mean_batch_images": measured["mean_batch_images"],
        "server_cpu_ms_per_request": 1000 * measured["server_cpu_s"] / measured["requests"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="a finished training run (make quickstart)")
    parser.add_argument("--import_file", default="", help="passed to the server: a file registering the run's model")
    parser.add_argument("--image_size", type=int, default=0, help="passed to the server: where pp_eval leaves the size open")
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
    common = (["--import_file", args.import_file] if args.import_file else []) + (
        ["--image_size", str(args.image_size)] if args.image_size else [])
    modes = {
        "batching": [*common, "--max_batch", str(args.max_batch), "--max_wait_ms", str(args.max_wait_ms)],
        "no_batching": [*common, "--max_batch", "1"],
    }
    load_before = _load()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    servers = {mode: ServerProcess(["--workdir", args.workdir, *extra], env=env, cwd=REPO) for mode, extra in modes.items()}
    try:
        for server in servers.values():  # both compile at once
            server.start()
        for server in servers.values():
            server.wait_ready()
        full_batch = _full_batch_model_ms(servers["batching"].url, images[0], args.max_batch)
        results = {mode: {str(n): [] for n in counts} for mode in modes}
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
                    results[mode][str(n)].append(measured)
                    print(f"round {round_index + 1} {mode:<12} {n:>3} clients: {measured['requests_per_s']:7.1f} req/s  "
                          f"p50 {measured['latency_ms']['p50']:6.1f} ms  p99 {measured['latency_ms']['p99']:6.1f} ms  "
                          f"batch {measured['mean_batch_images']:.1f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    for runs in results.values():
        for measured_runs in runs.values():
            for measured in measured_runs:
                _add_derived(measured, args.max_wait_ms)
    table = []
    for n in counts:
        row = {"clients": n}
        for mode in modes:
            runs = results[mode][str(n)]
            row[mode] = {key: float(statistics.median(m["summary"][key] for m in runs)) for key in runs[0]["summary"]}
            row[mode]["p99_within_bound"] = f"{sum(m['summary']['p99_ms'] <= m['summary']['bound_ms'] for m in runs)}/{len(runs)}"
        row["throughput_ratio"] = row["batching"]["requests_per_s"] / row["no_batching"]["requests_per_s"]
        row["cpu_per_request_ratio"] = row["batching"]["server_cpu_ms_per_request"] / row["no_batching"]["server_cpu_ms_per_request"]
        table.append(row)
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before,
                    "load_after": _load()},
        "settings": vars(args) | {"images_sent": len(images)},
        "full_batch_ms": full_batch,
        "bound": "max_wait_ms + p99 of the model time of the batch a request rode in + p99 decode time (same run)",
        "table": table,
        "results": results,
    }
    print(f"\nmedians of {args.rounds} rounds; one full batch of {args.max_batch}: model {full_batch['model']:.1f} ms; "
          f"load {load_before} -> {report['machine']['load_after']}")
    print(f"{'':>7}  {'batching':^53}  {'no batching (max_batch 1)':^40}")
    print(f"{'clients':>7}  {'req/s':>6} {'p50':>6} {'p99':>6} {'bound':>6} {'in':>4} {'batch':>5} {'cpu ms':>6}  "
          f"{'req/s':>6} {'p50':>6} {'p99':>6} {'bound':>6} {'in':>4} {'cpu ms':>6}  {'req/s x':>7} {'cpu x':>6}")
    for row in table:
        on, off = row["batching"], row["no_batching"]
        print(f"{row['clients']:>7}  {on['requests_per_s']:>6.1f} {on['p50_ms']:>6.1f} {on['p99_ms']:>6.1f} "
              f"{on['bound_ms']:>6.1f} {on['p99_within_bound']:>4} {on['mean_batch_images']:>5.1f} "
              f"{on['server_cpu_ms_per_request']:>6.2f}  {off['requests_per_s']:>6.1f} {off['p50_ms']:>6.1f} "
              f"{off['p99_ms']:>6.1f} {off['bound_ms']:>6.1f} {off['p99_within_bound']:>4} "
              f"{off['server_cpu_ms_per_request']:>6.2f}  {row['throughput_ratio']:>6.2f}x {row['cpu_per_request_ratio']:>5.2f}x")
    print("latencies in ms, client-side; bound: " + report["bound"] + "; in: rounds whose p99 is within it; "
          "cpu ms: server CPU per request")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
