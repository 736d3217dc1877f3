"""The Comfy Registry's own check of the pack (`comfy node validate`: pyproject [tool.comfy] and security lint)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_comfy_node_validate_passes_offline():
    comfy = shutil.which("comfy")
    if comfy is None:
        pytest.skip("comfy-cli is not installed (pip install -r requirements-dev.txt)")
    proc = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "All validation checks passed" in out, out[-3000:]
    assert "warning" not in out.lower(), out[-3000:]
