"""Webhook endpoints (extension): ``/v1/webhooks`` register, list, retrieve, delete, and
each endpoint's delivery log. Delivery: ``service/webhooks.py``; storage:
``workers/webhooks.py``.

An endpoint belongs to the tenant that registered it and receives that tenant's events
only. Its signing secret is answered once, at creation; afterwards only its last four
characters are shown.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from service.deps import Auth, TenantDep, owned
from service.errors import APIError, error_responses
from service.schemas import Page, page
from service.webhooks import AddressRefused, allowed_networks, check_addresses, check_url
from workers.webhooks import EVENT_TYPES, EndpointNotFound, WebhookStore

router = APIRouter(
    prefix="/v1/webhooks",
    tags=["webhooks"],
    dependencies=[Auth],
    responses=error_responses(400, 503),
)
MAX_ENDPOINTS = 20  # per tenant


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048, description="Where events are POSTed (http or https).")
    events: list[Literal[EVENT_TYPES]] | None = Field(  # type: ignore[valid-type]
        None, min_length=1, description="The event types to send; default all of them."
    )
    description: str = Field("", max_length=512)


class Endpoint(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str
    created_at: int
    secret: str = Field(description="The signing secret in full at creation, else masked.")


class EndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool


class Delivery(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    delivery_id: str
    event_id: str
    type: str
    attempt: int
    at: int
    status_code: int | None
    error: str | None
    outcome: Literal["delivered", "retrying", "failed"]
    next_attempt_at: int | None = None


def get_webhooks(request: Request) -> WebhookStore:
    return request.app.state.webhooks


HooksDep = Annotated[WebhookStore, Depends(get_webhooks)]


def _endpoint(rec: dict, reveal: bool = False) -> Endpoint:
    secret = rec["secret"] if reveal else "whsec_..." + rec["secret"][-4:]
    fields = {k: rec[k] for k in ("id", "url", "events", "description", "created_at")}
    return Endpoint(**fields, secret=secret)


def _owned(webhook_id: str, hooks: HooksDep, tenant: TenantDep) -> dict:
    return owned(hooks, EndpointNotFound, "webhook endpoint", webhook_id, tenant, "webhook_id")


Owned = Annotated[dict, Depends(_owned)]


@router.post("", response_model=Endpoint)
def create(body: CreateRequest, hooks: HooksDep, tenant: TenantDep, request: Request) -> Endpoint:
    """Register an endpoint for the caller's events; the answer holds its signing secret."""
    settings = request.app.state.settings
    try:
        host, port = check_url(body.url)
        check_addresses(host, port, allowed_networks(settings.webhook_allowed_networks))
    except AddressRefused as exc:
        raise APIError(400, str(exc), param="url", code="invalid_url") from None
    if len(hooks.of_tenant(tenant.name)) >= MAX_ENDPOINTS:
        raise APIError(
            400,
            f"a tenant may register at most {MAX_ENDPOINTS} webhook endpoints",
            param="url",
            code="too_many_endpoints",
        )
    rec = hooks.create(tenant.name, body.url, list(body.events or EVENT_TYPES), body.description)
    return _endpoint(rec, reveal=True)


@router.get("", response_model=Page)
def list_endpoints(hooks: HooksDep, tenant: TenantDep) -> dict:
    """The caller's endpoints, newest first (at most ``MAX_ENDPOINTS``: one page)."""
    return page([_endpoint(r) for r in hooks.of_tenant(tenant.name)], False)


@router.get("/{webhook_id}", response_model=Endpoint, responses=error_responses(404))
def retrieve(rec: Owned) -> Endpoint:
    return _endpoint(rec)


@router.delete("/{webhook_id}", response_model=EndpointDeleted, responses=error_responses(404))
def delete(rec: Owned, hooks: HooksDep) -> EndpointDeleted:
    """Remove the endpoint; its pending deliveries are dropped, its log with it."""
    hooks.delete(rec["id"])
    return EndpointDeleted(id=rec["id"], deleted=True)


@router.get("/{webhook_id}/deliveries", response_model=Page, responses=error_responses(404))
def deliveries(
    rec: Owned, hooks: HooksDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict:
    """The endpoint's delivery attempts, newest first (the last 100 are kept)."""
    entries = [Delivery(**e) for e in hooks.log(rec["id"], limit)]
    return {"object": "list", "data": entries, "has_more": False}
