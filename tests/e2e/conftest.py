"""The real stack for end-to-end tests: uvicorn and a Celery worker as subprocesses.

They share database 15 of the suite's throwaway Redis (``tests/redis_server.py``)
and a temporary data directory. The tiny model is built once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from service import stack as local_stack
from tests import redis_server

E2E_DB = 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    base_url: str
    data_dir: Path
    model_dir: Path
    redis: redis.Redis
    logs: Path
    env: dict
    api: object = None
    worker: object = None

    def start_worker(self, name: str = "e2e"):
        self.worker = local_stack.start_worker(self.env, self.logs / f"{name}.log", name=name)
        return self.worker

    def stop(self) -> None:
        local_stack.stop(self.worker)
        local_stack.stop(self.api)
        self.redis.flushdb()


def start_stack(root: Path, redis_url: str, **env_overrides: str) -> Stack:
    """API + one worker on their own Redis database, queue and data directory."""
    from trainers.tiny_model import build_tiny_model

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    # Jobs may load models only from the model roots (service/modelaccess.py).
    model_dir = build_tiny_model(root / "models" / "tiny-model", seed=0)
    env = {
        **os.environ,
        "POSTTRAIN_REDIS_URL": redis_url,
        "POSTTRAIN_DATA_DIR": str(root / "data"),
        "POSTTRAIN_MODEL_ROOTS": str(root / "models"),
        "POSTTRAIN_QUEUE": f"posttrain.e2e.{root.name}",
        "POSTTRAIN_CHECKPOINT_EVERY_STEPS": "10",
        "POSTTRAIN_TRAIN_THREADS": "1",
        "POSTTRAIN_CANCEL_GRACE_SECONDS": "3",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **env_overrides,
    }
    port = _free_port()
    st = Stack(f"http://127.0.0.1:{port}", root / "data", Path(model_dir), client, root, env)
    st.api = local_stack.start_api(env, port, root / "api.log")
    try:
        st.start_worker()
    except BaseException:
        st.stop()
        raise
    return st


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    st = start_stack(tmp_path_factory.mktemp("e2e"), redis_server.url(E2E_DB))
    try:
        yield st
    finally:
        st.stop()
