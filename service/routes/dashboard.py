"""The dashboard at /dashboard/: one static page with its scripts and styles.

The files carry no data and need no key. In the browser the page asks for an API key
(kept in the tab's sessionStorage) when the API answers 401, and reads everything from
the authenticated JSON endpoints (jobs, metrics, events, checkpoints, samples, eval
runs), so tenancy is enforced by the API exactly as for any other client. With keys off
(dev mode) the first call succeeds and no key is asked.

Every answer here carries a Content-Security-Policy that allows only this origin:
no inline script or style, no other host, so text from samples and events can never run
even if a bug rendered it as markup (the scripts only ever set ``textContent``).
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from service.errors import not_found

router = APIRouter(include_in_schema=False)

# The files under service/static/dashboard/ that may be served, and their types; any
# other name is a 404 (no path is ever built from the request).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "plot.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "job.js": "text/javascript; charset=utf-8",
    "panels.js": "text/javascript; charset=utf-8",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def asset_bytes(name: str) -> bytes:
    """The shipped file ``name`` (read once per process)."""
    return resources.files("service").joinpath("static", "dashboard", name).read_bytes()


@router.get("/dashboard")
def dashboard_root() -> RedirectResponse:
    # relative, so the page's relative asset and API URLs also work behind a path prefix
    return RedirectResponse("dashboard/", status_code=308, headers=HEADERS)


@router.get("/dashboard/")
def dashboard_page() -> Response:
    return dashboard_asset("index.html")


@router.get("/dashboard/{name}")
def dashboard_asset(name: str) -> Response:
    if name not in ASSETS:
        raise not_found("dashboard file", name)
    return Response(asset_bytes(name), media_type=ASSETS[name], headers=HEADERS)
