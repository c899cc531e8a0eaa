"""The options every localizing command shares (localize, scan, serve) and the small helpers behind them, apart from
the commands so that scan and serve import them without importing each other."""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

from diffiml.runtime.errors import DiffimlError

DEFAULT_BUNDLE = "engines/default"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".jp2", ".pgm", ".ppm"}


def add_localizer_options(parser: argparse.ArgumentParser, served: bool = False) -> None:
    """The options of how a bundle runs, one set for every command that localizes (localize, scan, serve). A server
    takes steps, ensemble, seed and the uncertainty map per request, so ``served`` leaves those out."""
    parser.add_argument("--backend", default="auto", choices=["auto", "ort-cpu", "ort-cuda", "tensorrt"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"],
                        help="which of the bundle's graphs to run (int8: CPU; fp16: CUDA)")
    if not served:
        parser.add_argument("--steps", type=int, default=None)
        parser.add_argument("--ensemble", default=None, metavar="N|auto[:N]",
                            help="ensemble members, or auto: stop adding members once the mask settles (at most N)")
        add_fast_option(parser)
        parser.add_argument("--ensemble-tolerance", type=float, default=None, metavar="FRACTION",
                            help="auto ensemble: stop when at most this fraction of pixels flipped (default 0.002)")
        parser.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
        parser.add_argument("--uncertainty", action="store_true", help="also write the ensemble's per-pixel spread")
        parser.add_argument("--seed", type=int, default=0)
    why = "it costs 0.2-0.6 s of CPU per image" if served else "the score-based model's map alone"
    add_copy_move_option(parser, why)
    add_follow_decision_option(parser)


FAST_ENSEMBLE = 3  # members of the fast mode (benchmarks/RESULTS.md, "Distillation")


def add_fast_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", action="store_true",
                        help=f"the bundle's distilled student at its step count, {FAST_ENSEMBLE} members (unless "
                             "--ensemble says otherwise); refused for a bundle without a student")


def apply_fast(args: argparse.Namespace) -> None:
    """``--fast`` -> ``args.steps`` and ``args.ensemble`` of the bundle's fast mode; a one-line error when the bundle
    has no distilled student, or when ``--steps`` asks for another count."""
    if not getattr(args, "fast", False):
        return
    from diffiml.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle, verify=False)  # the manifest only; the localizer verifies the graphs
    if bundle.fast_steps is None:
        raise DiffimlError(f"{args.bundle}: --fast needs a distilled UNet in the bundle (diffiml distill, then "
                           "export --student); this bundle has none")
    if args.steps not in (None, bundle.fast_steps):
        raise DiffimlError(f"--fast runs the student's {bundle.fast_steps} steps; drop --steps {args.steps}")
    args.steps = bundle.fast_steps
    args.ensemble = args.ensemble if args.ensemble is not None else FAST_ENSEMBLE


def add_follow_decision_option(parser: argparse.ArgumentParser) -> None:
    """``--follow-decision`` (into ``args.follow_decision``), the same for every command that writes masks."""
    parser.add_argument("--follow-decision", action="store_true",
                        help="empty the mask and overlay of images the bundle's detector judges authentic (the "
                             "probability map is written either way); off by default: on real forgeries it costs "
                             "localization F1 (benchmarks/RESULTS.md)")


def add_copy_move_option(parser: argparse.ArgumentParser, why: str = "the score-based model's map alone") -> None:
    """``--no-copy-move`` (into ``args.copy_move``), the same for every command that opens a bundle."""
    parser.add_argument("--no-copy-move", dest="copy_move", action="store_false",
                        help=f"leave out the bundle's classical copy-move cue ({why})")


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


def adaptive_policy(args: argparse.Namespace):  # -> AdaptiveEnsemble | None (imported lazily)
    """``--ensemble-tolerance`` as an AdaptiveEnsemble; None leaves the default policy to ``--ensemble auto``."""
    if getattr(args, "ensemble_tolerance", None) is None:
        return None
    from diffiml.runtime.localizer import AdaptiveEnsemble

    if not 0 <= args.ensemble_tolerance <= 1:
        raise DiffimlError("--ensemble-tolerance must be in [0, 1]")
    if not str(args.ensemble or "").lower().startswith("auto"):
        raise DiffimlError("--ensemble-tolerance applies to an adaptive ensemble: add --ensemble auto (or auto:N)")
    return AdaptiveEnsemble(tolerance=args.ensemble_tolerance)


def output_folder(name: str) -> Path:
    """An unusable --out is one line before any work, not one failure per image."""
    out = Path(name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffimlError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise DiffimlError(f"{out}: the output folder is not writable")
    return out
