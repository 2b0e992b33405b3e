"""The real gateway app in-process (tests/support/gateway_app.py), for the HTTP-level tests of this folder."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support.gateway_app import build


@pytest.fixture
def client(tmp_path):
    """A test client of the gateway app with the default models (a test file may define its own)."""
    app, gw = build(tmp_path)
    with TestClient(app) as c:
        yield c
    gw.close()
