"""The dashboard's files and /docs' Swagger UI files as the API serves them (in process).

What the browser draws from them is tested in headless Chromium against the real stack
(tests/e2e/test_dashboard.py); here: the files are static (no data, no key needed,
every one of them reachable), carry a same-origin-only Content-Security-Policy, and
neither they nor /docs reach for another host.
"""

from __future__ import annotations

import io
import json
import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.routes.dashboard import ASSETS, CSP
from service.swaggerui import FILES
from tests.service.test_errors import AUTH, make_settings

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture
def keyed(tmp_path, redis_client, unit_redis_url):
    with TestClient(create_app(make_settings(tmp_path, unit_redis_url))) as c:
        yield c


def test_dashboard_redirects_to_its_page_with_a_relative_location(keyed):
    resp = keyed.get("/dashboard", follow_redirects=False)
    assert resp.status_code == 308 and resp.headers["location"] == "dashboard/"
    page = keyed.get("/dashboard")  # followed: /dashboard/
    assert page.status_code == 200 and page.url.path == "/dashboard/"


def test_every_file_is_served_without_a_key_with_the_same_origin_policy(keyed):
    for name, media_type in ASSETS.items():
        resp = keyed.get(f"/dashboard/{name}")
        assert resp.status_code == 200 and resp.content, name
        assert resp.headers["content-type"] == media_type, name
        assert resp.headers["content-security-policy"] == CSP, name
        assert resp.headers["x-content-type-options"] == "nosniff", name
    assert "default-src 'self'" in CSP and "script-src 'self';" in CSP
    assert "unsafe" not in CSP and "http" not in CSP


def test_unknown_or_traversing_names_are_404s(keyed):
    for name in ("nope.js", "..%2Fmain.py", "%2E%2E%2Fsettings.py", "static"):
        resp = keyed.get(f"/dashboard/{name}")
        assert resp.status_code == 404, name
    assert keyed.get("/dashboard/x/../../service/main.py").status_code == 404


def test_the_files_carry_no_data(keyed):
    """The page and scripts are the same bytes for everyone; a job the tenant created
    appears in none of them (data comes only from the keyed JSON endpoints)."""
    body = {"file": ("train.jsonl", io.BytesIO(json.dumps(CHAT).encode()))}
    fid = keyed.post("/v1/files", files=body, data={"purpose": "fine-tune"}, headers=AUTH)
    fid = fid.json()["id"]
    job = keyed.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}, headers=AUTH
    )
    job = job.json()["id"]
    assert fid.startswith("file-") and job.startswith("ftjob-")
    for name in ASSETS:
        anonymous = keyed.get(f"/dashboard/{name}").content
        assert keyed.get(f"/dashboard/{name}", headers=AUTH).content == anonymous, name
        assert job.encode() not in anonymous and fid.encode() not in anonymous, name


def test_the_scripts_never_parse_text_as_markup_and_load_nothing_from_elsewhere(keyed):
    """CSP forbids inline code, so the page has none; the scripts set text, never HTML."""
    page = keyed.get("/dashboard/").text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\sstyle=|\son[a-z]+=", page)
    referenced = set(re.findall(r'(?:src|href)="([^"#]+)"', page))
    assert referenced <= set(ASSETS), referenced - set(ASSETS)
    for name in ASSETS:
        text = keyed.get(f"/dashboard/{name}").text
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), name
        if name.endswith(".js"):
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
                assert sink not in text, (name, sink)
            imported = set(re.findall(r'from "\./([^"]+)"', text))
            assert imported <= set(ASSETS), (name, imported - set(ASSETS))


@pytest.mark.parametrize("access", ["auth", "public"])
def test_docs_load_swagger_ui_from_this_server(tmp_path, redis_client, unit_redis_url, access):
    with TestClient(create_app(make_settings(tmp_path, unit_redis_url, docs_access=access))) as c:
        page = c.get("/docs", headers=AUTH)
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assert urls and all(u.startswith("/") for u in urls), urls
        assert "cdn" not in page.text and "https://" not in page.text
        for name, media_type in FILES.items():
            assert f"/docs/assets/{name}" in page.text, name
            asset = c.get(f"/docs/assets/{name}")  # public: Swagger UI, not the schema
            assert asset.status_code == 200 and len(asset.content) > 100, name
            assert asset.headers["content-type"] == media_type, name
        assert b"SwaggerUIBundle" in c.get("/docs/assets/swagger-ui-bundle.js").content
        assert c.get("/docs/assets/nope.js").status_code == 404


def test_docs_off_serves_no_swagger_files(tmp_path, redis_client, unit_redis_url):
    with TestClient(create_app(make_settings(tmp_path, unit_redis_url, docs_access="off"))) as c:
        assert c.get("/docs/assets/swagger-ui-bundle.js").status_code == 404


def test_the_files_ship_in_the_package():
    """The API image installs the package (not the tree): its package data must hold them."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["service"]
    assert "static/dashboard/*" in globs
    shipped = {p.name for p in (Path(__file__).parents[2] / "service/static/dashboard").iterdir()}
    assert shipped == set(ASSETS), shipped ^ set(ASSETS)
