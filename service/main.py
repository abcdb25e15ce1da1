"""The posttrain API: ``uvicorn service.main:create_app --factory``.

This process never imports torch (a test proves it): it validates, stores
uploads, writes job records and enqueues by task name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
import redis
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import errors, openapi, swaggerui
from service.auth import KeyRing, bind_refusal
from service.bodylimit import BodyLimit
from service.deps import Auth, TenantDep, valid_path_ids
from service.errors import APIError
from service.graderpool import GraderPool
from service.metrics import HttpMetrics, Metrics
from service.modelaccess import ModelAccess
from service.routes import (
    dashboard,
    evalruns,
    evals,
    files,
    graders,
    health,
    inference,
    jobs,
    models,
    webhooks,
)
from service.settings import ApiSettings
from service.webhooks import Deliverer, deliver_forever
from workers.celery_app import make_celery
from workers.evalruns import EvalRunStore
from workers.evalstore import EvalStore
from workers.filestore import FileStore
from workers.fleet import live_queues
from workers.recovery import fail_unserved
from workers.redis_client import make_redis
from workers.store import JobStore
from workers.webhooks import WebhookStore


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    app = FastAPI(
        title="posttrain",
        version="0.1.0",
        description="Self-hosted LLM post-training with an OpenAI-compatible API",
        # served by _docs() below, behind the key when docs_access is "auth"
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(valid_path_ids)],
        lifespan=_lifespan,
    )
    client = make_redis(settings)
    app.state.settings = settings
    app.state.redis = client
    app.state.jobs = JobStore(
        client,
        settings.key_prefix,
        events_maxlen=settings.events_maxlen,
        metrics_maxlen=settings.metrics_maxlen,
    )
    app.state.files = FileStore(client, settings.data_dir, settings.key_prefix)
    app.state.evals = EvalStore(client, settings.key_prefix)
    app.state.eval_runs = EvalRunStore(client, settings.key_prefix)
    app.state.webhooks = WebhookStore(client, settings.key_prefix)
    for stale in app.state.files.remove_stale_staging():  # uploads a killed API left
        log.warning("removed stale upload staging file %s", stale)
    app.state.keyring = KeyRing.load(settings.api_keys, settings.api_keys_file)
    app.state.api_keys = frozenset(app.state.keyring.by_hash)  # truthy = auth on
    # `uvicorn --factory` never passes the bind address: POSTTRAIN_HOST says it (the API
    # image sets 0.0.0.0), and `posttrain serve` checks its --host the same way.
    refusal = bind_refusal(settings.host, app.state.keyring, settings.insecure_no_auth)
    if refusal:
        raise RuntimeError(refusal)
    app.state.model_access = ModelAccess(settings, app.state.jobs)
    app.state.grader_pool = GraderPool(settings.grader_workers, settings.grader_runs_per_tenant)
    app.state.celery = make_celery(settings)
    # one pool of connections to inference workers, and the registry read (service/inference.py)
    app.state.inference_workers = {}
    app.state.inference_client = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.inference_timeout_seconds, connect=5.0),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
    )
    app.state.metrics = Metrics(app.state.jobs, settings)
    errors.install(app)
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, exempt=frozenset({("POST", "/v1/files")})
    )
    app.add_middleware(HttpMetrics, metrics=app.state.metrics)  # outermost: sees every answer
    routers = (health, files, jobs, graders, models, inference, evals, evalruns, webhooks)
    for module in (*routers, dashboard):
        app.include_router(module.router)
    openapi.install(app)
    _docs(app, settings.docs_access)
    _metrics(app, settings.metrics_access)
    return app


def _metrics(app: FastAPI, access: str) -> None:
    """GET /metrics in Prometheus' text format (``service.metrics``): for an admin's key
    ("admin", or anyone when keys are off), open ("public") or absent ("off")."""
    if access == "off":
        return

    def text() -> Response:
        body = generate_latest(app.state.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    if access == "public":
        app.get("/metrics", include_in_schema=False)(text)
        return

    @app.get("/metrics", include_in_schema=False)
    def admin_only(tenant: TenantDep) -> Response:
        if app.state.keyring.enabled and not tenant.admin:
            raise APIError(
                403,
                "/metrics shows every tenant's jobs: it needs an admin key "
                "(or POSTTRAIN_METRICS_ACCESS=public)",
                param="Authorization",
                type="permission_error",
                code="admin_only",
            )
        return text()


def _docs(app: FastAPI, access: str) -> None:
    """/openapi.json and /docs: behind the API key ("auth"), open ("public") or absent.
    Swagger UI's own files (``service.swaggerui``) are public whenever /docs is served."""
    if access == "off":
        return
    deps = [Auth] if access == "auth" else []

    @app.get(swaggerui.ASSET_PATH + "/{name}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        return swaggerui.asset(name)

    @app.get("/openapi.json", include_in_schema=False, dependencies=deps)
    def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=deps)
    def docs() -> HTMLResponse:
        return swaggerui.page("posttrain API")


log = logging.getLogger("posttrain.api")


def _sweep(app: FastAPI) -> None:
    """One pass of the API's upkeep: delete files past their ``expires_at`` (reads of an
    expired file already answer 404; this frees the disk), and fail jobs that have waited
    on a queue with no live worker for ``unserved_queue_seconds``."""
    s, jobs = app.state.settings, app.state.jobs
    gone = app.state.files.sweep_expired()
    if gone:
        log.info("deleted %d expired file(s)", gone)
    live = live_queues(jobs.r, jobs.p)
    failed = fail_unserved(jobs, live, s.unserved_queue_seconds, s.queue)
    if failed:
        log.warning("failed %d job(s) queued with no live worker: %s", len(failed), failed)


async def _sweeper(app: FastAPI) -> None:
    """``_sweep`` every ``file_sweep_seconds``, off the event loop."""
    while True:
        try:
            await asyncio.to_thread(_sweep, app)
        except redis.RedisError as exc:
            log.warning("upkeep sweep skipped: %s", exc)
        await asyncio.sleep(app.state.settings.file_sweep_seconds)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    sweeper = asyncio.create_task(_sweeper(app))
    deliverer = Deliverer(app.state.webhooks, app.state.settings)
    delivering = asyncio.create_task(
        deliver_forever(deliverer, app.state.settings.webhook_poll_seconds)
    )
    try:
        yield
    finally:
        app.state.grader_pool.shutdown()
        await app.state.inference_client.aclose()
        for task in (sweeper, delivering):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await deliverer.close()
