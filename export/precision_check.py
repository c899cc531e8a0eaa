"""How far a reduced-precision graph set moves the masks: the check every precision of a bundle records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffiml.runtime.backends import open_backend
from diffiml.runtime.bundle import Bundle
from diffiml.runtime.localizer import Localizer


def compare_precisions(bundle: Bundle, precision: str, images: Sequence[Any], steps: int, ensemble: int
                       ) -> tuple[float, float]:
    """Mask agreement (p >= 0.5, over all pixels of all images) and max |Δp| of ``precision`` against fp32."""
    ref = Localizer(bundle, open_backend(bundle, "ort-cpu"), steps, ensemble, False, 0, False)
    low = Localizer(bundle, open_backend(bundle, "ort-cpu", precision=precision), steps, ensemble, False, 0, False)
    agree, total, worst = 0, 0, 0.0
    for image in images:
        a, b = ref.localize(image).model_probability, low.localize(image).model_probability
        agree += int(((a >= 0.5) == (b >= 0.5)).sum())
        total += a.size
        worst = max(worst, float(np.abs(a - b).max()))
    return (agree / total if total else 1.0), worst
