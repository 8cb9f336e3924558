"""Serving: throughput and latency of `gaussad serve` on loopback, dynamic batching against none.

For each category (MVTec AD layout): fits a model on train/good (or serves --model), starts `gaussad serve`
twice as processes of their own, with dynamic batching and with `--max-batch-size 1`, and sends the
category's test images, as encoded on disk, to `POST /v1/models/NAME/inspect` from this process at each
concurrency (keep-alive connections, `gaussad.serve.loadgen`). The two servers are measured in turn, level
by level (each first in every other round), for several rounds, so that other load on the machine weighs
on both alike; each row is the round of median throughput, each gain the median of the rounds' paired
ratios. Reports throughput, p50 and p99 latency as the client sees them, and the mean batch the server
formed (from its /metrics). Only loopback traffic: a bounded number of requests per level, each level
bounded in time. Writes a Markdown report.

    python benchmarks/serve.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --out benchmarks/results/serve.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from machine import cpu_description

from gaussad import GaussAD
from gaussad.layout import list_test_images, training_images
from gaussad.serve.loadgen import LoadResult, run_load
from gaussad.tuning import cpu_tuning

QUEUE_DELAY_MS = 5
CONFIGURATIONS = {  # label -> extra `gaussad serve` options
    f"batching (16, {QUEUE_DELAY_MS} ms)": [
        "--max-batch-size",
        "16",
        "--max-queue-delay-ms",
        str(QUEUE_DELAY_MS),
    ],
    "no batching (1)": ["--max-batch-size", "1"],
}


@dataclass
class Level:
    configuration: str
    concurrency: int
    result: LoadResult
    mean_batch: float


class Server:
    """`gaussad serve` in a process of its own on a free loopback port, with its own audit trail and log."""

    def __init__(self, model: Path, workspace: Path, options: list[str]) -> None:
        workspace.mkdir()
        self.log = workspace / "server.log"
        command = [sys.executable, "-m", "gaussad.cli", "serve", str(model), "--port", "0"]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [*command, "--audit", str(workspace / "audit.sqlite3"), *options],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=workspace,
            )
        line = self.process.stdout.readline()  # gaussad: serving NAME on http://127.0.0.1:PORT
        if "serving" not in line:
            self.fail("did not start")
        self.port = int(line.rsplit(":", 1)[1])
        deadline = time.monotonic() + 120
        while self._get("/v2/health/ready") is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.fail("did not get ready")
            time.sleep(0.1)

    def fail(self, what: str) -> None:
        self.process.kill()
        raise SystemExit(f"gaussad serve {what}: {self.log.read_text()[-2000:]}")

    def _get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
                return answer.read().decode()
        except OSError:
            return None

    def batches(self, model: str) -> tuple[float, float]:
        """(forward passes, images scored) so far, from /metrics (none before the first batch)."""
        text = self._get("/metrics") or ""
        found = [
            re.search(rf'^gaussad_batch_size_{part}{{model="{model}"}} (\S+)$', text, re.M)
            for part in ("count", "sum")
        ]
        return (float(found[0][1]), float(found[1][1])) if all(found) else (0.0, 0.0)

    def load(self, name: str, bodies: list[bytes], requests: int, concurrency: int, timeout: float) -> Level:
        before = self.batches(name)
        path = f"/v1/models/{name}/inspect"
        load = run_load("127.0.0.1", self.port, path, bodies, requests, concurrency, prefix=f"c{concurrency}")
        result = asyncio.run(asyncio.wait_for(load, timeout))
        if set(result.statuses()) != {200}:
            raise SystemExit(f"concurrency {concurrency}: answers {result.statuses()}")
        passes, images = (now - was for now, was in zip(self.batches(name), before, strict=True))
        return Level("", concurrency, result, images / passes)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


Runs = dict[tuple[str, int], list[Level]]  # (configuration, concurrency) -> one level per round


def measure(model: Path, bodies: list[bytes], args: argparse.Namespace, workspace: Path) -> Runs:
    """Each configuration at each concurrency, `args.rounds` times, the servers in turn at each level."""
    servers: dict[str, Server] = {}
    runs: Runs = {}
    try:
        for index, (label, options) in enumerate(CONFIGURATIONS.items()):
            servers[label] = Server(model, workspace / f"server{index}", options)
            servers[label].load(model.name, bodies, args.warmup, 4, args.level_timeout)
        for round_number in range(args.rounds):
            for concurrency in args.concurrency:
                requests = args.requests * (1 if concurrency == 1 else 2)
                order = list(servers.items())  # each server first in every other round
                for label, server in order[:: -1 if round_number % 2 else 1]:
                    level = server.load(model.name, bodies, requests, concurrency, args.level_timeout)
                    level.configuration = label
                    runs.setdefault((label, concurrency), []).append(level)
                    r = level.result
                    print(
                        f"round {round_number + 1} {label:<20} c={concurrency:<3} {r.throughput:7.1f} img/s  "
                        f"p50 {r.latency_ms(0.5):7.1f} ms  p99 {r.latency_ms(0.99):7.1f} ms  "
                        f"batch {level.mean_batch:5.2f}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    return runs


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def report(category: str, details: str, runs: Runs) -> list[str]:
    """The round of median throughput of each (configuration, concurrency), and the gains of batching as
    medians of the rounds' paired ratios (the two servers measured back to back)."""
    lines = [
        f"## {category}",
        "",
        details,
        "",
        "| server | concurrency | requests | throughput (img/s) | p50 (ms) | p99 (ms) | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, concurrency), levels in sorted(
        runs.items(), key=lambda item: (list(CONFIGURATIONS).index(item[0][0]), item[0][1])
    ):
        level = sorted(levels, key=lambda level: level.result.throughput)[len(levels) // 2]
        r = level.result
        lines.append(
            f"| {label} | {concurrency} | {len(r.answers)} | {r.throughput:.1f} | "
            f"{r.latency_ms(0.5):.1f} | {r.latency_ms(0.99):.1f} | {level.mean_batch:.2f} |"
        )
    batching, single = CONFIGURATIONS
    lines.append("")
    for concurrency in sorted({concurrency for _, concurrency in runs}):
        pairs = list(zip(runs[batching, concurrency], runs[single, concurrency], strict=True))
        if concurrency == 1:
            added = [b.result.latency_ms(0.99) - s.result.latency_ms(0.99) for b, s in pairs]
            lines.append(
                f"- p99 latency at concurrency 1 with batching: {_median(added):+.1f} ms, median of the "
                f"rounds' {', '.join(f'{a:+.1f}' for a in added)} (queue delay {QUEUE_DELAY_MS} ms)"
            )
        else:
            gains = [b.result.throughput / s.result.throughput for b, s in pairs]
            lines.append(
                f"- throughput with batching at concurrency {concurrency}: {_median(gains):.2f}x, median of "
                f"the rounds' {', '.join(f'{g:.2f}x' for g in gains)}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path, help="category folders in MVTec AD layout")
    parser.add_argument(
        "--model", type=Path, help="serve this model folder instead of fitting one (one category)"
    )
    parser.add_argument("--image-size", type=int, help="model input side (default: the backbone's native)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument(
        "--requests", type=int, default=200, help="requests at concurrency 1; twice as many above"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="measurements of each level (the median is shown)"
    )
    parser.add_argument("--warmup", type=int, default=32, help="requests before measuring, per server")
    parser.add_argument("--level-timeout", type=float, default=300.0, help="seconds a level may take at most")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    args = parser.parse_args()
    command = "python benchmarks/serve.py " + " ".join(sys.argv[1:])
    lines = [
        "# Serving: dynamic batching against none",
        "",
        f"Command: `{command}`",
        "",
        f"CPU: {cpu_description()}. Server and load generator share the machine's cores; the audit trail is "
        "a SQLite file (WAL, synchronous commits), as by default. Latency is from the client's send to the "
        "answer's last byte; each level sends the category's test images in turn, as encoded on disk. "
        f"{args.rounds} rounds measured the two servers in turn, level by level; each row is the round of "
        "median throughput.",
        "",
    ]
    for root in args.categories:
        with tempfile.TemporaryDirectory(prefix="gaussad-serve-bench-") as scratch:
            workspace = Path(scratch)
            model = args.model
            if model is None:
                model = workspace / root.name
                with cpu_tuning():
                    GaussAD(image_size=args.image_size).fit(training_images(root)).save(model)
            tests = [test.path for test in list_test_images(root)]
            bodies = [path.read_bytes() for path in tests]
            fitted = GaussAD.load(model, device="cpu")
            load_before = os.getloadavg()[0]
            runs = measure(model, bodies, args, workspace)
            details = (
                f"{len(tests)} test images ({sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB each on "
                f"average), model input {fitted.image_size_} px, {fitted.backbone}. The machine's 1-minute "
                f"load average (other jobs included): {load_before:.1f} before the measurements, "
                f"{os.getloadavg()[0]:.1f} after."
            )
        lines += report(root.name, details, runs) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
