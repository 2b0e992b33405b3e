"""Grid carbon intensity for a time and place, and the grams of CO2e a number of joules meant.

gco2e = joules / 3.6e6 x PUE x intensity (g/kWh). Providers, chosen by energy.carbon.provider:
- codecarbon: codecarbon's bundled offline data (no network): a country's yearly mix by ISO alpha-3
  code, a sub-national region where codecarbon has one (US states, Canadian provinces, Chinese
  provinces, Nordic bidding zones), or a cloud provider's region (codecarbon ships GCP's figures);
- fixed: one configured value;
- csv: an hourly time series (columns timestamp, intensity_gco2e_per_kwh), the hour in force;
- http: an Electricity Maps-style endpoint (off unless chosen), cached, falling back to the last
  good value or a configured value and saying so in `source`.
Every result names its source and region. An unknown country or region is a ConfigError, never a
silent world average (codecarbon's own fallback).
"""

from __future__ import annotations

import abc
import bisect
import csv
import difflib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from scheduler.config_error import ConfigError

if TYPE_CHECKING:
    from scheduler.config import CarbonConfig

JOULES_PER_KWH = 3.6e6


class CarbonDataError(ValueError):
    """Intensity is not available for the asked time (outside a time series, provider down)."""


@dataclass(frozen=True)
class CarbonIntensity:
    gco2e_per_kwh: float
    #: where the figure came from, e.g. "codecarbon:global-energy-mix-2023", "csv:grid.csv"
    source: str
    #: e.g. "FRA", "USA/california", "gcp/europe-west1", an Electricity Maps zone
    region: str


@dataclass(frozen=True)
class CarbonFootprint:
    """What usage.carbon reports for one request."""

    gco2e: float
    intensity_gco2e_per_kwh: float
    pue: float
    source: str
    region: str

    def as_usage(self) -> dict[str, object]:
        return {
            "gco2e": self.gco2e,
            "intensity_gco2e_per_kwh": self.intensity_gco2e_per_kwh,
            "pue": self.pue,
            "source": self.source,
            "region": self.region,
        }


def gco2e(joules: float, pue: float, intensity_gco2e_per_kwh: float) -> float:
    """Grams of CO2e for energy measured at the device, scaled to the facility by PUE."""
    return joules / JOULES_PER_KWH * pue * intensity_gco2e_per_kwh


def _unix_seconds(at: float | datetime | None) -> float:
    if at is None:
        return time.time()
    if isinstance(at, datetime):
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        return at.timestamp()
    return float(at)


class CarbonProvider(abc.ABC):
    """Intensity for a time; footprint() turns joules into a CarbonFootprint."""

    def __init__(self, pue: float = 1.0):
        if not (1.0 <= pue <= 3.0):
            raise ConfigError(f"pue {pue} is outside [1, 3]", key="energy.carbon.pue", fix="use the facility's PUE, e.g. 1.1-1.6")
        self.pue = pue

    @abc.abstractmethod
    def intensity(self, at: float | datetime | None = None) -> CarbonIntensity:
        """The intensity in force at `at` (unix seconds or datetime; None: now)."""

    #: intensity() never does I/O (the data is in memory): the serving path may call it on its event loop
    in_memory = False

    def cached_intensity(self, at: float | datetime | None = None) -> CarbonIntensity | None:
        """intensity(at) if it is known without I/O, else None (then call intensity() off the event loop)."""
        return self.intensity(at) if self.in_memory else None

    def footprint_cached(self, joules: float, at: float | datetime | None = None) -> CarbonFootprint | None:
        """footprint() when it needs no I/O (see cached_intensity), else None."""
        ci = self.cached_intensity(at)
        return None if ci is None else self._footprint(joules, ci)

    def footprint(self, joules: float, at: float | datetime | None = None) -> CarbonFootprint:
        return self._footprint(joules, self.intensity(at))

    def _footprint(self, joules: float, ci: CarbonIntensity) -> CarbonFootprint:
        return CarbonFootprint(
            gco2e=gco2e(joules, self.pue, ci.gco2e_per_kwh),
            intensity_gco2e_per_kwh=ci.gco2e_per_kwh,
            pue=self.pue,
            source=ci.source,
            region=ci.region,
        )


