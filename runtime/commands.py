"""``diffiml localize``: files, folders and globs in; mask / probability / overlay PNGs and one JSON line per image
out. A bad input is one line on stderr naming it; the other images still complete; the exit status is 1 if any
input failed, 2 if nothing could run (bad bundle, bad arguments)."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path

from diffiml.runtime.errors import DiffimlError

log = logging.getLogger(__name__)
DEFAULT_BUNDLE = "engines/default"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".jp2", ".pgm", ".ppm"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("localize", help="localize manipulated pixels in images")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"engine bundle folder (default {DEFAULT_BUNDLE})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backend", default="auto", choices=["auto", "ort-cpu", "ort-cuda", "tensorrt"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ensemble", type=int, default=None)
    p.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--uncertainty", action="store_true", help="also write the ensemble's per-pixel spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="run the PyTorch reference sampler (imports torch) on CHECKPOINT, or on the bundle's own")
    p.add_argument("--truth", default=None, help="a true mask for a single input: prints the F1 against it")
    p.set_defaults(handler=localize)


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files as given (even if not images: they fail later with a clear line), folders' images, glob matches."""
    paths: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif any(c in pattern for c in "*?["):
            paths += sorted(Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file())
        else:
            paths.append(p)
    return paths


def localize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffiml.runtime.image_io import load_image
    from diffiml.runtime.metrics import pixel_f1
    from diffiml.runtime.outputs import write_outputs

    paths = expand_inputs(args.inputs)
    if not paths:
        raise DiffimlError("no input images matched")
    if args.reference is not None:
        open_reference = getattr(args, "open_reference", None)  # plugged in by diffiml.export.commands
        if open_reference is None:
            raise DiffimlError("--reference needs the training stack (pip install 'diffiml[export]')")
        localizer = open_reference(args.bundle, args.reference or None, steps=args.steps, ensemble=args.ensemble,
                                   tta=args.tta, seed=args.seed, uncertainty=args.uncertainty)
    else:
        from diffiml.runtime.localizer import Localizer

        localizer = Localizer.open(args.bundle, backend=args.backend, steps=args.steps, ensemble=args.ensemble,
                                   tta=args.tta, seed=args.seed, uncertainty=args.uncertainty)
    out = Path(args.out)
    try:  # an unusable --out is one line before any work, not one failure per image
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffimlError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise DiffimlError(f"{out}: the output folder is not writable")
    failures = 0
    for path in tqdm(paths, desc="localize", unit="img", file=sys.stderr, disable=len(paths) < 2):
        try:
            t0 = time.perf_counter()
            decoded = load_image(path, localizer.bundle.image_size)
            result = localizer.localize(decoded)
            files = write_outputs(result, decoded.rgb, out, path.stem)
        except (DiffimlError, ValueError, OSError) as exc:
            failures += 1
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            tqdm.write(f"diffiml localize: {message}", file=sys.stderr)  # on its own line, not after the bar
            continue
        record = {"path": str(path), "score": round(result.score, 4),
                  "manipulated_fraction": round(result.manipulated_fraction, 4), "backend": localizer.backend,
                  "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
                  "total_ms": round((time.perf_counter() - t0) * 1000, 2), "outputs": files}
        if args.truth and len(paths) == 1:
            truth = load_image(args.truth).rgb[..., 0] >= 128
            record["f1"] = round(pixel_f1(result.mask, truth), 4)
        print(json.dumps(record), flush=True)
    if failures:
        print(f"diffiml localize: {failures} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failures else 0
