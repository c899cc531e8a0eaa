"""The paper's Table 4 (Params / FLOPs / FPS), reproduced per backend, side by side with the paper's rows and with
what a user would otherwise run, all timed in one run so the speed-ups hold across machines.

Backends:
- ``torch``: our PyTorch reference pipeline (eager fp32), ensemble batched, condition hoisted.
- ``torch-authors``: the authors' execution order in PyTorch eager: members one after another at batch 1, the
  condition entry recomputed at every call (40 UNet calls for N = 5). The peer to beat.
- ``torch-fp16``, ``torch-bf16``, ``torch-cudagraph``, ``torch-compile``: on a GPU, the baselines a user would reach
  for: eager fp16 and bf16, the whole batched pipeline captured once with ``torch.cuda.graphs`` and replayed, and
  ``torch.compile(mode="max-autotune")`` of the UNet (Inductor's tuned kernels, with CUDA graphs), with our loop.
- ``ort-cpu``, ``ort-cuda``, ``tensorrt``: our runtime on an engine bundle of the same weights.
The torch rows run on the GPU when torch sees one, else on the CPU. Each row's speed-up is over PyTorch eager fp32 on
the same kind of device in the same run. Unavailable backends are listed with the reason, never faked.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffiml.runtime.errors import one_line

log = logging.getLogger(__name__)
PAPER_ROWS = [
    {"backend": "paper (RTX 3090)", "ensemble": 1, "params_m": 48.51, "gmacs": 53.01, "fps": 69.48},
    {"backend": "paper (RTX 3090)", "ensemble": 5, "params_m": 48.51, "gmacs": 102.36, "fps": 37.28},
]
TORCH_BACKENDS = ("torch", "torch-authors", "torch-fp16", "torch-bf16", "torch-cudagraph", "torch-compile")
GPU_ONLY = {"torch-fp16": "eager fp16", "torch-bf16": "eager bf16", "torch-cudagraph": "torch.cuda.graphs replay",
            "torch-compile": "torch.compile(max-autotune)"}
TORCH_DTYPES = {"torch-fp16": "fp16", "torch-bf16": "bf16"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def time_runs(fn: Callable[[], dict[str, float] | None], runs: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    latencies, stages = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        stage = fn()
        latencies.append((time.perf_counter() - t0) * 1000)
        if stage:
            stages.append(stage)
    p50 = statistics.median(latencies)
    return {
        "latency_ms_p50": round(p50, 2),
        "latency_ms_p90": round(float(np.percentile(latencies, 90)), 2),
        "stage_ms": {k: round(statistics.median(s[k] for s in stages), 2) for k in stages[0]} if stages else None,
        "_p50": p50,
    }


def torch_pipeline(model: Any, image: Any, steps: int, ensemble: int, authors_order: bool, unet: Any = None,
                   staged: bool = True) -> Callable[[], dict[str, Any]]:
    """The PyTorch pipeline on the model's device and dtype; ``unet`` replaces ``model.unet``'s call (compiled).
    ``staged=False`` leaves out the per-stage clocks (and their synchronizations), for CUDA-graph capture."""
    import torch

    from diffiml.constants import LATENT_CHANNELS
    from diffiml.schedule import ensemble_noise
    from diffiml.train.sampler import decode_probability, denoise_from_condition

    h = image.shape[-1] // 8
    noise = torch.from_numpy(ensemble_noise(0, ensemble, (2 * LATENT_CHANNELS, h, h))).to(image.device, image.dtype)
    # Kernels are asynchronous on a GPU: stage clocks are read after a synchronize.
    sync = torch.cuda.synchronize if image.device.type == "cuda" and staged else (lambda: None)

    @torch.no_grad()
    def run() -> dict[str, Any]:
        sync()
        t0 = time.perf_counter()
        cond = model.encoder(image)
        sync()
        t1 = time.perf_counter()
        z = denoise_from_condition(model, cond, noise, steps, unet=unet, authors_order=authors_order).mean(1)
        sync()
        t2 = time.perf_counter()
        probability = decode_probability(model, z)
        sync()
        if not staged:
            return {"probability": probability}
        t3 = time.perf_counter()
        return {"encoder": (t1 - t0) * 1000, "unet_steps": (t2 - t1) * 1000, "decoder": (t3 - t2) * 1000}

    return run


def runtime_pipeline(localizer: Any, images: list[np.ndarray]) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        results = localizer.localize_batch(images)
        return {k: v * len(images) for k, v in results[0].timings_ms.items()}

    return run


def bench_table4(config_name: str, bundle: str | None, backends: list[str], ensembles: list[int], steps: int,
                 batch: int, sizes_only: bool, runs: int, warmup: int, threads: int | None,
                 precisions: tuple[str, ...] = ("fp32",)) -> list[dict[str, Any]]:
    import torch

    from diffiml.train.config import get_config
    from diffiml.train.info import model_info

    config = get_config(config_name)
    info = model_info(config)
    device = cpu_name()
    rows: list[dict[str, Any]] = []
    base = {"steps": steps, "batch": batch, "image_size": config.image_size, "params_m": info["params_m"]}

    def row(backend: str, precision: str, n: int, timing: dict[str, Any] | None, dev: str,
            skipped: str | None = None) -> dict[str, Any]:
        gmacs = info["gmacs_n1"] + (n - 1) * info["gmacs_by_part"]["unet_call"]
        r = {"backend": backend, "precision": precision, "ensemble": n, **base, "gmacs": round(gmacs, 2),
             "gmacs_executed": round(info["gmacs_n1_executed"] + (n - 1) * steps * info["gmacs_by_part"]["unet_call"],
                                     2),
             "fps": None, "latency_ms_p50": None, "latency_ms_p90": None, "stage_ms": None, "device": dev}
        if timing:
            r.update({k: v for k, v in timing.items() if not k.startswith("_")})
            r["fps"] = round(batch * 1000.0 / timing["_p50"], 3)
        if skipped:
            r["skipped"] = skipped
        return r

    if sizes_only:
        return [row(b, "fp32", n, None, "-") for b in backends for n in ensembles]

    from diffiml.export.exporter import load_diffiml
    from diffiml.runtime.localizer import Localizer

    if threads:
        torch.set_num_threads(threads)
    if bundle is None:
        model, bundle = random_bundle(config_name, fp16="fp16" in precisions)
    else:
        from diffiml.runtime.bundle import load_bundle

        model, _ = load_diffiml(load_bundle(bundle, verify=False).checkpoint_path())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8) for _ in range(batch)]
    tensor = torch.from_numpy(rng.standard_normal((batch, 3, config.image_size, config.image_size), np.float32))
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_name = torch.cuda.get_device_name(0) if torch_device == "cuda" else device
    for backend in backends:
        for n in ensembles:
            if backend in TORCH_BACKENDS:
                if backend in GPU_ONLY and torch_device != "cuda":
                    rows.append(row(backend, "-", n, None, "-",
                                    skipped=f"{GPU_ONLY[backend]} is a GPU baseline; torch sees no CUDA device"))
                    continue
                precision = TORCH_DTYPES.get(backend, "fp32")
                try:  # one baseline that fails (a compiler, memory) is a row that says why, not a lost table
                    fn = _torch_backend(backend, model, tensor, steps, n, torch_device)
                    rows.append(row(backend, precision, n, time_runs(fn, runs, warmup), torch_name))
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    message = one_line(exc)
                    rows.append(row(backend, precision, n, None, "-", skipped=f"failed: {message[:200]}"))
                rows[-1]["device_kind"] = torch_device
                continue
            for precision in precisions:
                try:
                    loc = Localizer.open(bundle, backend=backend, steps=steps, ensemble=n, threads=threads,
                                         precision=precision, copy_move=False)  # the paper's model alone
                except Exception as exc:  # noqa: BLE001 - any reason a backend cannot start is reported, not raised
                    rows.append(row(backend, precision, n, None, "-", skipped=str(exc)))
                    continue
                dev = device if loc.backend == "ort-cpu" else loc.backend
                timing = time_runs(runtime_pipeline(loc, images), runs, warmup)
                rows.append(row(loc.backend, precision, n, timing, dev))
                rows[-1]["device_kind"] = "cpu" if loc.backend == "ort-cpu" else "cuda"
    reference = {(r["device_kind"], r["ensemble"]): r["latency_ms_p50"] for r in rows
                 if r["backend"] == "torch" and r["latency_ms_p50"]}
    for r in rows:
        key = (r.get("device_kind"), r["ensemble"])
        if r["latency_ms_p50"] and key in reference:
            r["speedup_vs_torch"] = round(reference[key] / r["latency_ms_p50"], 2)
    return rows


def random_bundle(config_name: str, int8_calibration: list[Path] | None = None, fp16: bool = False,
                  students: tuple[int, ...] = ()) -> tuple[Any, str]:
    """(model, bundle folder): random weights of ``config_name`` (seed 0) exported to a temporary bundle, for timing
    only; with ``int8_calibration`` images it also carries int8 graphs, with ``fp16`` fp16 graphs (a random model's
    masks mean nothing, so their agreement with fp32 is not held to any bound). ``students``: step counts that get a
    distilled UNet graph (the same network on its own plan, as ``diffiml distill`` writes it: the same cost)."""
    import tempfile

    import torch

    from diffiml.export.exporter import export_bundle
    from diffiml.schedule import ddim_plan
    from diffiml.train.checkpoint import save_checkpoint
    from diffiml.train.config import get_config
    from diffiml.train.distill import distilled_config, student_plan
    from diffiml.train.model import DiffIML

    config = get_config(config_name)
    tmp = Path(tempfile.mkdtemp(prefix="diffiml-bench-"))
    torch.manual_seed(0)
    model = DiffIML(config).eval()
    save_checkpoint(tmp / "run", model, {"kind": "diffiml", "model": config.to_json()})
    student_runs = []
    for k in students:
        plan = ddim_plan(config.steps)
        while len(plan.timesteps) > k:
            plan = student_plan(plan)
        config_json = distilled_config({"kind": "diffiml", "model": config.to_json()}, plan, "random")
        student_runs.append(save_checkpoint(tmp / f"steps-{k}", model, config_json))
    bundle = str(tmp / "bundle")
    log.info("exporting a random-weight %s bundle for timing (%s)", config_name, bundle)
    export_bundle(tmp / "run", bundle, int8_calibration=int8_calibration,
                  check_images=int8_calibration[-2:] if int8_calibration else None, int8_min_agreement=0.0,
                  fp16=fp16, students=student_runs)
    return model, bundle


_COMPILED: dict[int, Any] = {}  # torch.compile'd UNets by module id, reused across the rows of a run


def _torch_backend(backend: str, model: Any, image: Any, steps: int, ensemble: int, device: str
                   ) -> Callable[[], dict[str, float]]:
    """One torch row's pipeline: the model moved (a copy, for fp16) to the device, compiled for torch-compile."""
    import copy

    import torch

    dtype = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16}.get(backend, torch.float32)
    moved = copy.deepcopy(model).to(device, dtype) if dtype != torch.float32 else model.to(device)
    unet = None
    if backend == "torch-compile":
        # max-autotune: Inductor tunes its kernels and replays them as CUDA graphs; the condition entry stays eager.
        # Compiled once per module and kept across N and batch: each new input shape is one more specialisation of
        # the same compiled function (what a deployment would do), not a new torch.compile from scratch.
        unet = _COMPILED.get(id(moved.unet))
        if unet is None:
            unet = _COMPILED[id(moved.unet)] = torch.compile(moved.unet, mode="max-autotune", dynamic=False)
    if backend == "torch-cudagraph":
        return _cuda_graph_pipeline(moved, image.to(device), steps, ensemble)
    return torch_pipeline(moved, image.to(device, dtype), steps, ensemble,
                          authors_order=backend == "torch-authors", unet=unet)


