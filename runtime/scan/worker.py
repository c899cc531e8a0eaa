"""The two stages of a scan that run in Ray workers (plain functions and classes: Ray is never imported here).

``read_batch`` (Ray tasks): an input's bytes, size, mtime and sha256, or why they could not be read; an input whose
bytes match the sha256 of its final row from an earlier run is passed on as ``skip`` without its bytes.
``ScanWorker`` (a Ray actor): opens the bundle once and keeps it; decodes, localizes and writes each image's maps
(each PNG written to a temporary name and renamed), and returns one table row per input. A bad input is a row with
its error, never an exception, so one file cannot fail the job; and an input that kills its worker outright (a
crash in a native library) is tried at most ``MAX_ATTEMPTS`` times: each try is noted in ``DIR/.attempts`` before it
starts, so the actor Ray restarts in its place finds the count and writes the input's row with that error instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from diffiml.runtime.errors import one_line
from diffiml.runtime.image_io import MAX_BYTES
from diffiml.runtime.scan.inputs import is_uri, map_stem, open_filesystem, source_of
from diffiml.runtime.scan.table import SCHEMA, display_path

READ_SCHEMA = pa.schema([("path", pa.string()), ("path_bytes", pa.binary()), ("sha256", pa.string()),
                         ("size", pa.int64()), ("mtime_ns", pa.int64()), ("data", pa.large_binary()),
                         ("read_ms", pa.float64()), ("error", pa.string()), ("error_kind", pa.string()),
                         ("skip", pa.bool_())])
OUT_SCHEMA = SCHEMA.append(pa.field("skip", pa.bool_()))
ATTEMPTS_DIR = ".attempts"
MAX_ATTEMPTS = 3  # tries of one input that end its worker process, before its row says so and it is left alone
# Fault injection for the tests of the rule above: a worker exits at once on an input whose path contains this.
FAULT_ENV = "DIFFIML_SCAN_FAULT_EXIT_ON"
_BLOCK = 1 << 20


def _open_input(source: str) -> tuple[Any, int | None, int | None]:
    """(readable stream, size, mtime_ns). Local files through Python (a name need not be UTF-8, which pyarrow's
    local file system requires); URIs through pyarrow's file systems."""
    if not is_uri(source):
        st = os.stat(source)
        if not os.path.isfile(source):
            raise OSError("not a file")
        return open(source, "rb"), st.st_size, st.st_mtime_ns  # noqa: SIM115 - closed by the caller's with
    import pyarrow.fs as pafs

    fs, path = open_filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise OSError("no such file")
    if info.type != pafs.FileType.File:
        raise OSError("not a file")
    return fs.open_input_stream(path), info.size, None


