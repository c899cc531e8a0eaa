"""``Localizer``: the library entry point. Torch-free: numpy, OpenCV and an inference engine.

Execution plan per batch of images: the encoder graph once per image (condition features, including the UNet's
condition-only conv); the UNet-step graph K times on one batch of images x ensemble members (with flip TTA the
flipped copies are extra images with their own noise); the decoder once per image on the averaged latent, and on
each member only when uncertainty is asked for.

Thread safety: one Localizer may be shared by threads. Decoding, resizing and post-processing run in the
calling thread, in parallel; the engine calls (which reuse preallocated buffers) run under one lock per Localizer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from diffiml.runtime.backends import open_backend
from diffiml.runtime.backends.base import Backend
from diffiml.runtime.bundle import Bundle, load_bundle
from diffiml.runtime.copy_move import copy_move_probability
from diffiml.runtime.detector import CUE_SILENT, encoder_evidence, map_evidence, spread_evidence
from diffiml.runtime.errors import BackendUnavailableError
from diffiml.runtime.image_io import DecodedImage, ImageInput, load_image, preprocess, resize_probability
from diffiml.schedule import ensemble_noise

SCORE_TOP_FRACTION = 0.005


@dataclass(frozen=True)
class AdaptiveEnsemble:
    """Run the ensemble in chunks and stop once the averaged mask has settled.

    Members run ``first``, then ``step`` at a time, up to the Localizer's ``ensemble``. After each chunk the running
    mean latent is decoded; the run stops when, for every image of the batch, the fraction of pixels whose decision
    (p >= 0.5) flipped since the previous chunk is at most ``tolerance``. Members are the same noise draws, in the
    same order, as the fixed ensemble: when it runs all N it returns the fixed ensemble's result bit for bit.
    """

    first: int = 1
    step: int = 1
    tolerance: float = 0.002

    def chunks(self, n: int) -> list[int]:
        sizes = [min(self.first, n)]
        while sum(sizes) < n:
            sizes.append(min(self.step, n - sum(sizes)))
        return sizes


def image_score(probability: np.ndarray) -> float:
    """The map's own image-level score: the mean of the top 0.5 % pixel probabilities (a max that one pixel cannot
    set). The score of a bundle without a detector, and one of the detector's inputs."""
    p = probability.ravel()
    k = max(1, int(p.size * SCORE_TOP_FRACTION))
    return float(np.partition(p, p.size - k)[-k:].mean())


# Above this many pixels (20000²) the full-size mask is thresholded a strip of rows at a time: the 16-bit map of a
# 25000² input alone is 1.25 GB. Bilinear in float there; a boundary pixel may differ from the 16-bit rounding.
MAX_EXACT_MASK_PIXELS = 400_000_000