def _cuda_graph_pipeline(model: Any, image: Any, steps: int, ensemble: int) -> Callable[[], None]:
    """The whole batched pipeline (encoder, K steps, decoder) captured once with ``torch.cuda.graphs`` and replayed:
    what a PyTorch user does to remove launch overhead by hand. No stage clocks inside a graph."""
    import torch

    static = image.clone()
    run = torch_pipeline(model, static, steps, ensemble, authors_order=False, staged=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (cuDNN/cuBLAS choose their kernels here)
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return replay


def to_markdown(rows: list[dict[str, Any]], info_note: str = "") -> str:
    head = ("| backend | precision | N | batch | params (M) | GMACs/img (paper conv.) | GMACs executed | FPS | "
            "p50 ms | p90 ms | encoder / UNet steps / decoder ms | speed-up vs torch | device |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        st = r.get("stage_ms") or {}
        stages = " / ".join(str(st.get(k, "-")) for k in ("encoder", "unet_steps", "decoder")) if st else "-"
        fps = r["fps"] if r["fps"] is not None else (f"skipped: {r['skipped']}" if r.get("skipped") else "-")
        lines.append(f"| {r['backend']} | {r['precision']} | {r['ensemble']} | {r['batch']} | {r['params_m']} | "
                     f"{r['gmacs']} | {r['gmacs_executed']} | {fps} | {r['latency_ms_p50'] or '-'} | "
                     f"{r['latency_ms_p90'] or '-'} | {stages} | {r.get('speedup_vs_torch', '-')} | {r['device']} |")
    for p in PAPER_ROWS:
        lines.append(f"| {p['backend']} | fp32 | {p['ensemble']} | 1 | {p['params_m']} | {p['gmacs']} | - | "
                     f"{p['fps']} | - | - | - | - | RTX 3090 (paper, Table 4) |")
    return head + "\n".join(lines) + ("\n\n" + info_note if info_note else "") + "\n"
