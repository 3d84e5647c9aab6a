"""The README's first command, as a user runs it: a local GPU cluster, the operator and the
examples Ready, then a clean stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modelyard.operator.devcluster import ensure_binaries

ROOT = Path(__file__).resolve().parents[2]


def test_dev_up_brings_the_examples_to_ready_on_gpu_nodes(tmp_path: Path) -> None:
    ensure_binaries()  # a cold build is not part of this test's budget
    state = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-m", "modelyard.operator.cli", "dev", "up", "--exit-when-ready",
         "--state-dir", str(state), "--timeout", "120"],
        cwd=ROOT, capture_output=True, text=True, timeout=400, check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "every ModelDeployment is Ready" in out
    assert "modeldeployment.modelyard.dev/resnet created" in out
    pod_lines = [line for line in out.splitlines()
                 if line.startswith("vision") and "resnet-v1-" in line]
    assert len(pod_lines) == 2, out
    assert all("gpu-h100-" in line for line in pod_lines), pod_lines
    assert f"export KUBECONFIG={state / 'cluster' / 'kubeconfig'}" in out
    assert not (state / "cluster").exists()  # stopped cleanly, nothing left behind
