"""``diffiml bench modes``: the cheaper ways to run DiffIML — fewer DDIM steps, int8 graphs, an adaptive ensemble —
timed against the authors' execution order (PyTorch eager, members one after another) in the same run, on one real
image (so that an adaptive ensemble sees real content). Accuracy of the same modes is measured separately with
``diffiml eval`` on the shipped model (benchmarks/RESULTS.md); this command measures speed.

A mode is ``PRECISION:K:N``: precision fp32 or int8, K steps, N members or ``auto`` (adaptive, at most the
bundle's N), e.g. ``fp32:8:5``, ``int8:4:auto``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffiml.benchmarks.table4 import cpu_name, random_bundle, runtime_pipeline, time_runs, torch_pipeline

log = logging.getLogger(__name__)


def parse_mode(text: str) -> tuple[str, int, str]:
    try:
        precision, steps, ensemble = text.split(":")
        if precision not in ("fp32", "int8") or not (ensemble == "auto" or ensemble.isdigit()):
            raise ValueError
        return precision, int(steps), ensemble
    except ValueError:
        raise ValueError(f"mode {text!r}: use PRECISION:K:N, e.g. fp32:8:5 or int8:4:auto") from None


def bench_modes(config_name: str, modes: list[str], image_path: Path, runs: int, warmup: int,
                threads: int | None, calibration: list[Path] | None = None, bundle: str | None = None,
                authors_ensemble: int = 5, authors_steps: int = 8) -> list[dict[str, Any]]:
    import torch

    from diffiml.export.exporter import load_diffiml
    from diffiml.runtime.bundle import load_bundle
    from diffiml.runtime.image_io import load_image, preprocess
    from diffiml.runtime.localizer import Localizer

    parsed = [parse_mode(m) for m in modes]
    if threads:
        torch.set_num_threads(threads)
    if bundle is None:
        wants_int8 = any(p == "int8" for p, _, _ in parsed)
        if wants_int8 and not calibration:
            raise ValueError("int8 modes on a random-weight bundle need --calibration images")
        # A 2-step student (benchmarks time the network, and a student is the teacher's network on its own plan).
        model, bundle = random_bundle(config_name, calibration if wants_int8 else None, students=(2,))
    else:
        model, _ = load_diffiml(load_bundle(bundle, verify=False).checkpoint_path())
    b = load_bundle(bundle)
    rgb = load_image(image_path).rgb
    tensor = torch.from_numpy(preprocess([rgb], b.image_size, b.mean, b.std, b.scale))
    device = cpu_name()
    rows: list[dict[str, Any]] = []
    for name, authors in (("torch-authors", True), ("torch", False)):
        fn = torch_pipeline(model, tensor, authors_steps, authors_ensemble, authors_order=authors)
        rows.append({"mode": f"{name} fp32:{authors_steps}:{authors_ensemble}", "members": authors_ensemble,
                     **time_runs(fn, runs, warmup)})
    for (precision, steps, ensemble), text in zip(parsed, modes, strict=True):
        loc = Localizer.open(bundle, backend="ort-cpu", steps=steps, ensemble=ensemble, threads=threads,
                             precision=precision, copy_move=False)  # the model's modes, against the authors' order
        members = loc.localize(rgb).members
        student = " (distilled student)" if loc.unet_graph != "unet" else ""
        rows.append({"mode": f"runtime {text}{student}", "members": members,
                     **time_runs(runtime_pipeline(loc, [rgb]), runs, warmup)})
    authors_p50 = rows[0]["_p50"]
    for r in rows:
        r["speedup_vs_authors"] = round(authors_p50 / r.pop("_p50"), 2)
        r["device"] = device
        r["config"] = config_name
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | members used | p50 ms | p90 ms | encoder / UNet steps / decoder ms | × authors' order |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        st = r.get("stage_ms") or {}
        stages = " / ".join(str(st.get(k, "-")) for k in ("encoder", "unet_steps", "decoder")) if st else "-"
        lines.append(f"| {r['mode']} | {r['members']} | {r['latency_ms_p50']} | {r['latency_ms_p90']} | {stages} | "
                     f"{r['speedup_vs_authors']} |")
    return "\n".join(lines) + "\n"


def accuracy_table(folder: Path, reference: str = "fp32_k8_n5", tolerance: float = 0.01) -> str:
    """The markdown table of ``benchmarks/modes_accuracy.sh``'s results: F1 per mode and its change from the
    reference mode, on each set, and whether both stay within ``tolerance``."""
    import json

    def load(name: str) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in json.loads((folder / f"f1_{name}.json").read_text())["datasets"]}

    ref = load(reference)
    names = sorted((p.stem[3:] for p in folder.glob("f1_*.json")),
                   key=lambda n: (n.split("_")[0] != "fp32", "auto" in n, -int(n.split("_")[1][1:]), n))
    sets = list(ref)
    lines = ["| precision | K | N | " + " | ".join(f"{s} F1 (Δ) | {s} AUC" for s in sets)
             + " | members used | within ±" + f"{tolerance} |", "|---" * (5 + 2 * len(sets)) + "|"]
    for name in names:
        rows = load(name)
        precision, k, n = name.split("_")[:3]
        n = (f"auto (tol {'0.01' if name.endswith('t01') else '0.002'})" if n == "auto" else n[1:])
        deltas = [rows[s]["f1"] - ref[s]["f1"] for s in sets]
        cells = " | ".join(f"{rows[s]['f1']:.4f} ({d:+.4f}) | {rows[s]['auc']:.3f}" for s, d in zip(sets, deltas,
                                                                                                    strict=True))
        members = " / ".join(f"{rows[s]['mean_members']:.2f}" for s in sets)
        ok = "reference" if name == reference else ("yes" if all(abs(d) <= tolerance for d in deltas) else "no")
        lines.append(f"| {precision} | {k[1:]} | {n} | {cells} | {members} | {ok} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(accuracy_table(Path(sys.argv[1])))
