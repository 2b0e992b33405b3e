"""With telemetry off (the default) the gateway's modules load no OpenTelemetry code of Wattlane's."""

from __future__ import annotations

import subprocess
import sys


def test_the_serving_path_imports_no_telemetry_module_when_telemetry_is_off():
    code = (
        "import sys\n"
        "import scheduler.api.gateway, scheduler.api.accounting, scheduler.api.serving, scheduler.api.app\n"
        "print(sorted(m for m in sys.modules if m.startswith('scheduler.telemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