class FixedIntensity(CarbonProvider):
    in_memory = True

    def __init__(self, gco2e_per_kwh: float, *, region: str = "fixed", pue: float = 1.0):
        super().__init__(pue)
        if not (gco2e_per_kwh >= 0 and math.isfinite(gco2e_per_kwh)):
            raise ConfigError(f"intensity {gco2e_per_kwh} is not a non-negative number", key="energy.carbon.intensity_gco2e_per_kwh", fix="give grams CO2e per kWh, e.g. 400")
        self._value = CarbonIntensity(float(gco2e_per_kwh), "fixed", region)

    def intensity(self, at: float | datetime | None = None) -> CarbonIntensity:
        return self._value


# --- codecarbon's bundled data ------------------------------------------------------------------

#: countries for which codecarbon 3.x ships sub-national data
_CODECARBON_REGIONAL = ("USA", "CAN", "CHN", "SWE", "NOR", "FIN")


def _suggest(value: str, valid: list[str], n: int = 8) -> str:
    close = difflib.get_close_matches(value, valid, n=4, cutoff=0.5)
    shown = close or valid[:n]
    return ", ".join(shown)


def codecarbon_regions(country_iso3: str) -> list[str]:
    """The sub-national regions codecarbon has data for in a country (lower case, as it wants)."""
    from codecarbon.input import DataSource

    ds = DataSource()
    code = country_iso3.upper()
    if code == "USA":
        return sorted(k for k in ds.get_country_emissions_data("usa") if not k.startswith("_"))
    if code == "CAN":
        return sorted(ds.get_country_energy_mix_data("can"))
    if code == "CHN":
        return sorted(n for p in ds.get_china_provincial_emissions_data()["data"].values() for n in p["names"])
    if code in ("SWE", "NOR", "FIN"):
        prefix = {"SWE": "SE", "NOR": "NO", "FIN": "FI"}[code]
        return sorted(z for z in ds.get_nordic_country_energy_mix_data()["data"] if z.startswith(prefix))
    return []


class CodecarbonIntensity(CarbonProvider):
    """A country's (or sub-national region's) yearly average from codecarbon's offline data."""

    in_memory = True

    def __init__(self, country: str, region: str | None = None, *, pue: float = 1.0):
        super().__init__(pue)
        from codecarbon.core.emissions import Emissions
        from codecarbon.core.units import Energy
        from codecarbon.external.geography import GeoMetadata
        from codecarbon.input import DataSource

        ds = DataSource()
        mix = ds.get_global_energy_mix_data()
        code = (country or "").strip().upper()
        if code not in mix:
            raise ConfigError(
                f"country '{country}' is not in codecarbon's data",
                key="energy.carbon.country",
                fix=f"use an ISO 3166 alpha-3 code, e.g. {_suggest(code, sorted(mix))}",
            )
        region_label = code
        if region:
            valid = codecarbon_regions(code)
            wanted = region.strip()
            match = next((v for v in valid if v.lower() == wanted.lower()), None)
            if not valid:
                raise ConfigError(
                    f"codecarbon has no sub-national data for {code}",
                    key="energy.carbon.region",
                    fix=f"remove region (country-level data is used), or use a country with regions: {', '.join(_CODECARBON_REGIONAL)}",
                )
            if match is None:
                raise ConfigError(
                    f"region '{region}' is not in codecarbon's data for {code}",
                    key="energy.carbon.region",
                    fix=f"use one of: {_suggest(wanted.lower(), valid)}",
                )
            region_label = f"{code}/{match}"
            geo = GeoMetadata(country_iso_code=code, region=match)
            kg_per_kwh = Emissions(ds).get_region_emissions(Energy.from_energy(kWh=1.0), geo)
            source = "codecarbon:regional"
        else:
            geo = GeoMetadata(country_iso_code=code, country_name=mix[code].get("country_name"))
            kg_per_kwh = Emissions(ds).get_country_emissions(Energy.from_energy(kWh=1.0), geo)
            year = mix[code].get("year")
            source = f"codecarbon:global-energy-mix{'-' + str(year) if year else ''}"
        self._value = CarbonIntensity(float(kg_per_kwh) * 1000.0, source, region_label)

    def intensity(self, at: float | datetime | None = None) -> CarbonIntensity:
        return self._value


