"""Load on the Serve application over loopback: concurrent clients on several lines at once, against
in-process scoring of the same images with the same models, measured in one run.

    .venv/bin/python benchmarks/serve_load.py [--root runs/fleet] [--lines elpv-mono,elpv-poly]
        [--clients 8] [--requests 400] [--seconds 120] [--scorer-replicas 2] [--scorer-cpus 1]
        [--max-ongoing N] [--warmup 48] [--passes 3] [--throughput-optimized]

Needs published lines (the README's main job makes elpv-mono and elpv-poly under runs/fleet). Each
request is one real elpv PNG (raw bytes) on a kept-alive connection; ``--warmup`` requests at full
concurrency go first and are not counted. Reports images/s, p50/p99 latency, the error count (warm-up
included) and the ratio of HTTP throughput to in-process throughput (decode + ``detector.predict`` on
batches of 16 images, one process, ``--passes`` passes after one warm-up batch); figures go to
benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, save  # noqa: E402
from ray_ad import registry  # noqa: E402
from ray_ad.data import load_samples  # noqa: E402
from ray_ad.data.images import decode_image  # noqa: E402


def in_process(root: str, lines: list[str], payloads: list[bytes], passes: int, batch: int = 16) -> float:
    """Images/s of decode + preprocess + predict for every line, in this process (after one warm-up batch)."""
    detectors = [registry.load_current(root, line, device="auto")[0] for line in lines]

    def score(detector, chunk: list[bytes]) -> None:
        tensors = detector.preprocessor.batch([decode_image(p, "bench") for p in chunk])
        with torch.no_grad():
            detector.predict(tensors)

    for detector in detectors:
        score(detector, payloads[:batch])
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for detector in detectors:
            for i in range(0, len(payloads), batch):
                score(detector, payloads[i : i + batch])
                count += len(payloads[i : i + batch])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/fleet")
    parser.add_argument("--lines", default="elpv-mono,elpv-poly")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="requests in all (the bound)")
    parser.add_argument("--seconds", type=float, default=120, help="time bound for the HTTP phase")
    # Two one-CPU replicas (one torch thread each; multiplexing sends each line to one of them) beat one
    # two-CPU replica on two cores: see the README's load figures.
    parser.add_argument("--scorer-replicas", type=int, default=2, help="scorer replicas")
    parser.add_argument("--scorer-cpus", type=float, default=1, help="CPUs of each scorer replica")
    parser.add_argument("--max-ongoing", type=int, default=0,
                        help="max_ongoing_requests of the scorer replica (0 = Serve's default, 5)")
    parser.add_argument("--images", type=int, default=64, help="distinct images cycled through")
    parser.add_argument("--warmup", type=int, default=48, help="requests sent first at full concurrency, not counted")
    parser.add_argument("--passes", type=int, default=3, help="passes over the images for the in-process figure")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Serve's throughput flags, see README)")
    args = parser.parse_args()
    if args.throughput_optimized:
        # Read by Serve's constants when its processes start: it must be in the environment Ray starts with.
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    lines = args.lines.split(",")
    missing = [line for line in lines if registry.current_version(args.root, line) is None]
    if missing:
        sys.exit(f"no published model for {missing} under {args.root}: run the README's main job first")
    payloads = [Path(s.path).read_bytes() for s in load_samples("elpv:poly", "test")[: args.images]]

    local = in_process(args.root, lines, payloads, args.passes)
    print(f"in-process: {local:.1f} images/s")

    from ray import serve

    from ray_ad.distributed.runtime import init_ray
    from ray_ad.serve.app import ScorerOptions, ServiceConfig, build_app

    init_ray(num_cpus=max(2, int(args.scorer_cpus * args.scorer_replicas)))
    tokens = {"admin": secrets.token_hex(16), "lines": {line: secrets.token_hex(16) for line in lines}}
    port = 8123
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    scorer = ScorerOptions(cpus=args.scorer_cpus, max_ongoing=args.max_ongoing or None, replicas=args.scorer_replicas)
    serve.run(build_app(ServiceConfig(args.root, tokens=tokens, landing_interval_s=0, scorer=scorer)),
              name="fleet", route_prefix="/")
    path = "/v1/lines/{}/detect"

    def post(connection: http.client.HTTPConnection, line: str, body: bytes) -> int:
        """One detect request on the client's kept-alive connection (as requests.Session would)."""
        try:
            connection.request("POST", path.format(line), body=body, headers={
                "Content-Type": "image/png", "Authorization": f"Bearer {tokens['lines'][line]}"})
            response = connection.getresponse()
            response.read()
            return response.status
        except OSError:
            connection.close()  # reconnects on the next request
            return 0

    def run_clients(requests: int, seconds: float) -> tuple[list[float], int, float]:
        """``requests`` detect calls from ``--clients`` threads, lines and images in turn: latencies, errors, wall s."""
        latencies: list[float] = []
        errors = [0]
        counter = iter(range(requests))
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def client() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                status = post(connection, lines[i % len(lines)], payloads[i % len(payloads)])
                with lock:
                    latencies.append(time.perf_counter() - started)
                    errors[0] += status != 200

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return latencies, errors[0], time.perf_counter() - start

    # Warm-up at full concurrency (model loads, first batches, connection set-up), not counted.
    _, warmup_errors, _ = run_clients(args.warmup, args.seconds)
    latencies, error_count, wall = run_clients(args.requests, args.seconds)
    errors = warmup_errors + error_count
    serve.shutdown()
    http_rate = len(latencies) / wall
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000).tolist()
    rows = {"requests": len(latencies), "clients": args.clients, "lines": len(lines), "http_images_per_s": http_rate,
            "in_process_images_per_s": local, "ratio": http_rate / local, "p50_ms": p50, "p99_ms": p99,
            "errors": errors}
    table = "\n".join([
        f"Serve load, {len(lines)} lines, {args.clients} clients, {len(latencies)} requests "
        f"({machine()['cpu_count']} CPU, {args.scorer_replicas} scorer replica(s) x {args.scorer_cpus} CPU, "
        f"max_ongoing_requests {args.max_ongoing or 'default'}"
        f"{', RAY_SERVE_THROUGHPUT_OPTIMIZED=1' if args.throughput_optimized else ''}):",
        "",
        "| HTTP images/s | in-process images/s | ratio | p50 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {http_rate:.1f} | {local:.1f} | {http_rate / local:.2f} | {p50:.0f} | {p99:.0f} | {errors} |",
    ])
    print(table)
    save("serve_load", {"machine": machine(), "args": vars(args), "results": rows}, table)


if __name__ == "__main__":
    main()
