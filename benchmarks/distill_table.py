"""The table of ``benchmarks/distill_accuracy.sh``: each mode's eval summary against the teacher's (K = 8, N = 5),
per dataset: mean per-image F1 on forgeries, its change, image AUC (the bundle's score) and its change, members."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REFERENCE = "teacher_k8_n5"


def table(folder: Path) -> str:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    if REFERENCE not in runs:
        raise SystemExit(f"{folder}: no {REFERENCE}.json to compare with")
    ref = {d["name"]: d for d in runs[REFERENCE]["datasets"]}
    names = list(ref)
    head = "| mode | " + " | ".join(f"{n} F1 (Δ) | {n} image AUC (Δ)" for n in names) + " | members |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    for mode, run in sorted(runs.items(), key=lambda kv: (kv[0] != REFERENCE, kv[0])):
        cells = []
        for d in run["datasets"]:
            r = ref[d["name"]]
            cells.append(f"{d['f1']:.4f} ({d['f1'] - r['f1']:+.4f}) | {d['image_auc']:.3f} "
                         f"({d['image_auc'] - r['image_auc']:+.3f})")
        members = " / ".join(f"{d['mean_members']:.2f}" for d in run["datasets"])
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {members} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
