"""The README's first command, as a user runs it: a local GPU cluster, the operator, the
examples Ready on GPU nodes, a real model answering from each pod, then a clean stop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from modelyard.operator.devcluster import ensure_binaries

ROOT = Path(__file__).resolve().parents[2]


def test_dev_up_serves_the_example_from_gpu_nodes(tmp_path: Path) -> None:
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
    answers = [line for line in out.splitlines() if "answered from pod vision/resnet-v1-" in line]
    assert len(answers) == 2, out  # a real runtime process behind each pod, on its own IP
    assert all(re.search(r" on node gpu-h100-\d at 10\.2\d\d\.\d+\.\d+:8080 ", line)
               for line in answers), answers
    tops = {line.split("top classes ")[1] for line in answers}
    assert len(tops) == 1, answers  # the same deterministic model answers the same
    assert (state / "models" / "resnet" / "1" / "model.pt2").exists()  # a torch.export program
    assert f"export KUBECONFIG={state / 'cluster' / 'kubeconfig'}" in out
    assert not (state / "cluster").exists()  # stopped cleanly, nothing left behind
