"""Shared fixtures: a real Redis database per test session, flushed around each test.

Tests never mock Redis or Celery. Unit tests use database 14, the end-to-end
tests database 15 (override with POSTTRAIN_TEST_REDIS_URL / _E2E_REDIS_URL).
"""

from __future__ import annotations

import os

import pytest
import redis

from workers.filestore import FileStore
from workers.store import JobStore

UNIT_URL = os.environ.get("POSTTRAIN_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(UNIT_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"Redis is not reachable at {UNIT_URL}: {exc}")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client, "test:")


@pytest.fixture
def file_store(redis_client, tmp_path) -> FileStore:
    return FileStore(redis_client, tmp_path, "test:")
