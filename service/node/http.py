"""The node's HTTP endpoints on their own port: ``/metrics``, ``/healthz``, ``/readyz``.

``/healthz`` answers 200 while the process serves HTTP at all (liveness). ``/readyz`` answers 200
only when the node can take studies: the model is loaded and the spool is writable; otherwise
503 with the reason (readiness). ``/metrics`` is the Prometheus text format of the node's registry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: ``(ready, reason)``: reason says what is missing when not ready.
ReadinessCheck = Callable[[], tuple[bool, str]]


class HealthServer:
    """A small threaded HTTP server; dependencies passed in, nothing global."""

    def __init__(self, registry: CollectorRegistry, readiness: ReadinessCheck, *, bind: str, port: int) -> None:
        handler = _handler_class(registry, readiness)
        self._server = ThreadingHTTPServer((bind, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="pacs-xai-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_class(registry: CollectorRegistry, readiness: ReadinessCheck) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._answer(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ready, reason = readiness()
                self._answer(200 if ready else 503, (reason + "\n").encode(), "text/plain")
            else:
                self._answer(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the http.server API)
            log.debug("http: " + format, *args)

    return Handler
