"""Shared fixtures: one local Ray instance for the whole session (Ray takes seconds to start)."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s: a smoke fit then waits up to that long at each hand-over
# (started, finished, failed). Polled every 0.25 s a smoke fit takes about 5 s less (bench/train_poll.py);
# inherited by every Ray the tests start, fault tests included.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Tests that start Ray Train, Tune or a Ray cluster: `pytest -m "not e2e"` is the developer's fast loop.
E2E_FIXTURES = {"ray_session"}


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # The dashboard's state API is how Ray Train's PlacementGroupCleaner sees a controller killed by Tune
    # (an ASHA-stopped trial); without it the stopped trial's CPUs are never given back.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


# The live object store: an S3-compatible server (moto) on 127.0.0.1, reached the way a user's own MinIO or
# Ceph is, through the standard AWS variables. Set at import, before any Ray process starts, so Ray's workers
# inherit them; the server itself starts only when a test asks for it.
def _store_port() -> int:
    """A free port outside the OS's ephemeral range and Ray's worker ports (10002-19999), so nothing that asks
    for "any port" -- Ray's processes, the two-node test -- takes it while the server is stopped."""
    import random
    import socket

    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999 for the test object store")


S3_PORT = _store_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="raysys-test",
                  AWS_SECRET_ACCESS_KEY="raysys-test", AWS_DEFAULT_REGION="us-east-1")


class ObjectStore:
    """The moto server; ``stop()`` makes it unreachable and ``start()`` brings it back with its data."""

    def __init__(self, port: int):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server_class, self.port, self.server = ThreadedMotoServer, port, None

    def start(self) -> None:
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def bucket(self, name: str) -> str:
        """A new, empty bucket; its ``s3://`` URI."""
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def object_store():
    store = ObjectStore(S3_PORT)
    store.start()
    yield store
    store.stop()


@pytest.fixture
def s3_bucket(object_store, request):
    """A fresh bucket on the live object store, named after the test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return object_store.bucket(f"{name}-{uuid.uuid4().hex[:8]}")