class CodecarbonCloudIntensity(CarbonProvider):
    """A cloud provider region's figure from codecarbon's bundled impact table."""

    in_memory = True

    def __init__(self, provider: str, region: str, *, pue: float = 1.0):
        super().__init__(pue)
        from codecarbon.input import DataSource

        df = DataSource().get_cloud_emissions_data()
        prov = provider.strip().lower()
        providers = sorted(str(p) for p in df["provider"].unique())
        if prov not in providers:
            raise ConfigError(
                f"cloud provider '{provider}' has no carbon data in codecarbon",
                key="energy.carbon.cloud_provider",
                fix=f"use one of: {', '.join(providers)}; or set country (and region) instead",
            )
        rows = df[(df["provider"] == prov) & (df["region"] == region.strip())]
        if len(rows) != 1:
            valid = sorted(str(r) for r in df[df["provider"] == prov]["region"])
            raise ConfigError(
                f"cloud region '{region}' of {prov} is not in codecarbon's data",
                key="energy.carbon.cloud_region",
                fix=f"use one of: {_suggest(region.strip(), valid)}",
            )
        self._value = CarbonIntensity(float(rows["impact"].item()), f"codecarbon:cloud-{prov}", f"{prov}/{region.strip()}")

    def intensity(self, at: float | datetime | None = None) -> CarbonIntensity:
        return self._value


# --- hourly CSV time series ---------------------------------------------------------------------


def _parse_timestamp(text: str) -> datetime:
    dt = datetime.fromisoformat(text.strip())
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


class CsvIntensity(CarbonProvider):
    """The hour in force from a time series file: columns timestamp (ISO 8601), intensity_gco2e_per_kwh.

    A row applies from its timestamp until the next row; the last row for one hour. Naive
    timestamps are UTC. Asking for a time outside the series raises CarbonDataError.
    """

    in_memory = True

    KEY = "energy.carbon.csv_path"

    def __init__(self, path: str | os.PathLike[str], *, region: str | None = None, pue: float = 1.0):
        super().__init__(pue)
        self.path = Path(path)
        times, values = self._load(self.path)
        self._times = times
        self._values = values
        self._end_s = times[-1] + 3600.0
        self._source = f"csv:{self.path.name}"
        self._region = region or f"csv:{self.path.stem}"

    @classmethod
    def _load(cls, path: Path) -> tuple[list[float], list[float]]:
        if not path.is_file():
            raise ConfigError(f"file not found: {path}", key=cls.KEY, fix="point csv_path at an existing CSV file")
        rows: list[tuple[float, float]] = []
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                need = {"timestamp", "intensity_gco2e_per_kwh"}
                if reader.fieldnames is None or not need <= {h.strip() for h in reader.fieldnames}:
                    raise ConfigError(
                        f"{path}: header must have columns timestamp and intensity_gco2e_per_kwh, found {reader.fieldnames}",
                        key=cls.KEY, fix="write a header line: timestamp,intensity_gco2e_per_kwh",
                    )
                for row in reader:
                    row = {k.strip(): v for k, v in row.items() if k is not None}
                    line = reader.line_num
                    try:
                        t = _parse_timestamp(row["timestamp"] or "").timestamp()
                    except ValueError:
                        raise ConfigError(f"{path} line {line}: timestamp {row['timestamp']!r} is not ISO 8601", key=cls.KEY, fix="use e.g. 2024-01-31T13:00:00Z") from None
                    try:
                        v = float(row["intensity_gco2e_per_kwh"] or "")
                    except ValueError:
                        v = float("nan")
                    if not (math.isfinite(v) and v >= 0):
                        raise ConfigError(f"{path} line {line}: intensity {row['intensity_gco2e_per_kwh']!r} is not a non-negative number", key=cls.KEY, fix="give grams CO2e per kWh")
                    rows.append((t, v))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"{path} cannot be read: {exc}", key=cls.KEY, fix="check the file and its encoding (UTF-8 CSV)") from None
        if not rows:
            raise ConfigError(f"{path} has no data rows", key=cls.KEY, fix="add hourly rows")
        rows.sort()
        for (a, _), (b, _) in zip(rows, rows[1:]):
            if a == b:
                raise ConfigError(
                    f"{path}: timestamp {datetime.fromtimestamp(a, timezone.utc).isoformat()} appears twice",
                    key=cls.KEY, fix="keep one row per hour",
                )
        return [r[0] for r in rows], [r[1] for r in rows]

    def intensity(self, at: float | datetime | None = None) -> CarbonIntensity:
        t = _unix_seconds(at)
        i = bisect.bisect_right(self._times, t) - 1
        if i < 0 or t >= self._end_s:
            first = datetime.fromtimestamp(self._times[0], timezone.utc).isoformat()
            last = datetime.fromtimestamp(self._end_s, timezone.utc).isoformat()
            raise CarbonDataError(f"{self.path.name} covers {first} to {last}; no intensity for {datetime.fromtimestamp(t, timezone.utc).isoformat()}")
        return CarbonIntensity(self._values[i], self._source, self._region)


