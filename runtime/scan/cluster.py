"""Where a scan runs: joining a Ray cluster (or starting a local Ray) and spreading the work over it.

Ray is imported only inside these functions; the defaults come from ``ray.cluster_resources()``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from diffiml.runtime.errors import DiffimlError, one_line

log = logging.getLogger(__name__)
READ_CPUS = 0.25  # a read task is I/O and hashing; a fraction of a CPU keeps the actors from starving the reads
DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Layout:
    """How the work spreads over the cluster: ``actors`` Localizers, each with ``threads`` onnxruntime threads,
    reserving ``actor_cpus`` (fractional: whole CPUs for every actor leave none to the reads and deadlock a small
    machine) and ``actor_gpus``; ``batch_size`` images per actor call and per table part."""

    actors: int
    threads: int
    actor_cpus: float
    actor_gpus: float
    batch_size: int


def choose_layout(resources: dict[str, float], backend: str = "auto", actors: int | None = None,
                  threads: int | None = None, batch_size: int | None = None, inputs: int | None = None) -> Layout:
    """Defaults from ``ray.cluster_resources()``: one actor per GPU where there are GPUs (and the backend may use
    them), else one single-threaded actor per CPU (on 2 cores, 2 actors x 1 thread localized 1.4x the images
    per second of 1 x 2 and spent about a quarter less CPU per image: ``diffiml bench scan``); overrides win.
    Actors share what the reads leave. The default batch shrinks for few ``inputs`` so every actor gets at least two
    batches."""
    check_counts(actors, threads, batch_size)
    cpus = max(float(resources.get("CPU", 1.0)), 1.0)
    gpus = int(resources.get("GPU", 0)) if backend != "ort-cpu" else 0
    reserve = max(2 * READ_CPUS, 0.05 * cpus)
    if gpus:
        actors = actors or gpus
        threads = threads or max(1, min(4, int((cpus - reserve) // actors)))
    else:
        threads = threads or 1
        actors = actors or max(1, round(cpus / threads))
    actor_cpus = round(max(0.05, min(float(threads), (cpus - reserve) / actors)), 3)
    actor_gpus = min(1.0, gpus / actors) if gpus else 0.0
    if batch_size is None:
        batch_size = min(DEFAULT_BATCH, max(1, -(-(inputs or DEFAULT_BATCH * 2 * actors) // (2 * actors))))
    return Layout(actors, threads, actor_cpus, actor_gpus, batch_size)


def check_counts(actors: int | None, threads: int | None, batch_size: int | None) -> None:
    for name, value in (("--actors", actors), ("--threads-per-actor", threads), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise DiffimlError(f"{name} must be >= 1, got {value}")


def connect(address: str | None) -> bool:
    """Join ``address`` (or $RAY_ADDRESS), or start a local Ray for this process; True when this call connected
    (and so must disconnect). A cluster that cannot be reached is one line."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if not log.isEnabledFor(logging.DEBUG):  # -v shows Ray's notices (token mode, ...); else our bar and summary
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if address:
        _probe(address)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(include_dashboard=False, **quiet)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, its own
        reason = one_line(exc)
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = ""
        if address and not os.environ.get("RAY_AUTH_MODE"):
            hint = ("; a cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token and its token "
                    "in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        raise DiffimlError(f"cannot start or reach {where} ({reason}){hint}") from None
    return True


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Ray retries an unreachable head without end: try its port first, so a wrong --address is one line."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not port.isdigit():
        return  # "auto" (the cluster of this machine) and forms Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise DiffimlError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); is `ray start "
                           "--head` running there, and is the port open?") from None
