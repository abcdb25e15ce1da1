"""/docs without internet: Swagger UI's files come from the ``fastapi-swagger`` package
(pinned in the ``api`` extra) and are served by the API itself, where FastAPI's default
page would load them from a CDN and stay blank offline.

The files are public (they are Swagger UI, not posttrain's schema); the page and
/openapi.json keep ``POSTTRAIN_DOCS_ACCESS`` (``service.main._docs``).
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from service.errors import not_found

ASSET_PATH = "/docs/assets"
# the package's files, and their types; any other name is a 404
FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("fastapi_swagger").joinpath("resources", name).read_bytes()


def asset(name: str) -> Response:
    """One of Swagger UI's files, cacheable for a day (they change only with the package)."""
    if name not in FILES:
        raise not_found("docs file", name)
    return Response(
        _read(name), media_type=FILES[name], headers={"Cache-Control": "public, max-age=86400"}
    )


def page(title: str) -> HTMLResponse:
    """Swagger UI's page for /openapi.json, every file from this server."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=title,
        swagger_js_url=f"{ASSET_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSET_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSET_PATH}/favicon-32x32.png",
    )
