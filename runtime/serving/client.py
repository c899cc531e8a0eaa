"""The client of ``diffiml serve``: one image's bytes in, a ``LocalizationResult`` out, over Triton's HTTP or gRPC
protocol (``tritonclient``). ``diffiml localize --server URL`` writes the same files and JSON lines with it as a
local run, because it rebuilds the result from the model-size maps the server returns (``raw``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffiml.runtime.errors import BackendUnavailableError, DiffimlError, one_line
from diffiml.runtime.localizer import LocalizationResult

MODEL_NAME = "diffiml"  # the Triton model name; defined here, where both the server and the PyTriton-free client see it


class ServerError(DiffimlError):
    """The server could not be reached, or refused or failed the request (the message says which)."""


@dataclass
class ServerResult:
    """A server's answer for one image: the result the local runtime would give, and what the server reports."""

    result: LocalizationResult
    info: dict[str, Any] = field(default_factory=dict)


def _split_url(url: str) -> tuple[str, str]:
    """'grpc://host:8001' -> ('grpc', 'host:8001'); 'http://host:8000' or 'host:8000' -> ('http', ...)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "http", url
    if scheme not in ("http", "grpc"):
        raise ServerError(f"{url}: use http://HOST:PORT or grpc://HOST:PORT")
    return scheme, rest.rstrip("/")


class TritonLocalizer:
    """Sends images to a ``diffiml serve`` endpoint. One instance per thread (tritonclient clients are not shared)."""

    def __init__(self, url: str, steps: int | None = None, ensemble: int | None = None, seed: int = 0,
                 uncertainty: bool = False, timeout_s: float = 300.0) -> None:
        self.url = url
        self.protocol, address = _split_url(url)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as client_module
            else:
                import tritonclient.http as client_module
        except ImportError:
            raise BackendUnavailableError("--server needs tritonclient: run `make serve-env` and use "
                                          ".venv-serve/bin/diffiml") from None
        self._module: Any = client_module
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if self.protocol == "http" else {}
        self._client = client_module.InferenceServerClient(url=address, **kwargs)
        self._timeout_s = timeout_s
        self.parameters: dict[str, Any] = {"seed": seed, "uncertainty": uncertainty, "raw": True}
        if steps is not None:
            self.parameters["steps"] = steps
        if ensemble is not None:
            self.parameters["ensemble"] = ensemble

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(MODEL_NAME))
        except Exception:  # connection refused, reset, timeout: not ready  # noqa: BLE001
            return False

    def localize_bytes(self, data: bytes) -> ServerResult:
        """One encoded image; ServerError with the server's one-line reason when the image (or request) failed."""
        m = self._module
        image = m.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=object))
        names = ["score", "manipulated_fraction", "raw_probability", "info_json", "error"]
        if self.parameters["uncertainty"]:
            names.append("raw_uncertainty")
        outputs = [m.InferRequestedOutput(n) for n in names]
        parameters = self.parameters
        try:
            if self.protocol == "grpc":
                response = self._client.infer(MODEL_NAME, [image], outputs=outputs, parameters=parameters,
                                              client_timeout=self._timeout_s)
            else:
                response = self._client.infer(MODEL_NAME, [image], outputs=outputs, parameters=parameters)
        except Exception as exc:  # tritonclient raises its own exception types, and socket errors  # noqa: BLE001
            text = one_line(exc)
            raise ServerError(f"{self.url}: {text}") from None
        error = response.as_numpy("error").reshape(-1)[0]
        if error:
            raise ServerError(error.decode() if isinstance(error, bytes) else str(error))
        info = json.loads(response.as_numpy("info_json").reshape(-1)[0])
        prob = response.as_numpy("raw_probability")[0]
        unc = response.as_numpy("raw_uncertainty")[0] if self.parameters["uncertainty"] else None
        result = LocalizationResult(
            model_probability=np.ascontiguousarray(prob),
            model_uncertainty=None if unc is None else np.ascontiguousarray(unc),
            height=int(info["height"]), width=int(info["width"]),
            score=float(response.as_numpy("score").reshape(-1)[0]), timings_ms=dict(info.get("timings_ms", {})),
            members=int(info.get("members", 0)), decision=info.get("decision"),
            regions_shown=bool(info.get("regions_shown", True)))
        return ServerResult(result, info)

    def close(self) -> None:
        self._client.close()
