"""A real S3 API on loopback for tests and benchmarks: moto's ThreadedMotoServer, in-process.

    def test_x(s3_server):                      # the fixture: started, empty, stopped after
        s3_server.create_bucket("archive")
        target = open_target("s3://archive/p", endpoint_url=s3_server.endpoint_url)
        s3_server.stop()                        # an outage: connections are refused
        s3_server.restart()                     # same port, same data

    with S3Server() as server:                  # benchmarks: export server.env for subprocesses
        ...

What survives what (verified with moto 5.2.5): moto keeps its S3 state in module-global
backends, not in the server object, so objects and buckets survive ``stop()``/``start()``
and even a new ThreadedMotoServer in the same process; only ``reset()`` (moto's
``/moto-api/reset``) or the end of the process wipes them. Hence the fixture resets on start,
so no test sees another's buckets. ``stop()`` closes the listening socket (werkzeug's
serve_forever closes it on shutdown), so new connections are refused at once; moto answers
every request with ``Connection: close``, so no pooled connection outlives the outage
either. A request already in flight when ``stop()`` is called still completes.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import pytest
from moto.server import ThreadedMotoServer

from tests.devserver import free_port  # re-exported for benchmarks: a kept port survives a restart

HOST = "127.0.0.1"
REGION = "us-east-1"
#: Dummy credentials (moto accepts any), plus settings that keep boto3 away from real ones:
#: no ~/.aws files, no instance-metadata lookups.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: How long a control request to moto (reset) may take before the test fails instead of hanging.
CONTROL_TIMEOUT_S = 10.0


class S3Server:
    """moto's S3 on ``127.0.0.1:<port>``, startable and stoppable any number of times."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for boto3 (here or in a subprocess): dummy credentials, no real config."""
        return dict(DUMMY_AWS_ENV)

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        # ThreadedMotoServer binds in its thread; if the bind fails that thread exits and
        # start() waits forever. Find out here, with a message, instead.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, self.port))
            except OSError as exc:
                raise RuntimeError(f"cannot start moto S3 on {HOST}:{self.port}: {exc}") from exc
        # werkzeug logs every request (4xx in colour) at INFO: noise in test and bench output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop listening: from now on connections to the port are refused. Data is kept."""
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()

    def restart(self) -> None:
        """Stop, then start on the same port, with the same data (see the module docstring)."""
        self.stop()
        self.start()

    def reset(self) -> None:
        """Wipe every bucket and object (all of moto's state in this process)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=CONTROL_TIMEOUT_S) as answer:
            if answer.status != 200:
                raise RuntimeError(f"moto reset answered HTTP {answer.status}, expected 200")

    def client(self) -> Any:
        """A raw boto3 S3 client for this server, with the dummy credentials passed explicitly."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy AWS credentials in the environment, and nothing else AWS_*; undone afterwards."""
    # Every AWS_* variable goes (profiles, endpoints, role files), then the dummies come in:
    # whatever the developer's shell holds, boto3 never looks for real credentials.
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(DUMMY_AWS_ENV)


@pytest.fixture
def s3_server(aws_env: dict[str, str]) -> Iterator[S3Server]:
    """A running, empty moto S3 with dummy credentials in the environment; stopped afterwards."""
    server = S3Server()
    server.start()
    try:
        server.reset()  # moto's state is process-wide: start from empty
        yield server
    finally:
        server.stop()