def _read_one(key: bytes, done_sha256: str | None) -> dict[str, Any]:
    """Bytes + sha256; a file over ``MAX_BYTES`` is hashed in blocks but not kept (its row refuses it)."""
    t0 = time.perf_counter()
    source, shown = source_of(key), display_path(key)
    row: dict[str, Any] = {"path": shown, "path_bytes": key, "sha256": None, "size": None, "mtime_ns": None,
                           "data": None, "error": None, "error_kind": None, "skip": False}
    try:
        stream, size, mtime_ns = _open_input(source)
        row.update(size=size, mtime_ns=mtime_ns)
        digest = hashlib.sha256()
        with stream as f:
            if size is not None and size > MAX_BYTES:
                for block in iter(lambda: f.read(_BLOCK), b""):
                    digest.update(block)
                row.update(error=f"{shown}: file larger than {MAX_BYTES >> 20} MiB", error_kind="input")
            else:
                row["data"] = f.read()
                digest.update(row["data"])
        row["sha256"] = digest.hexdigest()
    except FileNotFoundError:
        row.update(data=None, error=f"{shown}: cannot read (no such file)", error_kind="read")
    except (OSError, pa.ArrowException, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        row.update(data=None, error=f"{shown}: cannot read ({reason})", error_kind="read")
    if row["sha256"] is not None and row["sha256"] == done_sha256:
        row.update(data=None, skip=True, error=None, error_kind=None)
    row["read_ms"] = (time.perf_counter() - t0) * 1000
    return row


def read_batch(batch: pa.Table) -> pa.Table:
    """(path_bytes, done_sha256) -> READ_SCHEMA: one row per input, in order."""
    rows = [_read_one(k, d) for k, d in zip(batch.column("path_bytes").to_pylist(),
                                            batch.column("done_sha256").to_pylist(), strict=True)]
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


class ScanWorker:
    """One Localizer per actor, opened once. ``settings``: bundle, backend, precision, steps, ensemble_spec (as
    ``--ensemble`` gave it), seed, tta, uncertainty, copy_move_cue, threads, bundle_sha256s (what the driver
    verified: a node with another bundle refuses to start), run_id; ``maps_dir``: where the PNGs go (the same
    shared folder on every node of a cluster), in the scan's folder."""

    def __init__(self, settings: dict[str, Any], maps_dir: str) -> None:
        import cv2

        from diffiml.runtime.errors import BundleError
        from diffiml.runtime.localizer import AdaptiveEnsemble, Localizer

        threads = int(settings["threads"])
        # onnxruntime's threads sleep between parallel sections instead of spinning: beside Ray's own processes
        # (reads, the driver's executor) spinning threads steal each other's cycles (one actor on 2 cores: UNet steps
        # 742 -> 656 ms per image). DIFFIML_ORT_SPINNING=1 in the environment keeps spinning.
        os.environ.setdefault("DIFFIML_ORT_SPINNING", "0")
        cv2.setNumThreads(threads)  # OpenCV's resizes and PNG encoding stay within the actor's share of cores
        self.settings, self.maps_dir = settings, Path(maps_dir)
        self.attempts_dir = self.maps_dir.parent / ATTEMPTS_DIR
        self.attempts_dir.mkdir(parents=True, exist_ok=True)
        self._fault = os.environ.get(FAULT_ENV) or None
        self.localizer = Localizer.open(settings["bundle"], backend=settings["backend"], steps=settings["steps"],
                                        ensemble=settings["ensemble_spec"], tta=settings["tta"],
                                        seed=settings["seed"], uncertainty=settings["uncertainty"], threads=threads,
                                        precision=settings["precision"], copy_move=settings["copy_move_cue"],
                                        follow_decision=settings.get("follow_decision", False),
                                        adaptive=None if settings.get("adaptive") is None else
                                        AdaptiveEnsemble(tolerance=float(settings["adaptive"])))
        if self.localizer.bundle.sha256s != settings["bundle_sha256s"]:
            raise BundleError(f"{settings['bundle']}: this node's bundle differs from the driver's")
        self._fixed = {"backend": self.localizer.backend, "bundle_sha256s": json.dumps(settings["bundle_sha256s"]),
                       "bundle_id": self.localizer.bundle.bundle_id,
                       "steps": self.localizer.steps, "ensemble": self.localizer.ensemble, "seed": settings["seed"],
                       "run_id": settings["run_id"]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._row(r) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)

    def _row(self, read: dict[str, Any]) -> dict[str, Any]:
        row = {**self._fixed, **{k: read[k] for k in ("path", "path_bytes", "sha256", "size", "mtime_ns", "error",
                                                       "error_kind", "skip")}, "outputs": "{}"}
        timings = {"read": read["read_ms"]}
        if not read["skip"] and read["error"] is None:
            row.update(self._attempt(read["path_bytes"], read["path"], read["data"], timings))
        row["timings_ms"] = json.dumps({k: round(v, 2) for k, v in timings.items()})
        row["scanned_at"] = datetime.now(timezone.utc)
        return row

    def _attempt(self, key: bytes, shown: str, data: bytes, timings: dict[str, float]) -> dict[str, Any]:
        """``_localize``, counted in ``DIR/.attempts`` while it runs: a count left there by a try that ended its
        process, once it reaches ``MAX_ATTEMPTS``, makes the row an error instead of another try."""
        note = self.attempts_dir / hashlib.sha256(key).hexdigest()[:24]
        tries = int(note.read_text() or 0) if note.is_file() else 0
        if tries >= MAX_ATTEMPTS:
            note.unlink(missing_ok=True)
            return {"error": f"{shown}: ended its worker process {tries} times (a crash in a native library or the "
                             "memory limit); not tried again for these bytes", "error_kind": "input"}
        note.write_text(str(tries + 1))
        if self._fault is not None and self._fault in shown:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel ends a process that ran out of memory
        fields = self._localize(key, shown, data, timings)
        note.unlink(missing_ok=True)
        return fields

    def _localize(self, key: bytes, source: str, data: bytes, timings: dict[str, float]) -> dict[str, Any]:
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
            shard, stem = map_stem(source_of(key))
            files = write_outputs(result, decoded.rgb, self.maps_dir / shard, stem)
            timings["write"] = (time.perf_counter() - t1) * 1000
        except Exception as exc:  # noqa: BLE001 - a row with the reason, never a failed job
            message = one_line(exc) if str(exc).strip() else ""
            return {"error": f"{source}: {type(exc).__name__}: {message}", "error_kind": "run"}
        return {"width": result.width, "height": result.height, "score": result.score, "decision": result.decision,
                "manipulated_fraction": result.manipulated_fraction, "members": result.members,
                "copy_move_fraction": result.copy_move_fraction,
                "outputs": json.dumps({k: f"{self.maps_dir.name}/{shard}/{Path(v).name}" for k, v in files.items()})}
