"""``/docs`` and ``/redoc`` work offline: every asset they load is served by the server."""

from __future__ import annotations

import re

from tests.fixtures.live_server import LiveServer

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def test_docs_pages_load_only_local_assets(live_server: LiveServer) -> None:
    with live_server.client() as c:
        for page in ("/docs", "/redoc"):
            html = c.get(page)
            assert html.status_code == 200, page
            urls = [a or b for a, b in ASSET.findall(html.text)]
            assert urls, f"{page} names no asset"
            for url in urls:
                assert not url.startswith(("http:", "https:", "//")), f"{page} loads {url}"
                assert c.get(url).status_code == 200, f"{page}: {url}"
