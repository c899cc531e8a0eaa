"""What every reduced precision of a bundle shares: its manifest entry per graph, and the check it records (how far
it moves the masks from fp32)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffiml.files import sha256_of
from diffiml.runtime.backends import open_backend
from diffiml.runtime.bundle import Bundle
from diffiml.runtime.localizer import Localizer
from diffiml.runtime.metrics import map_agreement


def graph_entry(path: Path, precision: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """The manifest's entry for the graph file ``path`` (every precision's, fp32 included)."""
    import onnx

    return {"file": path.name, "sha256": sha256_of(path), "precision": precision, "inputs": inputs,
            "outputs": outputs, "domains": sorted({o.domain for o in onnx.load(str(path)).opset_import})}


def record_check(bundle: Bundle, precision: str, entry: dict[str, Any], images: Sequence[Any], steps: int,
                 ensemble: int) -> dict[str, Any]:
    """Compare ``precision`` (its ``entry``, not yet in the bundle's file) with fp32 on ``images`` (ort-cpu) and
    store the result as ``entry["checks"]``: mask agreement (p >= 0.5, over all pixels) and max |Δp|."""
    bundle.manifest.setdefault("precisions", {})[precision] = entry
    # The graphs are compared: the copy-move cue (the same map at every precision) is left out.
    ref = Localizer(bundle, open_backend(bundle, "ort-cpu"), steps, ensemble, False, 0, False, copy_move=False)
    low = Localizer(bundle, open_backend(bundle, "ort-cpu", precision=precision), steps, ensemble, False, 0, False,
                    copy_move=False)
    agreement, max_dp = map_agreement([ref.localize(im).model_probability for im in images],
                                      [low.localize(im).model_probability for im in images])
    entry["checks"] = {"mask_agreement_vs_fp32": agreement, "max_abs_probability_diff_vs_fp32": max_dp,
                       "images": len(images), "provider": "CPUExecutionProvider"}
    return entry["checks"]
