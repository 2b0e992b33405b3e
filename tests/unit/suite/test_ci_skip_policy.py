"""The suite's own rule (tests/conftest.py): in CI a skip, xfail or xpass fails unless the test is marked gpu."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[2] / "conftest.py"

TESTS = """
import pytest

def test_passes():
    pass

def test_skips_in_body():
    pytest.skip("prometheus is not installed")

@pytest.mark.skipif(True, reason="shared data missing")
def test_skipif_mark():
    pass

@pytest.fixture
def needs_tool():
    pytest.skip("chromium is not installed")

def test_skips_in_fixture(needs_tool):
    pass

@pytest.mark.xfail(reason="known flaky")
def test_xfails():
    assert False

@pytest.mark.xfail(reason="was broken once")
def test_xpasses():
    pass

def test_importorskip_in_body():
    pytest.importorskip("a_module_that_is_not_installed")

@pytest.mark.gpu
def test_gpu_only():
    pytest.skip("no NVIDIA GPU on this machine")
"""

MODULE_LEVEL_SKIP = """
import pytest
pytest.importorskip("another_module_that_is_not_installed")

def test_never_collected():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_mixed=TESTS)
    return pytester


def test_outside_ci_skips_stay_skips(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest("-rsxX")
    result.assert_outcomes(passed=1, skipped=5, xfailed=1, xpassed=1)
    result.stdout.fnmatch_lines(["*SKIPPED*prometheus is not installed*"])


@pytest.mark.parametrize("ci_value", ["true", "1"])
def test_in_ci_every_skip_fails_except_gpu(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci_value: str) -> None:
    monkeypatch.setenv("CI", ci_value)
    result = suite.runpytest("-rfEsxX")
    # body skips, xfail and xpass fail in the call phase; skipif marks and fixture skips error in setup
    result.assert_outcomes(passed=1, failed=4, errors=2, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    for name in ("test_skips_in_body", "test_xfails", "test_xpasses", "test_importorskip_in_body"):
        result.stdout.fnmatch_lines([f"FAILED test_mixed.py::{name}*"])
    for name in ("test_skipif_mark", "test_skips_in_fixture"):
        result.stdout.fnmatch_lines([f"ERROR test_mixed.py::{name}*"])
    result.stdout.fnmatch_lines(["*not run in CI (*prometheus is not installed)*", "*not run in CI (xfail: known flaky)*",
                                 "*SKIPPED*no NVIDIA GPU on this machine*"])


def test_in_ci_a_module_level_skip_fails_collection(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_module_skip=MODULE_LEVEL_SKIP)
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest().assert_outcomes(skipped=1)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*not run in CI (*another_module_that_is_not_installed*"])


def test_false_ci_values_do_not_turn_skips_into_failures(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "false")
    suite.runpytest().assert_outcomes(passed=1, skipped=5, xfailed=1, xpassed=1)
