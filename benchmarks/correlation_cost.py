"""``diffiml bench correlation``: what the self-correlation stage costs: GMACs and milliseconds per image, and the
condition encoder's latency with and without it, at each input size, in one run.

Both encoders are the same model (random weights, the stage's projection made non-zero so that nothing is folded
away), exported to the bundle's encoder graph and run by onnxruntime with the runtime's thread settings. Timing
alternates the two sessions run by run and reports medians, so a change in the machine's load hits both alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import numpy as np
import torch

from diffiml.export.exporter import export_graph
from diffiml.export.graphs import graph_specs
from diffiml.runtime.backends.ort_backend import ort_module, session_options
from diffiml.train.config import get_config
from diffiml.train.info import gmacs
from diffiml.train.model import DiffIML


def _encoder_session(config: Any, threads: int | None) -> Any:
    torch.manual_seed(0)
    model = DiffIML(config).eval()
    if config.self_correlation:
        torch.nn.init.normal_(model.encoder.correlation_proj.weight, std=0.05)
    spec, module = graph_specs(model)["condition_encoder"]
    data = export_graph(spec, module, {"images": 1})
    image = torch.zeros(1, 3, config.image_size, config.image_size)
    counted, _ = gmacs(lambda: module(image))
    return ort_module().InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"]), counted


def bench_correlation(config_name: str = "mobile", sizes: tuple[int, ...] = (256, 512), runs: int = 30,
                      warmup: int = 5, threads: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        base = dataclasses.replace(get_config(config_name), image_size=size)
        variants = {"without": dataclasses.replace(base, self_correlation=False),
                    "with": dataclasses.replace(base, self_correlation=True)}
        sessions = {k: _encoder_session(c, threads) for k, c in variants.items()}
        feed = {"image": np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for i in range(warmup + runs):
            for name, (session, _) in sessions.items():
                t0 = time.perf_counter()
                session.run(None, feed)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        ms = {k: statistics.median(v) for k, v in times.items()}
        grid = base.latent_size // 2  # keys on the 1/16 grid, queries on the latent grid
        rows.append({
            "config": config_name, "image_size": size, "grid": f"{2 * grid}² queries x {grid}² keys",
            "positions": grid * grid,
            "encoder_gmacs_without": round(sessions["without"][1], 4),
            "encoder_gmacs_with": round(sessions["with"][1], 4),
            "stage_gmacs": round(sessions["with"][1] - sessions["without"][1], 4),
            "encoder_ms_without": round(ms["without"], 2), "encoder_ms_with": round(ms["with"], 2),
            "stage_ms": round(ms["with"] - ms["without"], 2),
            "added_latency_ratio": round((ms["with"] - ms["without"]) / ms["without"], 3),
            "runs": runs,
        })
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| input | similarity matrix (keys) | encoder GMACs without → with | stage GMACs | "
             "encoder ms without | encoder ms with | stage ms | added latency |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image_size']}² | {r['grid']} ({r['positions']}) | {r['encoder_gmacs_without']:.3f} → "
                     f"{r['encoder_gmacs_with']:.3f} | {r['stage_gmacs']:.3f} | {r['encoder_ms_without']:.2f} | "
                     f"{r['encoder_ms_with']:.2f} | {r['stage_ms']:.2f} | {100 * r['added_latency_ratio']:.1f} % |")
    return "\n".join(lines) + "\n"
