"""Shared fixtures: one local Ray instance for the whole session (Ray takes seconds to start)."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # The dashboard's state API is how Ray Train's PlacementGroupCleaner sees a controller killed by Tune
    # (an ASHA-stopped trial); without it the stopped trial's CPUs are never given back.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()
