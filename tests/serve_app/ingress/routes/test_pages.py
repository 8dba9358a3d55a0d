"""The page routes over plain HTTP: the pages, their static files, nothing outside the static folder."""

import httpx
import pytest

pytestmark = pytest.mark.serve


def test_pages_and_static_files_are_served(base_url):
    chat = httpx.get(base_url + "/")
    assert chat.status_code == 200 and chat.headers["content-type"].startswith("text/html")
    assert "/static/chat.js" in chat.text and "/static/vendor/marked.umd.js" in chat.text
    ops = httpx.get(base_url + "/ops")
    assert ops.status_code == 200 and "/static/ops.js" in ops.text
    for path in ["/static/chat.js", "/static/ops.js", "/static/vendor/marked.umd.js", "/static/vendor/purify.min.js"]:
        r = httpx.get(base_url + path)
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], path
    assert httpx.get(base_url + "/static/chat.css").headers["content-type"].startswith("text/css")


def test_static_route_serves_nothing_outside_its_folder(base_url):
    for path in ["/static/../ops.py", "/static/..%2Fops.py", "/static/%2e%2e/%2e%2e/serve_config.yaml",
                 "/static/missing.js", "/static/vendor"]:
        assert httpx.get(base_url + path).status_code == 404, path


def test_pages_forbid_framing_and_loads_from_elsewhere(base_url):
    for path in ["/", "/ops", "/static/chat.js"]:
        headers = httpx.get(base_url + path).headers
        csp = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'", path
        assert csp["script-src"] == csp["style-src"] == csp["connect-src"] == "'self'", path
        assert csp["img-src"] == "'self' data:", path
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
