"""`/metrics` (Prometheus text format) and `/healthz` on one port, for the edge and the hub alike."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class StatusServer:
    """Serves `registry` on /metrics and `health()` on /healthz (200 when healthy, 503 otherwise)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Callable[[], tuple[bool, dict]]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path.split("?")[0] == "/healthz":
                    ok, detail = health()
                    body, ctype, code = (
                        json.dumps({"ok": ok, **detail}).encode(),
                        "application/json",
                        200 if ok else 503,
                    )
                else:
                    body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http: " + fmt, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="status-http", daemon=True)

    def start(self) -> StatusServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()


def run_service(service, settings, logger: logging.Logger) -> int:
    """Serve `/metrics` + `/healthz` (when `settings.metrics_port` is set) and `service.run()` until SIGTERM/Ctrl-C."""
    import signal

    http = None
    if settings.metrics_port is not None:
        http = StatusServer(
            settings.metrics_host, settings.metrics_port, service.metrics.registry, service.health
        ).start()
        logger.info("metrics on http://%s:%d/metrics", settings.metrics_host, http.port)
    signal.signal(signal.SIGTERM, lambda *_: service.stop_event.set())
    try:
        service.run()
    except KeyboardInterrupt:
        service.stop_event.set()
    finally:
        if http is not None:
            http.stop()
    return 0
