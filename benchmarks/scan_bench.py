"""``diffiml bench scan``: what Ray Data costs per image. The same images, the same settings, in one run:
``localize``'s in-process loop (decode, localize, write the maps; one process, onnxruntime on every core) against
``scan`` with 1, 2, ... actors on a local Ray.

Per-image times are steady-state: from the first image finished to the last (``(t_last - t_first) / (n - 1)``), so
the fixed costs (opening the bundle, starting actors and the pipeline: in ``first_image_s``, the time to the first
image's maps) do not hide in them. Ray's overhead per image is scan's steady time minus localize's, in ms and in %
of localize's; on a machine shared with other work wall times drift with its load, so the CPU time each mode's
process tree used per image after its first image (scan: after its first batch) is reported too, which other work
does not inflate.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


def sample_images(folder: Path, n: int, photos: Path | None, examples: Path) -> list[Path]:
    """``n`` images in ``folder``: the first photos under ``photos`` (sorted), or crops of ``examples/*.png`` at
    varied sizes and offsets when there are no photos."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in photos.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES) if photos and photos.is_dir() \
        else []
    made = []
    if found:
        for i, src in enumerate(found[:n]):
            made.append(folder / f"{i:04d}_{src.name}")
            shutil.copyfile(src, made[-1])
        if len(made) == n:
            return made
    sources = [cv2.imread(str(p)) for p in sorted(examples.glob("*.png"))]
    sources = [s for s in sources if s is not None]
    if not sources:
        raise FileNotFoundError(f"no photos under {photos} and no PNG under {examples} to make bench images from")
    rng = np.random.default_rng(0)
    while len(made) < n:
        src = sources[len(made) % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        made.append(folder / f"{len(made):04d}_crop.png")
        cv2.imwrite(str(made[-1]), src[y : y + ch, x : x + cw])
    return made


def proc_stat_fields() -> dict[int, list[str]]:
    """Every live process's /proc/PID/stat fields after the command name (state first), by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            found[int(entry.name)] = text[text.rindex(")") + 2 :].split()
    return found


def cpu_seconds_by_process() -> dict[int, float]:
    """CPU seconds (user + system) of this process and every descendant (a local Ray's raylet, workers, actors),
    from /proc: unlike wall time, not inflated by other work sharing the machine's cores."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {pid: (int(f[1]), (int(f[11]) + int(f[12])) / tick) for pid, f in proc_stat_fields().items()}
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in mine]
        mine.update(children)
        frontier += children
    return {pid: stats[pid][1] for pid in mine if pid in stats}


def cpu_used(before: dict[int, float]) -> float:
    """CPU seconds the process tree used since ``before`` (processes started since then count whole)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in cpu_seconds_by_process().items())


def _row(mode: str, actors: int | str, threads: int, stamps: list[float], t_start: float) -> dict[str, Any]:
    n = len(stamps)
    steady_ms = (stamps[-1] - stamps[0]) / (n - 1) * 1000 if n > 1 else float("nan")
    wall = stamps[-1] - t_start
    return {"mode": mode, "actors": actors, "threads_per_actor": threads, "images": n, "wall_s": round(wall, 2),
            "first_image_s": round(stamps[0] - t_start, 2), "images_per_s": round(n / wall, 3),
            "steady_ms_per_image": round(steady_ms, 1), "steady_images_per_s": round(1000 / steady_ms, 3)}


def time_localize(bundle: str, images: list[Path], out: Path, settings: dict[str, Any], threads: int | None
                  ) -> dict[str, Any]:
    """``diffiml localize``'s loop, in this process: open once, then decode, localize and write each image, with
    ``threads`` onnxruntime threads (None: onnxruntime's default, as ``diffiml localize`` runs)."""
    from diffiml.runtime.image_io import load_image
    from diffiml.runtime.localizer import Localizer
    from diffiml.runtime.outputs import write_outputs

    t0 = time.perf_counter()
    with Localizer.open(bundle, backend="ort-cpu", steps=settings["steps"], ensemble=settings["ensemble"],
                        seed=settings["seed"], copy_move=settings["copy_move_cue"], threads=threads) as loc:
        stamps = []
        for path in images:
            decoded = load_image(path, loc.bundle.image_size)
            write_outputs(loc.localize(decoded), decoded.rgb, out, path.stem)
            stamps.append(time.perf_counter())
            if len(stamps) == 1:
                cpu0 = cpu_seconds_by_process()
    return {**_row("localize (one process)", "-", threads or "default", stamps, t0),
            "cpu_ms_per_image": round(cpu_used(cpu0) / max(1, len(images) - 1) * 1000, 1)}


def time_scan(images: list[Path], out: Path, settings: dict[str, Any], actors: int, threads: int) -> dict[str, Any]:
    """``diffiml scan`` on the Ray this process is connected to, into a fresh ``out``; stamps from the table."""
    import ray

    from diffiml.runtime.scan.cluster import choose_layout
    from diffiml.runtime.scan.driver import run_scan
    from diffiml.runtime.scan.table import read_all_rows

    layout = choose_layout(ray.cluster_resources(), "ort-cpu", actors=actors, threads=threads, inputs=len(images))
    first: dict[str, Any] = {}

    def after_first_batch(rows: int) -> None:
        if not first:
            first.update(cpu=cpu_seconds_by_process(), at=time.time())

    t0 = time.perf_counter()
    wall0 = time.time()
    summary = run_scan([str(p.resolve()) for p in images], out, {**settings, "run_id": f"bench-{actors}"}, layout,
                       progress=False, on_batch=after_first_batch)
    used = cpu_used(first["cpu"])
    if summary.failed or summary.missing:
        raise RuntimeError(f"bench scan: {summary.failed} failed, {len(summary.missing)} missing in {out}")
    finished = sorted(r["scanned_at"].timestamp() for r in read_all_rows(out).to_pylist())
    later = sum(t > first["at"] for t in finished)  # images finished after the CPU snapshot (others may have been)
    steady_cpu = used / later if later else float("nan")
    stamps = [t0 + (t - wall0) for t in finished]  # wall-clock stamps onto this process's perf_counter
    return {**_row(f"scan, {actors} actor{'s' if actors > 1 else ''}", actors, threads, stamps, t0),
            "cpu_ms_per_image": round(steady_cpu * 1000, 1)}


def bench_scan(bundle: str, images: list[Path], out: Path, actor_counts: list[int], steps: int | None,
               ensemble: int | None, seed: int, copy_move: bool, rounds: int = 2) -> list[dict[str, Any]]:
    """Rows: localize with one onnxruntime thread per core, then scan per actor count (threads per actor: cores /
    actors), each the median over ``rounds`` rounds that alternate the modes (the machine's load drifts; the load
    averages are recorded), with scan's overhead against localize. Ray is started for each scan and stopped before
    localize runs, so localize never shares the cores with an idle Ray."""
    import statistics

    import ray

    from diffiml.runtime.bundle import load_bundle
    from diffiml.runtime.scan.cluster import connect

    b = load_bundle(bundle)
    settings = {"bundle": str(Path(bundle).resolve()), "bundle_sha256s": b.sha256s, "backend": "ort-cpu",
                "precision": "fp32", "steps": steps or b.default_steps, "ensemble": ensemble or b.default_ensemble,
                "ensemble_spec": ensemble, "adaptive": None, "tta": False, "seed": seed, "uncertainty": False,
                "copy_move_cue": bool(copy_move and b.copy_move_cue is not None)}
    cores = os.cpu_count() or 1
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        row = time_localize(bundle, images, out / f"localize_{r}", settings, cores)
        runs.setdefault(row["mode"], []).append({**row, "load_avg_1min": round(os.getloadavg()[0], 2)})
        # The same loop with onnxruntime's threads sleeping between parallel sections, as scan's actors run them
        # (runtime/scan/worker.py): Ray's own cost, apart from that setting.
        previous = os.environ.get("DIFFIML_ORT_SPINNING")
        os.environ["DIFFIML_ORT_SPINNING"] = "0"
        try:
            row = time_localize(bundle, images, out / f"localize_nospin_{r}", settings, cores)
        finally:
            os.environ.pop("DIFFIML_ORT_SPINNING") if previous is None else os.environ.update(
                DIFFIML_ORT_SPINNING=previous)
        row["mode"] = "localize, threads not spinning (as scan's actors)"
        runs.setdefault(row["mode"], []).append({**row, "load_avg_1min": round(os.getloadavg()[0], 2)})
        for actors in actor_counts:
            t0 = time.perf_counter()
            started = connect(None)
            init_s = time.perf_counter() - t0
            try:
                row = time_scan(images, out / f"scan_{actors}_{r}", settings, actors, max(1, cores // actors))
            finally:
                if started:
                    ray.shutdown()
            runs.setdefault(row["mode"], []).append({**row, "ray_init_s": round(init_s, 2),
                                                     "load_avg_1min": round(os.getloadavg()[0], 2)})
    rows = []
    for mode_runs in runs.values():
        middle = sorted(mode_runs, key=lambda x: x["steady_ms_per_image"])[(len(mode_runs) - 1) // 2]
        rows.append({**middle, "rounds": len(mode_runs),
                     "steady_ms_per_image": round(statistics.median(x["steady_ms_per_image"] for x in mode_runs), 1),
                     "steady_ms_per_image_each": [x["steady_ms_per_image"] for x in mode_runs],
                     "load_avg_1min_each": [x["load_avg_1min"] for x in mode_runs],
                     "cpu_ms_per_image": round(statistics.median(x["cpu_ms_per_image"] for x in mode_runs), 1)})
        rows[-1]["steady_images_per_s"] = round(1000 / rows[-1]["steady_ms_per_image"], 3)
    base, base_cpu = rows[0]["steady_ms_per_image"], rows[0]["cpu_ms_per_image"]
    for row in rows[1:]:
        row["overhead_ms_per_image"] = round(row["steady_ms_per_image"] - base, 1)
        row["overhead_pct"] = round(100 * (row["steady_ms_per_image"] - base) / base, 1)
        row["cpu_overhead_ms_per_image"] = round(row["cpu_ms_per_image"] - base_cpu, 1)
        row["cpu_overhead_pct"] = round(100 * (row["cpu_ms_per_image"] - base_cpu) / base_cpu, 1)
    same = next(r["steady_ms_per_image"] for r in rows if r["mode"].startswith("localize, threads not spinning"))
    for row in rows:
        if row["mode"].startswith("scan"):
            row["overhead_vs_same_threads_pct"] = round(100 * (row["steady_ms_per_image"] - same) / same, 1)
    return rows


def to_markdown(rows: list[dict[str, Any]], note: str) -> str:
    cols = ["mode", "actors", "threads_per_actor", "images", "rounds", "steady_ms_per_image",
            "steady_ms_per_image_each", "steady_images_per_s", "overhead_ms_per_image", "overhead_pct",
            "overhead_vs_same_threads_pct",
            "cpu_ms_per_image", "cpu_overhead_ms_per_image", "cpu_overhead_pct", "first_image_s",
            "load_avg_1min_each"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + note + "\n"
