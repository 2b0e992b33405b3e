"""The built-in dashboard rendered in real headless Chromium against the running server, with a reader key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.server import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT = "smollm2-135m-instruct"
#: how the dashboard labels each method the embedded default can produce (DESIGN.md, Energy accounting)
KIND = {"rapl": "measured", "cpu-estimate": "estimated"}


def chromium_or_skip() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return binary


def chromium(binary: str, url: str, profile: Path, *extra: str) -> str:
    """One headless run in a fresh profile, with everything that would reach the network turned off."""
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--window-size=1400,2400", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=90, check=True).stdout


def section(dom: str, element_id: str) -> str:
    m = re.search(rf'<table id="{element_id}"[^>]*>(.*?)</table>', dom, flags=re.S)
    assert m, f"table #{element_id} is missing from the rendered page"
    return m.group(1)


def test_dashboard_renders_the_ledger_with_method_labels(server, tmp_path):
    binary = chromium_or_skip()
    ids = []
    for word in ("energy", "carbon", "watts"):
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers("client"), timeout=120,
                       json={"model": CHAT, "messages": [{"role": "user", "content": f"One word about {word}."}],
                             "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    method = r.json()["usage"]["energy"]["method"]
    assert method in KIND

    page = httpx.get(server.url + "/dashboard", timeout=30)
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers  # served without a key

    # the reader key goes in the #fragment: never sent to the server, and the page drops it from the address
    url = f"{server.url}/dashboard?window=1h#key={KEYS['reader']}"
    dom = chromium(binary, url, tmp_path / "profile-dom", "--dump-dom")
    assert 'data-state="ready"' in dom, "the page did not finish loading its figures"

    models = section(dom, "models-table")
    row = re.search(rf'<tr data-group="{re.escape(CHAT)}">(.*?)</tr>', models, flags=re.S)
    assert row, f"{CHAT} has no row in the per-model table"
    joules = re.search(r'data-field="joules"[^>]*>([^<]+)</td>', row.group(1)).group(1)
    assert float(joules.replace(",", "")) > 0
    assert f'data-method="{method}"' in row.group(1)
    assert f"{KIND[method]} · {method}" in row.group(1), "the method is written out, not only coloured"

    latest = section(dom, "latest-table")
    for request_id in ids:
        tr = re.search(rf'<tr data-request-id="{re.escape(request_id)}">(.*?)</tr>', latest, flags=re.S)
        assert tr, f"request {request_id} is missing from the latest requests"
        assert f'data-method="{method}"' in tr.group(1)

    total = float(re.search(r'id="total-energy" data-joules="([^"]+)"', dom).group(1))
    assert total > 0
    # a reader may not read live devices: the page says so instead of failing
    assert "need an operator key" in dom

    shot = tmp_path / "dashboard.png"
    chromium(binary, url, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000
    print(f"dashboard screenshot: {shot}")
