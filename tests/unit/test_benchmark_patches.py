"""The measurement patches of benchmarks/gateway_floor still apply to this tree: a patch that no longer applies
cannot reproduce the figures docs/results/gateway-overhead-floor.md gives."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from scheduler.datafiles import REPOSITORY_DIR

PATCHES = sorted((REPOSITORY_DIR / "benchmarks" / "gateway_floor").glob("*.patch"))


def test_the_floor_patches_are_there() -> None:
    assert [p.name for p in PATCHES] == ["energy_notices.patch", "no_accounting.patch", "no_energy_wait.patch"]


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_a_floor_patch_applies_to_this_tree(patch: Path) -> None:
    if shutil.which("git") is None or not (REPOSITORY_DIR / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository (git apply --check)")
    done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPOSITORY_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
