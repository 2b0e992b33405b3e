"""Carbon intensity providers: codecarbon offline data, fixed, hourly CSV, live HTTP against a local fake."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scheduler.config import CarbonConfig, ConfigError
from scheduler.energy.carbon import (
    CarbonDataError,
    CodecarbonIntensity,
    FixedIntensity,
    HttpIntensity,
    gco2e,
    make_carbon_provider,
)


def test_formula_joules_to_grams() -> None:
    # 3.6 MJ = 1 kWh; at 400 g/kWh and PUE 1.5: 600 g
    assert gco2e(3.6e6, 1.5, 400.0) == pytest.approx(600.0)
    fp = FixedIntensity(400.0, pue=1.5).footprint(36.0)
    assert fp.gco2e == pytest.approx(36.0 / 3.6e6 * 1.5 * 400.0)
    assert fp.as_usage()["source"] == "fixed" and fp.pue == 1.5


def test_codecarbon_country_matches_its_data() -> None:
    from codecarbon.input import DataSource

    p = make_carbon_provider(CarbonConfig(provider="codecarbon", country="fra"))
    ci = p.intensity()
    assert ci.region == "FRA"
    assert ci.source.startswith("codecarbon:global-energy-mix")
    assert ci.gco2e_per_kwh == pytest.approx(DataSource().get_global_energy_mix_data()["FRA"]["carbon_intensity"])
    # a coal-heavy grid is dirtier than France's nuclear one
    assert make_carbon_provider(CarbonConfig(country="IND")).intensity().gco2e_per_kwh > 5 * ci.gco2e_per_kwh


def test_codecarbon_subnational_region() -> None:
    ca = CodecarbonIntensity("USA", "California")
    usa = CodecarbonIntensity("USA")
    assert ca.intensity().region == "USA/california"
    assert ca.intensity().gco2e_per_kwh != pytest.approx(usa.intensity().gco2e_per_kwh)
    se = CodecarbonIntensity("SWE", "se3")
    assert se.intensity().region == "SWE/SE3" and se.intensity().gco2e_per_kwh < 100


def test_codecarbon_cloud_region() -> None:
    p = make_carbon_provider(CarbonConfig(cloud_provider="gcp", cloud_region="europe-west1"))
    ci = p.intensity()
    assert ci.region == "gcp/europe-west1" and ci.source == "codecarbon:cloud-gcp"
    assert ci.gco2e_per_kwh > 0


@pytest.mark.parametrize(
    ("cfg", "key", "hint"),
    [
        (CarbonConfig(country="XYZ"), "energy.carbon.country", "alpha-3"),
        (CarbonConfig(country="FR"), "energy.carbon.country", "FRA"),
        (CarbonConfig(country="USA", region="atlantis"), "energy.carbon.region", "use one of"),
        (CarbonConfig(country="DEU", region="bavaria"), "energy.carbon.region", "USA"),
        (CarbonConfig(cloud_provider="gcp", cloud_region="mars-1"), "energy.carbon.cloud_region", "use one of"),
        (CarbonConfig(cloud_provider="aws", cloud_region="us-east-1"), "energy.carbon.cloud_provider", "gcp"),
        (CarbonConfig(cloud_provider="gcp"), "energy.carbon.cloud_region", "cloud_region"),
        (CarbonConfig(country=None), "energy.carbon.country", "USA"),
    ],
)
def test_unknown_place_is_a_config_error_not_world_average(cfg, key, hint) -> None:
    with pytest.raises(ConfigError) as err:
        make_carbon_provider(cfg)
    assert err.value.key == key
    assert hint in str(err.value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_picks_the_hour_in_force(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "grid.csv",
        "timestamp,intensity_gco2e_per_kwh\n"
        "2024-03-01T01:00:00Z,200\n"
        "2024-03-01T00:00:00Z,100\n"  # out of order on purpose
        "2024-03-01T02:00:00+00:00,300.5\n",
    )
    p = make_carbon_provider(CarbonConfig(provider="csv", csv_path=str(f), pue=1.2))
    at = lambda h, m: datetime(2024, 3, 1, h, m, tzinfo=timezone.utc)  # noqa: E731
    assert p.intensity(at(0, 0)).gco2e_per_kwh == 100
    assert p.intensity(at(0, 59)).gco2e_per_kwh == 100
    assert p.intensity(at(1, 30)).gco2e_per_kwh == 200
    assert p.intensity(at(2, 59).timestamp()).gco2e_per_kwh == 300.5
    assert p.intensity(at(1, 0)).source == "csv:grid.csv"
    assert p.footprint(3.6e6, at(1, 0)).gco2e == pytest.approx(240.0)
    with pytest.raises(CarbonDataError, match="covers"):
        p.intensity(at(3, 0))
    with pytest.raises(CarbonDataError):
        p.intensity(datetime(2024, 2, 29, 23, 59, tzinfo=timezone.utc))


def test_csv_relative_path_resolves_against_config_dir(tmp_path: Path) -> None:
    _write(tmp_path / "g.csv", "timestamp,intensity_gco2e_per_kwh\n2024-01-01T00:00:00,50\n")
    p = make_carbon_provider(CarbonConfig(provider="csv", csv_path="g.csv"), config_dir=tmp_path)
    assert p.intensity(datetime(2024, 1, 1, 0, 30)).gco2e_per_kwh == 50  # naive = UTC


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("time,value\n2024-01-01T00:00:00Z,1\n", "header"),
        ("timestamp,intensity_gco2e_per_kwh\nyesterday,1\n", "line 2"),
        ("timestamp,intensity_gco2e_per_kwh\n2024-01-01T00:00:00Z,-5\n", "non-negative"),
        ("timestamp,intensity_gco2e_per_kwh\n2024-01-01T00:00:00Z,abc\n", "line 2"),
        ("timestamp,intensity_gco2e_per_kwh\n", "no data rows"),
        ("timestamp,intensity_gco2e_per_kwh\n2024-01-01T00:00:00Z,1\n2024-01-01T00:00:00Z,2\n", "twice"),
    ],
)
def test_csv_bad_files_are_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    f = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ConfigError) as err:
        make_carbon_provider(CarbonConfig(provider="csv", csv_path=str(f)))
    assert err.value.key == "energy.carbon.csv_path"
    assert needle in str(err.value)


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        make_carbon_provider(CarbonConfig(provider="csv", csv_path=str(tmp_path / "none.csv")))


# --- live provider against a local fake server ----------------------------------------------------


class _FakeGrid:
    """A local Electricity Maps-like server whose answer the test controls."""

    def __init__(self) -> None:
        self.status = 200
        self.intensity = 123.0
        self.hits = 0
        self.tokens: list[str | None] = []
        grid = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                grid.hits += 1
                grid.tokens.append(self.headers.get("auth-token"))
                zone = self.path.split("zone=")[-1]
                body = json.dumps({"zone": zone, "carbonIntensity": grid.intensity, "datetime": "2024-01-01T00:00:00Z"}).encode()
                self.send_response(grid.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v3/carbon-intensity/latest"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grid():
    g = _FakeGrid()
    yield g
    g.close()


def test_http_fetches_caches_and_sends_token(grid: _FakeGrid, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EM_TOKEN", "s3cret")
    p = make_carbon_provider(CarbonConfig(provider="http", http_url=grid.url, http_zone="DE", http_token_env="EM_TOKEN", http_cache_seconds=0.3))
    ci = p.intensity()
    assert (ci.gco2e_per_kwh, ci.source, ci.region) == (123.0, "electricitymaps", "DE")
    grid.intensity = 456.0
    assert p.intensity().gco2e_per_kwh == 123.0  # cached
    assert grid.hits == 1 and grid.tokens == ["s3cret"]
    time.sleep(0.35)
    assert p.intensity().gco2e_per_kwh == 456.0
    assert grid.hits == 2


def test_http_failure_serves_last_good_and_says_stale(grid: _FakeGrid) -> None:
    p = HttpIntensity(grid.url, "FR", cache_seconds=0.1, retry_seconds=0.1)
    assert p.intensity().gco2e_per_kwh == 123.0
    grid.status = 503
    time.sleep(0.15)
    ci = p.intensity()
    assert ci.gco2e_per_kwh == 123.0 and "stale" in ci.source and "503" in ci.source
    hits = grid.hits
    p.intensity()
    assert grid.hits == hits  # no retry storm inside retry_seconds
    grid.status = 200
    grid.intensity = 50.0
    time.sleep(0.15)
    assert p.intensity().source == "electricitymaps" and p.intensity().gco2e_per_kwh == 50.0


def test_http_failure_without_history_uses_fallback_or_fails(grid: _FakeGrid) -> None:
    grid.status = 500
    p = make_carbon_provider(CarbonConfig(provider="http", http_url=grid.url, http_zone="FR", intensity_gco2e_per_kwh=300.0))
    ci = p.intensity()
    assert ci.gco2e_per_kwh == 300.0 and ci.source.startswith("fallback")
    bare = HttpIntensity(grid.url, "FR")
    with pytest.raises(CarbonDataError, match="no fallback"):
        bare.intensity()


def test_http_bad_body_and_dead_port(grid: _FakeGrid) -> None:
    grid.intensity = float("nan")
    p = HttpIntensity(grid.url, "FR", fallback_gco2e_per_kwh=10.0)
    assert p.intensity().source.startswith("fallback")
    dead = HttpIntensity("http://127.0.0.1:9/latest", "FR", fallback_gco2e_per_kwh=11.0, timeout_seconds=0.5)
    assert dead.intensity().gco2e_per_kwh == 11.0


def test_http_token_env_missing_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    with pytest.raises(ConfigError) as err:
        make_carbon_provider(CarbonConfig(provider="http", http_url="http://127.0.0.1:1/", http_zone="FR", http_token_env="NOPE_TOKEN"))
    assert err.value.key == "energy.carbon.http_token_env"
