"""The posttrain API: ``uvicorn service.main:create_app --factory``.

This process never imports torch (a test proves it): it validates, stores
uploads, writes job records and enqueues by task name.
"""

from __future__ import annotations

import redis
from fastapi import FastAPI

from service import errors
from service.routes import files, graders, health, jobs
from service.settings import ApiSettings
from workers.celery_app import make_celery
from workers.filestore import FileStore
from workers.store import JobStore


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    app = FastAPI(
        title="posttrain",
        version="0.1.0",
        description="Self-hosted LLM post-training with an OpenAI-compatible API",
    )
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    app.state.settings = settings
    app.state.redis = client
    app.state.jobs = JobStore(client, settings.key_prefix)
    app.state.files = FileStore(client, settings.data_dir, settings.key_prefix)
    app.state.api_keys = settings.key_set()
    app.state.celery = make_celery(settings)
    errors.install(app)
    for module in (health, files, jobs, graders):
        app.include_router(module.router)
    return app