def _upsampled_threshold(small: np.ndarray, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """(height, width) bool: ``small`` resized bilinearly (pixel centres aligned and borders clamped, as cv2.resize)
    and thresholded, a strip of about a million pixels at a time, so only the bool mask is ever full size."""
    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        lo = np.floor(pos)
        weight = (pos - lo).astype(np.float32)
        return np.clip(lo, 0, n_in - 1).astype(np.intp), np.clip(lo + 1, 0, n_in - 1).astype(np.intp), weight

    small = small.astype(np.float32, copy=False)
    x0, x1, wx = taps(width, small.shape[1])
    y0, y1, wy = taps(height, small.shape[0])
    out = np.empty((height, width), bool)
    step = max(1, (1 << 20) // width)
    for top in range(0, height, step):
        rows = slice(top, min(height, top + step))
        across = small[y0[rows]] * (1 - wy[rows, None]) + small[y1[rows]] * wy[rows, None]  # (strip, S)
        out[rows] = across[:, x0] * (1 - wx) + across[:, x1] * wx >= threshold
    return out


@dataclass
class LocalizationResult:
    """Maps are computed at the input's original size on first access, from the model-resolution maps, so a
    huge input costs memory only for what is asked for."""

    model_probability: np.ndarray  # (S, S) float32
    model_uncertainty: np.ndarray | None  # (S, S) float32, std of the members' probabilities
    height: int
    width: int
    # image-level: the bundle detector's calibrated probability that the image is manipulated (runtime/detector.py);
    # for a bundle without one, the map's top-pixel score (image_score)
    score: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    members: int = 0  # ensemble members averaged (fewer than asked when an adaptive ensemble stopped early)
    # (S, S) float32: the copy-move cue's map where it ran (already fused into model_probability by a max)
    model_copy_move: np.ndarray | None = None
    # the image-level decision (score >= the bundle's threshold); None for results made without a Localizer
    decision: bool | None = None
    # the mask and overlay show the map's regions: always, or, with ``Localizer(follow_decision=True)``, only when the
    # decision says manipulated; the probability map is the model's either way
    regions_shown: bool = True
    evidence: dict[str, float] = field(default_factory=dict)  # the detector's inputs, for fitting and inspection

    @property
    def copy_move_fraction(self) -> float | None:
        """Fraction of the image the copy-move cue marked (None: the cue did not run)."""
        return None if self.model_copy_move is None else float((self.model_copy_move >= 0.5).mean())

    @cached_property
    def probability(self) -> np.ndarray:
        """(H, W) float32 in [0, 1] at the original size."""
        return resize_probability(self.model_probability, self.height, self.width)

    def probability16(self) -> np.ndarray:
        """(H, W) uint16, probability x 65535 at the original size: a quarter of the float map's memory for a
        huge input, and what the 16-bit PNG stores."""
        small = (self.model_probability * 65535 + 0.5).astype(np.uint16)
        return cv2.resize(small, (self.width, self.height), interpolation=cv2.INTER_LINEAR)

    def uncertainty16(self) -> np.ndarray | None:
        """(H, W) uint16 at the original size: the members' spread (std, at most 0.5 for values in [0, 1]) x 2 x
        65535, so the 16-bit PNG uses its full range; None unless uncertainty was asked for."""
        if self.model_uncertainty is None:
            return None
        small = (np.clip(self.model_uncertainty * 2, 0, 1) * 65535 + 0.5).astype(np.uint16)
        return cv2.resize(small, (self.width, self.height), interpolation=cv2.INTER_LINEAR)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: probability >= 0.5 (the paper's fixed threshold), computed without the float map; empty
        when the image-level decision is "authentic" and the Localizer follows the decision."""
        if not self.regions_shown:
            return np.zeros((self.height, self.width), bool)
        if self.height * self.width > MAX_EXACT_MASK_PIXELS:
            return _upsampled_threshold(self.model_probability, self.height, self.width)
        return self.probability16() >= 32768

    @property
    def shown_probability(self) -> np.ndarray:
        """(S, S): the map the overlay draws: the probability where regions are shown, zeros otherwise."""
        return self.model_probability if self.regions_shown else np.zeros_like(self.model_probability)

    @cached_property
    def uncertainty(self) -> np.ndarray | None:
        """(H, W) float32: per-pixel spread (std) of the ensemble members' probabilities, if asked for."""
        if self.model_uncertainty is None:
            return None
        return resize_probability(self.model_uncertainty, self.height, self.width)

    @property
    def manipulated_fraction(self) -> float:
        """Share of the image the mask marks (0 when the decision says authentic and regions are not shown)."""
        return float((self.model_probability >= 0.5).mean()) if self.regions_shown else 0.0


def parse_ensemble(ensemble: int | str | None, default: int, adaptive: AdaptiveEnsemble | None = None
                   ) -> tuple[int, AdaptiveEnsemble | None]:
    """``5`` -> (5, None); ``"auto"`` -> (default, AdaptiveEnsemble()); ``"auto:8"`` -> (8, ...). ValueError else."""
    if ensemble is None:
        return default, adaptive
    if isinstance(ensemble, int):
        return ensemble, adaptive
    text = str(ensemble).strip().lower()
    if text.isdigit():
        return int(text), adaptive
    head, _, tail = text.partition(":")
    if head != "auto" or (tail and not tail.isdigit()):
        raise ValueError(f"ensemble must be a member count, 'auto' or 'auto:N', got {ensemble!r}")
    return (int(tail) if tail else default), adaptive or AdaptiveEnsemble()


def _cue_pool() -> ThreadPoolExecutor:
    """One worker thread for the copy-move cue (started on first use)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffiml-cue")


class Localizer:
    def __init__(self, bundle: Bundle, backend: Backend, steps: int, ensemble: int, tta: bool, seed: int,
                 uncertainty: bool, adaptive: AdaptiveEnsemble | None = None, copy_move: bool = True,
                 follow_decision: bool = False) -> None:
        """``copy_move``: run the bundle's copy-move cue, if it has one (runtime/copy_move.py). ``follow_decision``: the
        mask and overlay are empty for images the detector judges authentic."""
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        self.adaptive = adaptive
        self.bundle = bundle
        self.backend = backend.name
        self._backend = backend
        self._owns_backend = False  # Localizer.open's own backend is closed with it; a shared one is not
        self.steps, self.ensemble, self.tta, self.seed, self.uncertainty = steps, ensemble, tta, seed, uncertainty
        self.plan = bundle.plan(steps)
        self.unet_graph = bundle.unet_graph(steps)  # a distilled student where the bundle has one for ``steps``
        self.engines, self.step_loop = backend.engines, backend.loop_for(self.unet_graph)
        self.copy_move = bundle.copy_move_cue if copy_move else None
        self.detector = bundle.detector
        self.follow_decision = follow_decision
        # one worker thread for the copy-move cue (made now: threads sharing this Localizer must not race to make it;
        # its thread starts on first use)
        self._cues = _cue_pool() if self.copy_move is not None else None
        self._timesteps = self.plan.timesteps.astype(np.float32)
        draws = ensemble * (2 if tta else 1)
        self._noise = ensemble_noise(seed, draws, bundle.latent_shape)  # (draws, 8, h, w), shared by every image

    @staticmethod
    def open(bundle_dir: str | Path, backend: str = "auto", steps: int | None = None,
             ensemble: int | str | None = None, tta: bool = False, seed: int = 0, uncertainty: bool = False,
             threads: int | None = None, adaptive: AdaptiveEnsemble | None = None, precision: str = "fp32",
             copy_move: bool = True, follow_decision: bool = False) -> Localizer:
        """Load and verify a bundle (sha256 of every graph) and its engines for ``backend`` at ``precision``
        (``fp32``, or a reduced precision the bundle carries: ``int8`` for CPU, ``fp16`` for CUDA).

        ``ensemble``: a member count, or ``"auto"`` / ``"auto:N"`` for an adaptive ensemble of at most N members
        (default: the bundle's ensemble size), stopped by ``adaptive`` (default ``AdaptiveEnsemble()``).
        ``copy_move=False`` leaves out the bundle's copy-move cue (the model's map alone); ``follow_decision=True``
        empties the mask of images judged authentic."""
        bundle = load_bundle(bundle_dir)
        n, adaptive = parse_ensemble(ensemble, bundle.default_ensemble, adaptive)
        engines = open_backend(bundle, backend, threads, precision)
        try:
            localizer = Localizer(bundle, engines, steps or bundle.default_steps, n, tta, seed, uncertainty, adaptive,
                                  copy_move, follow_decision)
        except BaseException:
            engines.close()
            raise
        localizer._owns_backend = True
        return localizer

    def close(self) -> None:
        """Free the backend's device resources (TensorRT contexts, CUDA streams and graphs) if this Localizer opened
        it; a backend shared with other Localizers is left to its owner. Idempotent."""
        if self._cues is not None:  # its thread ends; a new pool starts none until used (a shared backend goes on)
            self._cues.shutdown(wait=True)
            self._cues = _cue_pool()
        if self._owns_backend:
            self._backend.close()

    def __enter__(self) -> Localizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def localize(self, image: ImageInput | DecodedImage) -> LocalizationResult:
        return self.localize_batch([image])[0]

    def localize_batch(self, images: Sequence[ImageInput | DecodedImage], seeds: Sequence[int] | None = None
                       ) -> list[LocalizationResult]:
        """``seeds``: one per image, for images of different seeds in one batch (serving); each image's result is
        the one it gets alone with its seed. Default: the Localizer's seed for all."""
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        t0 = time.perf_counter()
        size = self.bundle.image_size
        decoded = [im if isinstance(im, DecodedImage) else load_image(im, size) for im in images]
        t1 = time.perf_counter()
        if self._backend.closed:  # before the cue's thread is asked for anything (it ends with the backend's owner)
            raise BackendUnavailableError(f"the {self.backend} backend of this Localizer was closed")
        # The cue starts first, in its own thread (OpenCV and onnxruntime release the GIL): its time hides behind
        # the preprocessing's and the graphs' where a core is free.
        cues = [self._cues.submit(copy_move_probability, d.rgb, self.copy_move, size) for d in decoded] \
            if self._cues is not None else None
        x = preprocess([d.rgb for d in decoded], size, self.bundle.mean, self.bundle.std, self.bundle.scale)
        t2 = time.perf_counter()
        prob, unc, stage, members, spread, pooled = self._infer(x, seeds)
        t3 = time.perf_counter()
        results, cue_seconds, decision_seconds, waited = [], [], [], 0.0
        for i, d in enumerate(decoded):
            p, cue, wait = prob[i], None, 0.0
            s0 = time.perf_counter()
            evidence = {**map_evidence(p), **spread_evidence(spread[i], p), **encoder_evidence(pooled[i]),
                        **CUE_SILENT}  # without the cue: a cue that found nothing
            if cues is not None:
                w0 = time.perf_counter()
                cue, finding, seconds = cues[i].result()
                wait = time.perf_counter() - w0
                waited += wait
                cue_seconds.append(seconds)  # its own time, reported apart (most of it ran beside the graphs)
                evidence.update(finding.evidence())
                p = np.maximum(p, cue)
            if self.detector is not None:
                score = self.detector.probability(evidence)
                decision = score >= self.detector.threshold
            else:  # a bundle without a detector: the map's top pixels, and "some region is marked"
                score = image_score(p)
                decision = score >= 0.5
            decision_seconds.append(time.perf_counter() - s0 - wait)
            results.append(LocalizationResult(p, None if unc is None else unc[i], d.height, d.width, score,
                                              members=members, model_copy_move=cue, decision=decision,
                                              regions_shown=decision or not self.follow_decision, evidence=evidence))
        t4 = time.perf_counter()
        per_image = 1000.0 / len(images)
        for i, r in enumerate(results):
            r.timings_ms = {"decode": (t1 - t0) * per_image, "preprocess": (t2 - t1) * per_image,
                            **{k: v * per_image for k, v in stage.items()},
                            **({"copy_move": cue_seconds[i] * 1000.0} if cue_seconds else {}),
                            "decision": decision_seconds[i] * 1000.0,
                            "postprocess": (t4 - t3 - waited - sum(decision_seconds)) * per_image}
        return results

    def _noise_blocks(self, seed: int) -> np.ndarray:
        """(1 or 2, N, 8, h, w): the plain pass's draws, then the flipped pass's (TTA)."""
        draws = self._noise if seed == self.seed else ensemble_noise(seed, self._noise.shape[0], self._noise.shape[1:])
        return draws.reshape(-1, self.ensemble, *draws.shape[1:])

    def _infer(self, x: np.ndarray, seeds: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float], int, np.ndarray, np.ndarray]:
        """x (B, 3, S, S) -> probability (B, S, S), uncertainty (B, S, S) or None, stage seconds, members used,
        the members' spread of the final mask latent (B, h, w) and the pooled condition features (B, 2C), both of the
        unflipped views (the detector's inputs)."""
        b, n = x.shape[0], self.ensemble
        views = np.concatenate([x, x[..., ::-1]]) if self.tta else x  # flipped copies are extra "images"
        v = views.shape[0]
        # Image i of the first B uses noise draws [0, N); its flipped copy uses [N, 2N).
        if seeds is None:
            noise = self._noise_blocks(self.seed)[np.arange(v) // b]  # (V, N, C, h, w)
        else:
            per_seed = {seed: self._noise_blocks(seed) for seed in set(seeds)}
            noise = np.stack([per_seed[seeds[j % b]][j // b] for j in range(v)])
        chunks = self.adaptive.chunks(n) if self.adaptive else [n]
        with self._backend.lock:
            if self._backend.closed:
                raise BackendUnavailableError(f"the {self.backend} backend of this Localizer was closed")
            t0 = time.perf_counter()
            cond = self.engines["condition_encoder"].run({"image": np.ascontiguousarray(views)})["cond_features"]
            t1 = time.perf_counter()
            decoder = self.engines["mask_decoder"]
            z = np.empty(noise.shape, np.float32)  # (V, N, ...): every member's final latent, image-major
            used, previous, unet_s = 0, None, 0.0
            for size in chunks:
                s0 = time.perf_counter()
                latents = np.ascontiguousarray(noise[:, used : used + size].reshape(v * size, *noise.shape[2:]))
                z[:, used : used + size] = self._denoise(latents, cond).reshape(v, size, *noise.shape[2:])
                used += size
                unet_s += time.perf_counter() - s0
                prob = decoder.run({"latents": np.ascontiguousarray(z[:, :used].mean(axis=1))})["probability"]
                prob = prob[:, 0].copy()
                if used < n:  # adaptive: stop once no image's mask moved more than the tolerance
                    mask = prob >= 0.5
                    if previous is not None and (mask != previous).mean(axis=(1, 2)).max() <= self.adaptive.tolerance:
                        break
                    previous = mask
            unc = None
            if self.uncertainty:
                members = np.ascontiguousarray(z[:, :used].reshape(v * used, *noise.shape[2:]))
                member_prob = decoder.run({"latents": members})["probability"].reshape(v, used, *prob.shape[1:])
                unc = member_prob.std(axis=1)
            t3 = time.perf_counter()
        mask_channels = int(self.bundle.manifest["latent"].get("mask_channels", 4))
        spread = z[:b, :used, :mask_channels].std(axis=1).mean(axis=1)  # (B, h, w); 0 for one member
        pooled = np.concatenate([cond[:b].mean(axis=(2, 3)), cond[:b].max(axis=(2, 3))], axis=1)
        if self.tta:  # flip back, merge by pixel-wise max (the authors' TTA)
            prob = np.maximum(prob[:b], prob[b:, :, ::-1])
            unc = None if unc is None else np.maximum(unc[:b], unc[b:, :, ::-1])
        stages = {"encoder": t1 - t0, "unet_steps": unet_s, "decoder": t3 - t1 - unet_s}
        return prob, unc, stages, used, spread, pooled

    def _denoise(self, latents: np.ndarray, cond: np.ndarray) -> np.ndarray:
        p = self.plan
        return self.step_loop(latents, cond, self._timesteps, p.coef_x0, p.coef_xt, p.sqrt_alpha)
