"""``diffiml bench scaling``: latency against ensemble size and step count, throughput against batch size, on one
backend, as a table and a PNG. latency(N=5) / latency(N=1) shows the cost of the ensemble (the paper: 1.86)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffiml.benchmarks.table4 import runtime_pipeline, time_runs
from diffiml.files import atomic_path


def bench_scaling(bundle: str, backend: str, ensembles: list[int], steps_list: list[int], batches: list[int],
                  runs: int, warmup: int) -> dict[str, Any]:
    from diffiml.runtime.localizer import Localizer

    base = Localizer.open(bundle, backend=backend, copy_move=False)  # the graphs' scaling
    size = base.bundle.image_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out: dict[str, Any] = {"backend": base.backend, "image_size": size, "ensemble": [], "steps": [], "batch": []}
    for n in ensembles:
        loc = Localizer.open(bundle, backend=backend, ensemble=n, copy_move=False)
        out["ensemble"].append({"ensemble": n, "steps": loc.steps, **_timed(loc, [image], runs, warmup)})
    for k in steps_list:
        loc = Localizer.open(bundle, backend=backend, steps=k, copy_move=False)
        out["steps"].append({"steps": k, "ensemble": loc.ensemble, **_timed(loc, [image], runs, warmup)})
    for b in batches:
        t = _timed(base, [image] * b, max(3, runs // b), 1)
        out["batch"].append({"batch": b, **t, "images_per_s": round(b * 1000 / t["latency_ms_p50"], 3)})
    lat = {r["ensemble"]: r["latency_ms_p50"] for r in out["ensemble"]}
    if 1 in lat and 5 in lat:
        out["latency_ratio_n5_n1"] = round(lat[5] / lat[1], 3)
    return out


def _timed(loc: Any, images: list[np.ndarray], runs: int, warmup: int) -> dict[str, Any]:
    t = time_runs(runtime_pipeline(loc, images), runs, warmup)
    return {"latency_ms_p50": t["latency_ms_p50"], "latency_ms_p90": t["latency_ms_p90"], "stage_ms": t["stage_ms"]}


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"backend {result['backend']}, input {result['image_size']}²", "",
             "| ensemble N | steps | p50 ms | p90 ms | encoder / UNet steps / decoder ms |", "|---|---|---|---|---|"]
    fmt = lambda s: " / ".join(str(s.get(k)) for k in ("encoder", "unet_steps", "decoder")) if s else "-"  # noqa: E731
    for r in result["ensemble"] + result["steps"]:
        lines.append(f"| {r['ensemble']} | {r['steps']} | {r['latency_ms_p50']} | {r['latency_ms_p90']} | "
                     f"{fmt(r['stage_ms'])} |")
    lines += ["", "| batch | p50 ms per batch | images / s |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['latency_ms_p50']} | {r['images_per_s']} |" for r in result["batch"]]
    if "latency_ratio_n5_n1" in result:
        lines += ["", f"latency(N=5) / latency(N=1) = {result['latency_ratio_n5_n1']} (paper: 1.86)"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, ykey, label in ((axes[0], "ensemble", "latency_ms_p50", "ensemble size N"),
                                 (axes[1], "steps", "latency_ms_p50", "DDIM steps K"),
                                 (axes[2], "batch", "images_per_s", "batch size")):
        xs = [r[key] for r in result[key]]
        ax.plot(xs, [r[ykey] for r in result[key]], marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("images / s" if ykey == "images_per_s" else "latency p50 (ms)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"DiffIML runtime scaling ({result['backend']}, {result['image_size']}²)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
