"""``diffiml serve``: the runtime inside NVIDIA Triton Inference Server (through PyTriton), so that many users' tools
share one model behind HTTP/gRPC endpoints with Triton's dynamic batching, health, readiness and metrics.

The model, ``diffiml``, takes one encoded image per batch row (BYTES: PNG/JPEG/TIFF as sent, decoded here with the
same limits and errors as ``localize``) and optional request parameters ``steps``, ``ensemble``, ``seed``,
``uncertainty`` and ``raw`` (also return the model-size float maps). Requests that Triton batches together are
grouped by what changes the computation (steps, ensemble, uncertainty) and run through the encoder and the UNet
steps as one batch; seeds may differ within a batch (noise is drawn per row). Only the outputs a request asks for
are encoded (the PNGs are the costly part).

PyTriton fails a whole batch when its callable raises, so nothing a row brings may raise: each row carries an
``error`` output, empty when the row succeeded, and its neighbours are answered as if it were not there. A client
treats a non-empty ``error`` as that image's failure; failures are counted on the stats port (``stats.py``).
Every answer's ``info_json`` names the bundle (its id: the manifest's sha256; and its graphs' sha256) and the
ensemble members used.

Serving runs in its own environment (``make serve-env``): Triton's Python-backend stub needs numpy < 2.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sysconfig
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffiml.runtime.backends import open_backend
from diffiml.runtime.backends.base import Backend
from diffiml.runtime.backends.cuda_memory import device_count
from diffiml.runtime.bundle import Bundle, load_bundle
from diffiml.runtime.errors import DiffimlError, one_line
from diffiml.runtime.image_io import DecodedImage, load_image
from diffiml.runtime.localizer import LocalizationResult, Localizer
from diffiml.runtime.serving.client import MODEL_NAME
from diffiml.runtime.serving.stats import ServeStats, start_stats_server

log = logging.getLogger(__name__)
LOCALIZER_CACHE = 64  # Localizers (settings) kept per instance
MAX_ENSEMBLE = 64  # a request may not ask for more members than this (memory and time of one batch)
# Decoded pixels one call holds before it runs them: a batch of eight 100 MP TIFFs would hold 2.4 GB at once, so
# rows past this run as a batch of their own after the ones before are answered and freed.
BATCH_DECODED_BUDGET = 512 << 20
OUTPUT_NAMES = ("score", "manipulated_fraction", "probability_png", "uncertainty_png", "raw_probability",
                "raw_uncertainty", "info_json", "error")
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²", which int() refuses


@dataclass(frozen=True)
class Settings:
    """What one request may choose; requests with equal ``batch_key`` share a batch."""

    steps: int
    ensemble: int
    seed: int
    uncertainty: bool
    raw: bool

    @property
    def batch_key(self) -> tuple[int, int, bool]:
        """What rows of one batch must share (the seed is per row; ``raw`` only changes what is returned)."""
        return self.steps, self.ensemble, self.uncertainty


def parse_settings(parameters: dict[str, Any] | None, bundle: Bundle) -> Settings:
    """Request parameters -> Settings, or DiffimlError naming the bad one."""
    p = dict(parameters or {})
    unknown = set(p) - {"steps", "ensemble", "seed", "uncertainty", "raw"}
    if unknown:
        raise DiffimlError(f"unknown request parameter(s): {', '.join(sorted(unknown))}")

    def integer(name: str, default: int, low: int, high: int) -> int:
        value = p.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | str) or not _INTEGER.fullmatch(str(value)):
            raise DiffimlError(f"parameter {name} must be an integer, got {value!r}")
        if not low <= int(value) <= high:
            raise DiffimlError(f"parameter {name} must be in [{low}, {high}], got {value}")
        return int(value)

    def flag(name: str) -> bool:
        value = p.get(name, False)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool | int):
            raise DiffimlError(f"parameter {name} must be a boolean, got {value!r}")
        return bool(value)

    steps = integer("steps", bundle.default_steps, 1, 1000)
    if steps not in bundle.step_counts:  # checked here: the bundle's own error names a path of the server
        raise DiffimlError(f"parameter steps={steps}: the bundle has schedules for {bundle.step_counts} steps")
    return Settings(steps, integer("ensemble", bundle.default_ensemble, 1, MAX_ENSEMBLE),
                    integer("seed", 0, 0, 2**31 - 1), flag("uncertainty"), flag("raw"))


def _png16(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise DiffimlError("could not encode the probability map")
    return encoded.tobytes()


class InstanceModel:
    """One Triton model instance: its own engines (sessions, buffers) and one Localizer per settings over them.
    Triton calls an instance from one thread at a time; several instances run side by side."""

    def __init__(self, bundle: Bundle, backend: Backend, stats: ServeStats | None = None,
                 copy_move: bool = True, follow_decision: bool = False) -> None:
        self.bundle, self.backend, self.copy_move, self.follow_decision = bundle, backend, copy_move, follow_decision
        self.bundle_sha256 = bundle.sha256s
        self.bundle_id = bundle.bundle_id
        self.stats = stats or ServeStats(self.bundle_sha256)
        self._localizers: OrderedDict[tuple[int, int, bool], Localizer] = OrderedDict()

    def localizer(self, s: Settings) -> Localizer:
        """The Localizer of these settings' batch (steps, ensemble, uncertainty; each row brings its own seed), from a
        least-recently-used cache."""
        key = s.batch_key
        if key in self._localizers:
            self._localizers.move_to_end(key)
        else:
            if len(self._localizers) >= LOCALIZER_CACHE:
                self._localizers.popitem(last=False)
            self._localizers[key] = Localizer(self.bundle, self.backend, s.steps, s.ensemble, False, 0, s.uncertainty,
                                              copy_move=self.copy_move, follow_decision=self.follow_decision)
        return self._localizers[key]

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        rows: list[list[dict[str, Any]]] = []
        groups: dict[tuple[int, int, bool], list[tuple[dict[str, Any], DecodedImage, Settings, Any]]] = {}
        held = 0  # bytes of decoded pixels waiting for inference
        for request in requests:
            request_rows: list[dict[str, Any]] = []
            rows.append(request_rows)
            try:  # nothing a request brings may raise out of here: PyTriton would fail the whole batch
                images = np.asarray(request["image"]).reshape(-1)
                request_rows.extend({} for _ in images)
                settings = parse_settings(request.parameters, self.bundle)
            except Exception as exc:  # noqa: BLE001 - a malformed request is that request's error
                request_rows[:] = request_rows or [{}]
                self._fail(request_rows, "parameters", exc)
                continue
            wanted = getattr(request, "requested_output_names", None)
            for row, data in zip(request_rows, images, strict=True):
                try:
                    decoded = self._decode(data)
                except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's
                    self._fail([row], "decode", exc)
                    continue
                if groups and held + decoded.rgb.nbytes > BATCH_DECODED_BUDGET:
                    self._run_groups(groups)  # the batch's memory budget: what is decoded runs before more is
                    groups, held = {}, 0
                groups.setdefault(settings.batch_key, []).append((row, decoded, settings, wanted))
                held += decoded.rgb.nbytes
        self._run_groups(groups)
        return [self._stack(request_rows) for request_rows in rows]

    def _run_groups(self, groups: dict[tuple[int, int, bool], list[tuple[dict[str, Any], DecodedImage, Settings,
                                                                          Any]]]) -> None:
        """Each group of rows with the same settings as one batch; when that batch fails, each row alone, so one
        row's failure stays that row's."""
        for members in groups.values():
            if not self._run_rows(members, len(members), alone=len(members) == 1):
                for member in members:
                    self._run_rows([member], len(members), alone=True)

    def _run_rows(self, members: list[tuple[dict[str, Any], DecodedImage, Settings, Any]], batch: int,
                  alone: bool) -> bool:
        """Inference for ``members`` as one batch, then each row's encoding. False when the batch failed and is not
        ``alone`` (its rows are to be tried one by one); a row alone that fails answers its error."""
        try:
            results = self.localizer(members[0][2]).localize_batch([d for _, d, _, _ in members],
                                                                   seeds=[s.seed for _, _, s, _ in members])
        except Exception as exc:  # noqa: BLE001 - e.g. a batch over the engines' limits, memory: these rows fail
            if not alone:
                return False
            self._fail([m[0] for m in members], "inference" if isinstance(exc, DiffimlError) else "internal", exc)
            if not isinstance(exc, DiffimlError):
                log.exception("inference failed for %d row(s)", len(members))
            return True
        for member, result in zip(members, results, strict=True):
            self._encode_row(member, result, batch)
        return True

    def _encode_row(self, member: tuple[dict[str, Any], DecodedImage, Settings, Any], result: LocalizationResult,
                    batch: int) -> None:
        row, _, settings, wanted = member
        try:
            row.update(self._encode(result, settings, batch, wanted))
        except Exception as exc:  # noqa: BLE001 - a row whose outputs cannot be encoded fails alone
            self._fail([row], "encode", exc)
            return
        self.stats.ok(1)

    def _fail(self, rows: list[dict[str, Any]], kind: str, exc: BaseException) -> None:
        message = one_line(exc)
        for row in rows:
            row.clear()
            row["error"] = message if isinstance(exc, DiffimlError) else f"{kind} failed: {message}"
        self.stats.failed(kind, len(rows))

    def _decode(self, data: Any) -> DecodedImage:
        return load_image(data if isinstance(data, bytes) else bytes(data), self.bundle.image_size)

    def _encode(self, result: LocalizationResult, s: Settings, batch: int, wanted: list[str] | None
                ) -> dict[str, Any]:
        """The row's outputs; of the costly ones, only those the request names (all when it names none)."""
        asked = set(wanted) if wanted else set(OUTPUT_NAMES)
        row: dict[str, Any] = {"score": result.score, "manipulated_fraction": result.manipulated_fraction,
                               "info_json": json.dumps({"height": result.height, "width": result.width,
                                                        "timings_ms": {k: round(v, 3) for k, v in
                                                                       result.timings_ms.items()},
                                                        "batch_images": batch, "backend": self.backend.name,
                                                        "members": result.members, "seed": s.seed,
                                                        "decision": result.decision,
                                                        "copy_move_cue": result.model_copy_move is not None,
                                                        "regions_shown": result.regions_shown,
                                                        "bundle_sha256": self.bundle_sha256,
                                                        "bundle_id": self.bundle_id,
                                                        "opencv": cv2.__version__})}
        if "probability_png" in asked:
            row["probability_png"] = _png16(result.probability16())
        unc16 = result.uncertainty16() if "uncertainty_png" in asked else None
        if unc16 is not None:
            row["uncertainty_png"] = _png16(unc16)
        if s.raw:
            row["raw_probability"] = result.model_probability
            row["raw_uncertainty"] = result.model_uncertainty
        return row

    def _stack(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Rows of one request -> its output arrays (batch first). Failed rows: NaN scores, empty bytes, NaN maps.
        The raw maps are returned only when asked for (PyTriton cannot send an empty tensor)."""

        def text(key: str) -> np.ndarray:
            values = [r.get(key, b"") for r in rows]
            return np.array([v if isinstance(v, bytes) else str(v).encode() for v in values], dtype=object)[:, None]

        def number(key: str) -> np.ndarray:
            return np.array([r.get(key, np.nan) for r in rows], np.float32)[:, None]

        out = {"score": number("score"), "manipulated_fraction": number("manipulated_fraction"),
               "probability_png": text("probability_png"), "uncertainty_png": text("uncertainty_png"),
               "info_json": text("info_json"), "error": text("error")}
        size = self.bundle.image_size
        for key in ("raw_probability", "raw_uncertainty"):
            if any(r.get(key) is not None for r in rows):
                blank = np.full((size, size), np.nan, np.float32)
                out[key] = np.stack([r[key] if r.get(key) is not None else blank for r in rows]).astype(np.float32)
        return out


def _warm_up(model: InstanceModel) -> None:
    """One request through every engine before the model is declared ready, so the first user does not pay for
    session start-up, memory-pattern planning or CUDA graph capture."""
    ok, png = cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))

    class _Request:
        data = {"image": np.array([[png.tobytes()]], dtype=object)}
        parameters: dict[str, Any] = {}

        def __getitem__(self, key: str) -> np.ndarray:
            return self.data[key]

    error = model([_Request()])[0]["error"][0, 0]
    if error:
        raise DiffimlError(f"warm-up failed: {error.decode()}")


@dataclass(frozen=True)
class ServeOptions:
    bundle: Path
    backend: str = "auto"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_queue_delay_ms: float = 2.0
    instances: int = 1
    threads: int | None = None  # intra-op threads per instance; default: the cores shared among the instances
    exit_timeout_s: int = 30
    precision: str = "fp32"
    queue_timeout_s: float = 60.0  # a request still queued after this is rejected (a client may ask for less)
    max_queue: int = 256  # requests queued beyond this are rejected at once, not held
    stats_port: int | None = 8003  # our own /metrics (rows served and failed, bundle sha256s); None: off
    copy_move: bool = True  # the bundle's copy-move cue, if it has one (CPU, per image, in the instance's thread)
    follow_decision: bool = False  # masks show every region, also of images the detector judges authentic


def open_instances(options: ServeOptions) -> list[InstanceModel]:
    """Verify the bundle (sha256 of every graph), open one backend per instance and warm each up. Raises
    BundleError / BackendUnavailableError before any server starts."""
    bundle = load_bundle(options.bundle)
    threads = options.threads or max(1, (os.cpu_count() or 1) // options.instances)
    # The serving process decodes, encodes and moves requests beside inference, on the same cores: onnxruntime's
    # threads sleep instead of spinning between operators (measured: benchmarks/RESULTS.md, serving).
    os.environ.setdefault("DIFFIML_ORT_SPINNING", "0")
    stats = ServeStats(bundle.sha256s)
    # Instances go round-robin over the GPUs this process sees (one GPU, or none: all on device 0 / the CPU).
    gpus = max(1, device_count()) if options.backend != "ort-cpu" else 1
    models = [InstanceModel(bundle, open_backend(bundle, options.backend, threads, options.precision, i % gpus),
                            stats, options.copy_move, options.follow_decision) for i in range(options.instances)]
    if gpus > 1:
        log.info("%d instances over %d GPUs", options.instances, gpus)
    for model in models:
        _warm_up(model)
    stats.reset()
    return models


def _interface() -> tuple[list[Any], list[Any]]:
    from pytriton.model_config import Tensor

    inputs = [Tensor(name="image", dtype=bytes, shape=(1,))]
    outputs = [Tensor(name="score", dtype=np.float32, shape=(1,)),
               Tensor(name="manipulated_fraction", dtype=np.float32, shape=(1,)),
               Tensor(name="probability_png", dtype=bytes, shape=(1,)),
               Tensor(name="uncertainty_png", dtype=bytes, shape=(1,)),
               Tensor(name="raw_probability", dtype=np.float32, shape=(-1, -1)),
               Tensor(name="raw_uncertainty", dtype=np.float32, shape=(-1, -1)),
               Tensor(name="info_json", dtype=bytes, shape=(1,)),
               Tensor(name="error", dtype=bytes, shape=(1,))]
    return inputs, outputs


def _stop_on_sigterm() -> None:
    """PyTriton stops cleanly on SIGINT only (KeyboardInterrupt): make SIGTERM (docker stop, systemd, Kubernetes)
    take the same path, so in-flight requests finish (Triton's exit timeout) and no process or workspace is left."""

    def handler(signum: int, frame: Any) -> None:
        # Once: a second signal during the drain would abort it and kill the process under running inferences.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve(options: ServeOptions) -> None:
    """Run Triton with the DiffIML model until SIGINT/SIGTERM. Ready (``/v2/models/diffiml/ready``) only after the
    bundle is verified and every instance has run one warm-up request."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, TimeoutAction
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise DiffimlError("serving needs PyTriton: run `make serve-env` and use .venv-serve/bin/diffiml") from None
    models = open_instances(options)
    # Triton's Python-backend stub links libpython dynamically; point it at this interpreter's own library, not a
    # system one of another patch release.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    config = TritonConfig(http_address=options.host, http_port=options.http_port, grpc_address=options.host,
                          grpc_port=options.grpc_port, metrics_port=options.metrics_port,
                          exit_timeout_secs=options.exit_timeout_s, strict_readiness=True)
    batching = options.max_batch > 1
    # A full or slow queue rejects (the client gets an error and may retry elsewhere) rather than holding requests
    # without bound; a client may ask for a shorter timeout than the default.
    policy = QueuePolicy(timeout_action=TimeoutAction.REJECT,
                         default_timeout_microseconds=int(options.queue_timeout_s * 1e6),
                         allow_timeout_override=True, max_queue_size=options.max_queue)
    model_config = ModelConfig(batching=True, max_batch_size=max(1, options.max_batch),
                               batcher=DynamicBatcher(max_queue_delay_microseconds=int(options.max_queue_delay_ms
                                                                                        * 1000) if batching else 0,
                                                      default_queue_policy=policy))
    stats_server = (start_stats_server(models[0].stats, options.host, options.stats_port)
                    if options.stats_port else None)
    inputs, outputs = _interface()
    _stop_on_sigterm()
    with Triton(config=config) as triton:
        triton.bind(model_name=MODEL_NAME, infer_func=[m.__call__ for m in models], inputs=inputs, outputs=outputs,
                    config=model_config, strict=False)
        log.info("serving %s (%s, %d instance(s), max batch %d, queue delay %.1f ms) on http://%s:%d grpc %s:%d",
                 options.bundle, models[0].backend.name, len(models), options.max_batch, options.max_queue_delay_ms,
                 options.host, options.http_port, options.host, options.grpc_port)
        try:
            triton.serve()
        except KeyboardInterrupt:
            log.info("stopping: finishing in-flight requests")
        finally:
            for model in models:  # after Triton drained: the backends' device resources go with the server
                model.backend.close()
            if stats_server is not None:
                stats_server.shutdown()
