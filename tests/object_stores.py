"""Real object-store servers on this machine, for pytest fixtures (see conftest.py).

- S3: moto's server mode (`moto[server]`, `ThreadedMotoServer`), an S3 API on
  a free local port; ft and TensorStore reach it through `AWS_ENDPOINT_URL`
  and the `AWS_*` credential variables, as they would any S3-compatible server.
- GCS: `gcp-storage-emulator`, the GCS JSON API on a free local port; gcsfs
  reaches it through `STORAGE_EMULATOR_HOST`, TensorStore through
  `TENSORSTORE_GCS_HTTP_URL` with `GOOGLE_AUTH_TOKEN_FOR_TESTING`.

Each server runs in a thread of the test process (subprocesses reach it over
HTTP) and is stopped when its fixture ends. Only the usual variables are
set: ft has no settings of its own for endpoints or credentials.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import portpicker

BUCKET = "ft-test"


@dataclass(frozen=True)
class ObjectStore:
    """A running server: its URL scheme and the environment that reaches it."""

    scheme: str
    env: dict[str, str]

    def url(self, name: str) -> str:
        return f"{self.scheme}://{BUCKET}/{name}"


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server listening on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def s3_server() -> Iterator[ObjectStore]:
    """moto's S3 server with bucket `ft-test`."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request

    port = portpicker.pick_unused_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        _wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        yield ObjectStore("s3", env)
    finally:
        server.stop()


@contextlib.contextmanager
def gcs_server() -> Iterator[ObjectStore]:
    """gcp-storage-emulator, in memory, with bucket `ft-test`."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = portpicker.pick_unused_port()
    # The emulator serves one request at a time from a `http.server.HTTPServer`, whose
    # listen backlog of 5 drops the connections TensorStore opens in parallel: each
    # dropped one waited for a TCP retransmit (1 s, then 3 s...), and a gs:// test took
    # 5-20 x its s3:// twin. A deeper backlog (this test process only) queues them.
    http.server.HTTPServer.request_queue_size = 128
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    # It also rewrites a JSON dump of every object's metadata on each write and
    # delete, only to persist it; in memory nothing reads it back.
    server._storage._write_config_to_file = lambda: None
    server.start()
    try:
        _wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "STORAGE_EMULATOR_HOST": endpoint,
            "TENSORSTORE_GCS_HTTP_URL": endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "testing",
        }
        yield ObjectStore("gs", env)
    finally:
        server.stop()


SERVERS = {"s3": s3_server, "gs": gcs_server}
