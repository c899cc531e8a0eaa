"""The two stages of a scan that run in Ray workers (plain functions and classes: Ray is never imported here).

``read_batch`` (Ray tasks): an input's bytes and their sha256, or why they could not be read; an input whose bytes
match the sha256 of its final row from an earlier run is passed on as ``skip`` without its bytes.
``ScanWorker`` (a Ray actor): opens the bundle once and keeps it; decodes, localizes and writes each image's maps
(each PNG written to a temporary name and renamed), and returns one table row per input. A bad input is a row with
its error, never an exception, so one file cannot fail the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from diffiml.runtime.image_io import MAX_BYTES
from diffiml.runtime.scan_inputs import map_stem, open_filesystem
from diffiml.runtime.scan_table import SCHEMA

READ_SCHEMA = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("data", pa.large_binary()),
                         ("read_ms", pa.float64()), ("error", pa.string()), ("error_kind", pa.string()),
                         ("skip", pa.bool_())])
OUT_SCHEMA = SCHEMA.append(pa.field("skip", pa.bool_()))
_BLOCK = 1 << 20


def _read_one(source: str, done_sha256: str | None) -> dict[str, Any]:
    """Bytes + sha256; a file over ``MAX_BYTES`` is hashed in blocks but not kept (its row refuses it)."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"path": source, "sha256": None, "data": None, "error": None, "error_kind": None,
                           "skip": False}
    try:
        import pyarrow.fs as pafs

        fs, path = open_filesystem(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise OSError("no such file")
        if info.type != pafs.FileType.File:
            raise OSError("not a file")
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as f:
            if info.size is not None and info.size > MAX_BYTES:
                for block in iter(lambda: f.read(_BLOCK), b""):
                    digest.update(block)
                row.update(error=f"{source}: file larger than {MAX_BYTES >> 20} MiB", error_kind="input")
            else:
                row["data"] = f.read()
                digest.update(row["data"])
        row["sha256"] = digest.hexdigest()
    except (OSError, pa.ArrowException, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        row.update(data=None, error=f"{source}: cannot read ({reason})", error_kind="read")
    if row["sha256"] is not None and row["sha256"] == done_sha256:
        row.update(data=None, skip=True, error=None, error_kind=None)
    row["read_ms"] = (time.perf_counter() - t0) * 1000
    return row


def read_batch(batch: pa.Table) -> pa.Table:
    """(path, done_sha256) -> READ_SCHEMA: one row per input, in order."""
    rows = [_read_one(p, d) for p, d in zip(batch.column("path").to_pylist(),
                                            batch.column("done_sha256").to_pylist(), strict=True)]
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


class ScanWorker:
    """One Localizer per actor, opened once. ``settings``: bundle, backend, precision, steps, ensemble_spec (as
    ``--ensemble`` gave it), seed, tta, uncertainty, copy_move_cue, threads, bundle_sha256s (what the driver
    verified: a node with another bundle refuses to start), run_id; ``maps_dir``: where the PNGs go (the same
    shared folder on every node of a cluster)."""

    def __init__(self, settings: dict[str, Any], maps_dir: str) -> None:
        import cv2

        from diffiml.runtime.errors import BundleError
        from diffiml.runtime.localizer import Localizer

        threads = int(settings["threads"])
        # onnxruntime's threads sleep between parallel sections instead of spinning: beside Ray's own processes
        # (reads, the driver's executor) spinning threads steal each other's cycles (one actor on 2 cores: UNet steps
        # 742 -> 656 ms per image). DIFFIML_ORT_SPINNING=1 in the environment keeps spinning.
        os.environ.setdefault("DIFFIML_ORT_SPINNING", "0")
        cv2.setNumThreads(threads)  # OpenCV's resizes and PNG encoding stay within the actor's share of cores
        self.settings, self.maps_dir = settings, Path(maps_dir)
        self.localizer = Localizer.open(settings["bundle"], backend=settings["backend"], steps=settings["steps"],
                                        ensemble=settings["ensemble_spec"], tta=settings["tta"],
                                        seed=settings["seed"], uncertainty=settings["uncertainty"], threads=threads,
                                        precision=settings["precision"], copy_move=settings["copy_move_cue"],
                                        follow_decision=settings.get("follow_decision", False))
        if self.localizer.bundle.sha256s != settings["bundle_sha256s"]:
            raise BundleError(f"{settings['bundle']}: this node's bundle differs from the driver's")
        self._fixed = {"backend": self.localizer.backend, "bundle_sha256s": json.dumps(settings["bundle_sha256s"]),
                       "steps": self.localizer.steps, "ensemble": self.localizer.ensemble, "seed": settings["seed"],
                       "run_id": settings["run_id"]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._row(r) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)

    def _row(self, read: dict[str, Any]) -> dict[str, Any]:
        row = {**self._fixed, "path": read["path"], "sha256": read["sha256"], "error": read["error"],
               "error_kind": read["error_kind"], "skip": read["skip"], "outputs": "{}"}
        timings = {"read": read["read_ms"]}
        if not read["skip"] and read["error"] is None:
            row.update(self._localize(read["path"], read["data"], timings))
        row["timings_ms"] = json.dumps({k: round(v, 2) for k, v in timings.items()})
        row["scanned_at"] = datetime.now(timezone.utc)
        return row

    def _localize(self, source: str, data: bytes, timings: dict[str, float]) -> dict[str, Any]:
        """Decode, localize, write the maps; the row's fields, or its error (``input``: the bytes; ``run``: else)."""
        from diffiml.runtime.errors import ImageDecodeError
        from diffiml.runtime.image_io import load_image
        from diffiml.runtime.outputs import write_outputs

        t0 = time.perf_counter()
        try:
            decoded = load_image(data, self.localizer.bundle.image_size)
        except ImageDecodeError as exc:
            return {"error": str(exc).replace("<bytes>", source), "error_kind": "input"}
        except (ValueError, MemoryError, OSError) as exc:
            return {"error": f"{source}: cannot decode ({type(exc).__name__}: {exc})", "error_kind": "run"}
        timings["decode"] = (time.perf_counter() - t0) * 1000
        try:
            result = self.localizer.localize(decoded)
            timings.update({k: v for k, v in result.timings_ms.items() if k != "decode"})
            t1 = time.perf_counter()
            files = write_outputs(result, decoded.rgb, self.maps_dir, map_stem(source))
            timings["write"] = (time.perf_counter() - t1) * 1000
        except Exception as exc:  # noqa: BLE001 - a row with the reason, never a failed job
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return {"error": f"{source}: {type(exc).__name__}: {message}", "error_kind": "run"}
        return {"width": result.width, "height": result.height, "score": result.score, "decision": result.decision,
                "manipulated_fraction": result.manipulated_fraction, "members": result.members,
                "copy_move_fraction": result.copy_move_fraction,
                "outputs": json.dumps({k: f"{self.maps_dir.name}/{Path(v).name}" for k, v in files.items()})}
