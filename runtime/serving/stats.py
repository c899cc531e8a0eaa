"""What operators see of ``diffiml serve`` beyond Triton's own metrics: rows served and failed (by kind) and the
bundle's identity, in Prometheus' text format on a port of our own (PyTriton's callables cannot add metrics to
Triton's metrics port). A failed row answers with its error and never fails its batch, so Triton counts it a
success: these counters are where failures show."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAILURE_KINDS = ("parameters", "decode", "inference", "encode", "internal")


class ServeStats:
    def __init__(self, bundle_sha256: dict[str, str]) -> None:
        self.bundle_sha256 = dict(bundle_sha256)
        self._lock = threading.Lock()
        self.rows_ok = 0
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)

    def reset(self) -> None:
        """Back to zero (after the warm-up requests, which are not traffic)."""
        with self._lock:
            self.rows_ok = 0
            self.failures = dict.fromkeys(FAILURE_KINDS, 0)

    def ok(self, n: int = 1) -> None:
        with self._lock:
            self.rows_ok += n

    def failed(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.failures[kind] += n

    def prometheus(self) -> str:
        with self._lock:
            lines = ["# HELP diffiml_rows_total Images answered, by outcome.", "# TYPE diffiml_rows_total counter",
                     f'diffiml_rows_total{{outcome="ok"}} {self.rows_ok}',
                     f'diffiml_rows_total{{outcome="failed"}} {sum(self.failures.values())}',
                     "# HELP diffiml_row_failures_total Images answered with an error, by kind.",
                     "# TYPE diffiml_row_failures_total counter"]
            lines += [f'diffiml_row_failures_total{{kind="{k}"}} {v}' for k, v in self.failures.items()]
        lines += ["# HELP diffiml_bundle_info The served bundle's graphs and their sha256.",
                  "# TYPE diffiml_bundle_info gauge"]
        lines += [f'diffiml_bundle_info{{graph="{g}",sha256="{s}"}} 1' for g, s in sorted(self.bundle_sha256.items())]
        return "\n".join(lines) + "\n"


def start_stats_server(stats: ServeStats, host: str, port: int) -> ThreadingHTTPServer:
    """``GET /metrics`` on ``host:port`` in a daemon thread; ``shutdown()`` the returned server to stop it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = stats.prometheus().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # requests are not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="diffiml-stats", daemon=True).start()
    return server
