"""The image's HEALTHCHECK: exit 0 when rwkvd answers ready, 1 otherwise (stdlib and grpc only, no rwkvd imports).

Reads the server's own settings from the same RWKVD_* variables: HTTP GET /health/ready on RWKVD_HTTP_PORT
(https when RWKVD_TLS_CERT is set; the certificate is not checked, the peer is this container); with
RWKVD_HTTP_PORT=-1, the gRPC health check of "rwkvd" on RWKVD_GRPC_PORT (plaintext only).
Kubernetes ignores HEALTHCHECK and uses the Deployment's probes; this serves docker and compose.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from typing import Any

TIMEOUT_SECONDS = 4.0


def http_ready(port: int, tls: bool) -> bool:
    scheme = "https" if tls else "http"
    context = None
    if tls:  # the peer is this container over loopback: its certificate names the service, not 127.0.0.1
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{port}/health/ready", timeout=TIMEOUT_SECONDS, context=context
        ) as reply:
            return bool(reply.status == 200)
    except OSError as exc:  # URLError and HTTPError (503 while loading or draining) are OSErrors
        print(f"not ready: {exc}", file=sys.stderr)
        return False


def grpc_ready(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # The stubs package types HealthStub for aio channels only; this is a sync one.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service="rwkvd"), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            print(f"not ready: {exc}", file=sys.stderr)
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> int:
    http_port = int(os.environ.get("RWKVD_HTTP_PORT", "8000"))
    if http_port >= 0:
        ready = http_ready(http_port, tls=bool(os.environ.get("RWKVD_TLS_CERT")))
    else:
        ready = grpc_ready(int(os.environ.get("RWKVD_GRPC_PORT", "50051")))
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
