"""``diffiml bench cue-share``: what the copy-move cue adds to a default ``localize`` call. The same decoded images
through one bundle with and without the cue, in alternating rounds (medians reported): the wall time per image and
the cue's share of it, and the cue's own time (``timings_ms.copy_move``, most of which runs beside the graphs)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


def bench_cue_share(bundle: str, images: list[Path], rounds: int = 3, steps: int | None = None,
                    ensemble: int | None = None) -> dict[str, Any]:
    from diffiml.runtime.image_io import load_image
    from diffiml.runtime.localizer import Localizer

    walls: dict[bool, list[float]] = {True: [], False: []}
    own: list[float] = []
    with Localizer.open(bundle, backend="ort-cpu", steps=steps, ensemble=ensemble) as with_cue, \
            Localizer.open(bundle, backend="ort-cpu", steps=steps, ensemble=ensemble, copy_move=False) as without:
        decoded = [load_image(p, with_cue.bundle.image_size) for p in images]
        with_cue.localize(decoded[0]), without.localize(decoded[0])  # warm-up
        for _ in range(rounds):
            for cue, localizer in ((True, with_cue), (False, without)):
                t0 = time.perf_counter()
                for d in decoded:
                    result = localizer.localize(d)
                    if cue:
                        own.append(result.timings_ms["copy_move"])
                walls[cue].append((time.perf_counter() - t0) * 1000 / len(decoded))
    with_ms, without_ms = statistics.median(walls[True]), statistics.median(walls[False])
    return {"images": len(images), "rounds": rounds, "with_cue_ms": round(with_ms, 1),
            "without_cue_ms": round(without_ms, 1), "cue_adds_ms": round(with_ms - without_ms, 1),
            "cue_share_pct": round(100 * (with_ms - without_ms) / with_ms, 1),
            "cue_own_ms": round(statistics.median(own), 1)}
