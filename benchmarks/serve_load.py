"""``diffiml bench serve``: a bounded load test of ``diffiml serve`` on 127.0.0.1.

For each concurrency level, that many client threads send requests for a fixed time (or until a request budget is
spent), each with its own tritonclient connection; every ``bad_every``-th request of a client is a bad input
(corrupt, truncated, huge, not an image, empty, in turn). A good request counts as lost if it did not come back with
a result; a bad one is wrong if it did. The same levels run against a server with dynamic batching and one without
(``--max-batch 1``), one after the other, in the same run.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffiml.benchmarks.serve_process import ServerProcess
from diffiml.runtime.serving.client import ServerError, TritonLocalizer


def bad_inputs(png: bytes) -> dict[str, bytes]:
    """Inputs a server meets in the wild, made from one good PNG; each must fail alone, with its reason."""
    huge = bytearray(png[:33])  # an IHDR claiming 30000 x 30000 pixels: refused from the header, never decoded
    huge[16:24] = (30000).to_bytes(4, "big") * 2
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")
    return {"corrupt": png[:200] + bytes(255 - b for b in png[200:]),  # a valid header over scrambled pixel data
            "truncated": png[: len(png) // 3], "huge": bytes(huge) + png[33:],
            "not an image": b"%PDF-1.4 this is not an image", "empty": b""}


@dataclass
class LevelResult:
    mode: str
    clients: int
    seconds: float
    good_sent: int
    good_ok: int
    good_lost: int
    bad_sent: int
    bad_refused: int
    bad_accepted: int
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float  # images per model execution, from the server's own report


def run_level(url: str, mode: str, clients: int, duration_s: float, max_requests: int, good: bytes,
              bad: list[bytes], bad_every: int, parameters: dict[str, int]) -> LevelResult:
    deadline = time.monotonic() + duration_s
    lock = threading.Lock()
    budget = [max_requests]
    records: list[tuple[bool, bool, float, int]] = []  # (is_good, succeeded, latency_s, batch)

    def client(index: int) -> None:
        localizer = TritonLocalizer(url, **parameters)
        sent = 0
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            sent += 1
            is_good = bad_every <= 0 or (sent + index) % bad_every != 0
            data = good if is_good else bad[(sent // max(bad_every, 1) + index) % len(bad)]
            t0 = time.perf_counter()
            try:
                answer = localizer.localize_bytes(data)
                ok, batch = True, int(answer.info.get("batch_images", 1))
            except ServerError:
                ok, batch = False, 0
            with lock:
                records.append((is_good, ok, time.perf_counter() - t0, batch))
        localizer.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    good_lat = np.array([r[2] for r in records if r[0] and r[1]]) * 1000
    good = [r for r in records if r[0]]
    bad_records = [r for r in records if not r[0]]
    batches = [r[3] for r in good if r[1]]

    def pct(q: float) -> float:
        return round(float(np.percentile(good_lat, q)), 1) if good_lat.size else float("nan")

    return LevelResult(mode, clients, round(seconds, 2), len(good), sum(r[1] for r in good),
                       sum(not r[1] for r in good), len(bad_records), sum(not r[1] for r in bad_records),
                       sum(r[1] for r in bad_records), round(sum(r[1] for r in good) / seconds, 3), pct(50), pct(90),
                       pct(99), round(float(np.mean(batches)), 2) if batches else float("nan"))


def run(bundle: str | Path, levels: list[int], duration_s: float, max_requests: int, max_batch: int,
        queue_delay_ms: float, bad_every: int, parameters: dict[str, int], sample: Path,
        log_dir: Path | None = None) -> list[dict[str, Any]]:
    good = sample.read_bytes()
    bad = list(bad_inputs(good).values())
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    modes = [("dynamic batching", ["--max-batch", str(max_batch), "--max-queue-delay-ms", str(queue_delay_ms)]),
             ("no batching", ["--max-batch", "1"])]
    for mode, flags in modes:
        log = log_dir / f"server-{mode.replace(' ', '-')}.log" if log_dir else None
        with ServerProcess(bundle, *flags, log_path=log) as server:
            url = f"http://{server.http_url}"
            run_level(url, mode, 1, 0.0, 1, good, bad, 0, parameters)  # one request: connections and caches warm
            for clients in levels:
                rows.append(asdict(run_level(url, mode, clients, duration_s, max_requests, good, bad, bad_every,
                                             parameters)))
        if server.returncode != 0:
            raise RuntimeError(f"the {mode} server exited with {server.returncode}")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| mode | clients | s | good sent | good ok | lost | bad sent | bad refused | bad accepted | images/s "
            "| p50 ms | p90 ms | p99 ms | images per execution |\n|" + "---|" * 14)
    lines = [head]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['seconds']} | {r['good_sent']} | {r['good_ok']} | "
                     f"{r['good_lost']} | {r['bad_sent']} | {r['bad_refused']} | {r['bad_accepted']} | "
                     f"{r['images_per_s']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['mean_batch']} |")
    return "\n".join(lines) + "\n"
