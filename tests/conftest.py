"""Shared test settings.

Tests use one torch thread: the models here are tiny, and on a 2-core machine that is also
running other work, OpenMP's spinning threads make small ops many times slower.
Registry fetching is opt-in (`CHATFORGE_NETWORK_TESTS=1`); other tests get their own
CHATFORGE_CACHE.
"""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever the one before it set."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def private_cache(request, tmp_path_factory, monkeypatch):
    """Tests keep out of the user's chatforge cache (passage indexes, downloads); the network
    tests fetch into the usual one, so that a second run is a cache hit."""
    if "network" not in request.keywords:
        monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path_factory.mktemp("chatforge-cache")))
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CHATFORGE_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="fetches from the package registries; set CHATFORGE_NETWORK_TESTS=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_cluster():
    """A throw-away PostgreSQL server for the session (tests/_postgres.py), or a skip saying why."""
    from _postgres import Cluster

    why = Cluster.unavailable()
    if why:
        pytest.skip(why)
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install -e '.[postgres]' (the dev extra has it)")
    cluster = Cluster()
    yield cluster
    cluster.stop()


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def pg_url(pg_cluster):
    """The URL of a new, empty PostgreSQL database."""
    return pg_cluster.url(f"test{next(_databases)}")
