"""One Wattlane server (real Ray, real models) shared by every integration test in the session."""

from __future__ import annotations

import pytest

from tests.support.server import RunningServer, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RunningServer:
    srv = start_server(tmp_path_factory.mktemp("wattlane-state"))
    yield srv
    srv.deployment.stop()
