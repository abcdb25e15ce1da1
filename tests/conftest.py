"""Shared fixtures: a real Redis database, flushed around each test.

Tests never mock Redis or Celery, and never touch a Redis they did not start:
the session starts its own throwaway ``redis-server`` (``tests/redis_server.py``).
Unit tests use its database 14, the end-to-end tests 15 and 13.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import redis

from tests import redis_server
from workers.filestore import FileStore
from workers.store import JobStore

UNIT_DB = 14


def pytest_configure(config):
    redis_server.start()


def pytest_unconfigure(config):
    redis_server.stop()


@pytest.fixture(scope="session")
def unit_redis_url() -> str:
    return redis_server.url(UNIT_DB)


@pytest.fixture
def redis_client(unit_redis_url):
    client = redis.Redis.from_url(unit_redis_url, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"Redis is not reachable at {unit_redis_url}: {exc}")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client, "test:")


@pytest.fixture
def file_store(redis_client, tmp_path) -> FileStore:
    return FileStore(redis_client, tmp_path, "test:")


@pytest.fixture
def frozen():
    """``frozen(path)`` makes ``path`` impossible to remove, and a directory impossible to
    write into, until the test ends or the returned function is called: the immutable
    flag as root (whom permissions do not stop), a read-only directory otherwise."""
    undo = []

    def freeze(path):
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                pytest.skip("this filesystem has no immutable flag")
            cmd = ["chattr", "-i", str(path)]
            undo.append(lambda: path.exists() and subprocess.run(cmd, check=True))
        else:
            folder = path if path.is_dir() else path.parent
            mode = folder.stat().st_mode
            folder.chmod(0o555)
            undo.append(lambda: folder.exists() and folder.chmod(mode))
        return undo[-1]

    yield freeze
    for thaw in undo:
        thaw()
