"""Grafana provisioning files beside the dashboard: valid, pointing at a Prometheus data source and at a
directory of dashboard files, and the dashboard's panels querying only series Wattlane's registry defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from scheduler.energy.metrics import WattlaneMetrics

DASHBOARDS = Path(__file__).resolve().parents[3] / "dashboards"
PROVISIONING = DASHBOARDS / "provisioning"
#: the sample names each metric type exposes (a counter family "x" is scraped as "x_total")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "summary": ("", "_sum", "_count")}


def defined_series() -> set[str]:
    """Every series name the registry can expose, whether or not it has samples yet."""
    names = set()
    for family in WattlaneMetrics().registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def dashboard() -> dict:
    return json.loads((DASHBOARDS / "wattlane-grafana.json").read_text())


def test_datasource_provisioning_is_a_default_prometheus_source():
    doc = yaml.safe_load((PROVISIONING / "datasources" / "wattlane.yaml").read_text())
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["isDefault"] is True
    assert re.match(r"^https?://", ds["url"]) and ds["uid"]
    # the dashboard's data source variable selects sources of this type
    variable = next(v for v in dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == ds["type"]


def test_dashboard_provider_loads_files_from_one_directory():
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "wattlane.yaml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    assert provider["folder"] and provider["updateIntervalSeconds"] > 0


def test_panels_are_well_formed_and_query_only_defined_series():
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    defined = defined_series()
    used = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            for var in re.findall(r"\$(?!__)(\w+)", t["expr"]):
                assert var in variables, f"{p['title']}: ${var} is not a dashboard variable"
            used.update(re.findall(r"\bwattlane_[a-z0-9_]+", t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            used.update(re.findall(r"\bwattlane_[a-z0-9_]+", v["definition"]))
    assert used - defined == set(), f"the dashboard queries series metrics.py does not define: {used - defined}"
    # the savings and budget panels are there, and query the series made for them
    titles = {p["title"]: p for p in dash["panels"]}
    for title in ("Energy saved (estimate)", "Energy saved per team (J/s = W)", "Energy saved per model (J/s = W)",
                  "Energy saved per API key over the range", "Budget used (share of the current period)"):
        assert title in titles, title
    assert "wattlane_budget_used_ratio" in titles["Budget used (share of the current period)"]["targets"][0]["expr"]
    assert "wattlane_savings_baseline_joules_total" in titles["Energy saved per team (J/s = W)"]["targets"][0]["expr"]


def test_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
