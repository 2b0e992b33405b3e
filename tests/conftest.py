"""Suite-wide rule: in CI (CI=true) a skipped, xfailed or xpassed test is a failure, unless it is marked `gpu`.

A skip hides a missing tool, data file or package; locally that is a convenience, in CI it would let
a run pass without testing what it claims to. Only hardware CI cannot have (`@pytest.mark.gpu`) may
skip there. Skips raised while collecting a module (module-level pytest.importorskip or
pytest.skip(allow_module_level=True)) fail the collection the same way.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]

CI_TRUE_VALUES = ("1", "true", "yes")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_TRUE_VALUES


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; the only tests allowed to skip in CI (CI=true)")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}" if report.skipped else f"xpass (marked xfail: {report.wasxfail})"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _skip_reason(report)
    if hasattr(report, "wasxfail"):
        del report.wasxfail
    report.outcome = "failed"
    report.longrepr = (
        f"not run in CI ({reason}). In CI (CI=true) only tests marked @pytest.mark.gpu may skip: "
        "install what the test needs or make the test run without it."
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if in_ci() and item.get_closest_marker("gpu") is None:
        if report.skipped or (report.passed and hasattr(report, "wasxfail")):
            _fail_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if in_ci() and report.skipped:
        _fail_in_ci(report)
    return report