# --- live HTTP provider -------------------------------------------------------------------------


class HttpIntensity(CarbonProvider):
    """Electricity Maps-style live intensity: GET url?zone=ZONE -> {"carbonIntensity": g/kWh, ...}.

    Cached for cache_seconds. On failure: the last good value (source says "stale"), else the
    configured fallback (source says "fallback"), else CarbonDataError. After a failure it waits
    retry_seconds before asking again, so a dead endpoint costs one timeout, not one per request.
    The fetch is synchronous (httpx, timeout_seconds): call footprint() off the event loop.
    """

    def __init__(
        self,
        url: str,
        zone: str,
        *,
        token: str | None = None,
        cache_seconds: float = 300.0,
        fallback_gco2e_per_kwh: float | None = None,
        timeout_seconds: float = 2.0,
        retry_seconds: float = 10.0,
        pue: float = 1.0,
    ):
        super().__init__(pue)
        self.url, self.zone = url, zone
        self.cache_seconds = cache_seconds
        self.retry_seconds = min(retry_seconds, cache_seconds)
        self.fallback = fallback_gco2e_per_kwh
        headers = {"auth-token": token} if token else {}
        self._client = httpx.Client(timeout=timeout_seconds, headers=headers)
        self._lock = threading.Lock()
        self._good: CarbonIntensity | None = None
        self._good_at_unix_s = 0.0
        self._fresh_until = 0.0  # monotonic
        self._served: CarbonIntensity | None = None

    def _fetch(self) -> CarbonIntensity:
        r = self._client.get(self.url, params={"zone": self.zone})
        r.raise_for_status()
        body = r.json()
        value = float(body["carbonIntensity"])
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"carbonIntensity {value} is not a non-negative number")
        return CarbonIntensity(value, "electricitymaps", str(body.get("zone") or self.zone))

    def cached_intensity(self, at: float | datetime | None = None) -> CarbonIntensity | None:
        """The value intensity() would serve without asking the endpoint, or None when it would ask."""
        if not self._lock.acquire(blocking=False):  # a refresh is under way: wait for it off the loop
            return None
        try:
            return self._served if self._served is not None and time.monotonic() < self._fresh_until else None
        finally:
            self._lock.release()

    def intensity(self, at: float | datetime | None = None) -> CarbonIntensity:
        """The latest value (a live provider has no history; `at` is ignored)."""
        with self._lock:
            now = time.monotonic()
            if self._served is not None and now < self._fresh_until:
                return self._served
            try:
                ci = self._fetch()
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                reason = f"{type(exc).__name__}: {exc}"[:200]
                self._fresh_until = now + self.retry_seconds
                if self._good is not None:
                    when = datetime.fromtimestamp(self._good_at_unix_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                    self._served = CarbonIntensity(self._good.gco2e_per_kwh, f"electricitymaps (stale, from {when}; refresh failed: {reason})", self._good.region)
                elif self.fallback is not None:
                    self._served = CarbonIntensity(self.fallback, f"fallback (electricitymaps failed: {reason})", self.zone)
                else:
                    self._served = None
                    raise CarbonDataError(f"live carbon intensity for zone {self.zone} unavailable and no fallback configured: {reason}") from None
                return self._served
            self._good = self._served = ci
            self._good_at_unix_s = time.time()
            self._fresh_until = now + self.cache_seconds
            return ci

    def close(self) -> None:
        self._client.close()


# --- factory ------------------------------------------------------------------------------------


#: builds a provider from energy.carbon and the directory relative paths are resolved against
CarbonProviderBuilder = Callable[["CarbonConfig", "Path | None"], CarbonProvider]

#: energy.carbon.provider value -> its builder; the config schema takes its allowed values from here
CARBON_PROVIDERS: dict[str, CarbonProviderBuilder] = {}


def carbon_provider(name: str) -> Callable[[CarbonProviderBuilder], CarbonProviderBuilder]:
    """Decorator: register a builder as energy.carbon.provider `name`."""

    def register(builder: CarbonProviderBuilder) -> CarbonProviderBuilder:
        if name in CARBON_PROVIDERS:
            raise ValueError(f"carbon provider '{name}' is registered twice")
        CARBON_PROVIDERS[name] = builder
        return builder

    return register


@carbon_provider("codecarbon")
def _codecarbon(cfg: CarbonConfig, config_dir: Path | None) -> CarbonProvider:
    # a cloud region when one is named, else a country (and maybe a region)
    if cfg.cloud_provider or cfg.cloud_region:
        if not (cfg.cloud_provider and cfg.cloud_region):
            missing = "cloud_region" if cfg.cloud_provider else "cloud_provider"
            raise ConfigError("cloud data needs both cloud_provider and cloud_region", key=f"energy.carbon.{missing}", fix=f"set {missing} (e.g. cloud_provider gcp, cloud_region europe-west1)")
        return CodecarbonCloudIntensity(cfg.cloud_provider, cfg.cloud_region, pue=cfg.pue)
    if not cfg.country:
        raise ConfigError("provider codecarbon needs a country", key="energy.carbon.country", fix="set an ISO 3166 alpha-3 code, e.g. USA, FRA, DEU")
    return CodecarbonIntensity(cfg.country, cfg.region, pue=cfg.pue)


@carbon_provider("fixed")
def _fixed(cfg: CarbonConfig, config_dir: Path | None) -> CarbonProvider:
    assert cfg.intensity_gco2e_per_kwh is not None
    return FixedIntensity(cfg.intensity_gco2e_per_kwh, region=cfg.region or cfg.country or "fixed", pue=cfg.pue)


@carbon_provider("csv")
def _csv(cfg: CarbonConfig, config_dir: Path | None) -> CarbonProvider:
    assert cfg.csv_path
    p = Path(os.path.expanduser(cfg.csv_path))
    if not p.is_absolute() and config_dir is not None:
        p = config_dir / p
    return CsvIntensity(p, region=cfg.region, pue=cfg.pue)


@carbon_provider("http")
def _http(cfg: CarbonConfig, config_dir: Path | None) -> CarbonProvider:
    assert cfg.http_url and cfg.http_zone
    token = None
    if cfg.http_token_env:
        token = os.environ.get(cfg.http_token_env)
        if not token:
            raise ConfigError(
                f"environment variable {cfg.http_token_env} is not set",
                key="energy.carbon.http_token_env", fix=f"export {cfg.http_token_env}=<your API token>, or remove http_token_env",
            )
    return HttpIntensity(
        cfg.http_url, cfg.http_zone, token=token, cache_seconds=cfg.http_cache_seconds,
        fallback_gco2e_per_kwh=cfg.intensity_gco2e_per_kwh, pue=cfg.pue,
    )


def make_carbon_provider(cfg: CarbonConfig, *, config_dir: str | os.PathLike[str] | None = None) -> CarbonProvider:
    """The provider energy.carbon asks for; raises ConfigError naming the key and the fix."""
    builder = CARBON_PROVIDERS.get(cfg.provider)
    if builder is None:
        raise ConfigError(f"unknown carbon provider '{cfg.provider}'", key="energy.carbon.provider",
                          fix=f"use one of: {', '.join(CARBON_PROVIDERS)}")
    return builder(cfg, Path(config_dir) if config_dir is not None else None)
