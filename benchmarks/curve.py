"""``diffiml bench curve``: F1 against training steps. Every snapshot of a run is exported to a bundle and scored with
the same runtime and metrics as ``diffiml eval``; this is how the shipped checkpoint is selected."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffiml.benchmarks.evaluate import evaluate


def snapshots_of(run: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint folder) for every snapshot of ``run`` and its latest checkpoint, by step."""
    found: dict[int, Path] = {}
    for folder in sorted((run / "snapshots").glob("step-*")) + [run]:
        state = folder / "checkpoint" / "trainer_state.json"
        if state.is_file():
            found.setdefault(int(json.loads(state.read_text())["step"]), folder / "checkpoint")
    if not found:
        raise ValueError(f"{run}: no snapshots or checkpoint to evaluate")
    return sorted(found.items())


def bench_curve(run: str | Path, data: list[tuple[str, list]], steps: int | None, ensemble: int | None,
                seed: int = 0, only: list[int] | None = None) -> list[dict]:
    """data: (name, samples) pairs. Returns one row per snapshot: step and each dataset's summary."""
    from diffiml.export.exporter import export_bundle
    from diffiml.runtime.localizer import Localizer

    rows = []
    for step, ckpt in snapshots_of(Path(run)):
        if only and step not in only:
            continue
        with tempfile.TemporaryDirectory(prefix="diffiml-curve-") as tmp:
            bundle = Path(tmp) / "bundle"
            export_bundle(ckpt, bundle)
            # What training bought: the model's map alone (the copy-move cue is the same at every step).
            localizer = Localizer.open(bundle, backend="ort-cpu", steps=steps, ensemble=ensemble, seed=seed,
                                       copy_move=False)
            rows.append({"step": step, "checkpoint": str(ckpt),
                         "datasets": [evaluate(localizer, samples, name)[0] for name, samples in data]})
    return rows


def to_markdown(rows: list[dict]) -> str:
    names = [d["name"] for d in rows[0]["datasets"]]
    head = "| step | " + " | ".join(f"{n} F1 | {n} pixel AUC | {n} image AUC" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(names))]
    for r in rows:
        cells = [f"{d['f1']:.3f} | {d['auc']:.3f} | {d['image_auc']:.3f}" for d in r["datasets"]]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    trivial = " | ".join(f"{d['f1_all_manipulated_mask']:.3f} | 0.5 | 0.5" for d in rows[0]["datasets"])
    lines.append(f"| all-manipulated mask | {trivial} |")
    for i, name in enumerate(names):  # F1 per manipulation type and set, where the dataset has groups
        groups = [g["name"] for g in rows[0]["datasets"][i].get("groups", [])]
        if not groups:
            continue
        lines += ["", f"{name}, F1 per group (n manipulated):", "",
                  "| step | " + " | ".join(f"{g} ({d['n_manipulated']})" for g, d in
                                           zip(groups, rows[0]["datasets"][i]["groups"], strict=True)) + " |",
                  "|" + "---|" * (1 + len(groups))]
        for r in rows:
            lines.append(f"| {r['step']} | " + " | ".join(f"{g['f1']:.3f}" for g in r["datasets"][i]["groups"]) + " |")
        lines.append("| all-manipulated mask | " + " | ".join(
            f"{g['f1_all_manipulated_mask']:.3f}" for g in rows[0]["datasets"][i]["groups"]) + " |")
    return "\n".join(lines) + "\n"
