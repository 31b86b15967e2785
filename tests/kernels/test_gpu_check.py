"""benchmarks/gpu_check.sh --smoke: the first-GPU-hour script runs end to end on CPU (toy sizes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_smoke_mode_writes_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{summary}"
    for name in ("environment", "compile check sm_90a", "bench_attention (smoke)"):
        assert f"| {name} | ok |" in summary, summary
    for name in ("pytest -m gpu tests/kernels", "gravity2 whole-model bench"):
        assert f"| {name} | skipped" in summary, summary
    env_txt = (out / "env.txt").read_text()
    assert "torch " in env_txt and "triton " in env_txt and "git: " in env_txt
    assert (out / "bench-attention.json").exists() and (out / "bench-attention.md").exists()
    assert "| sm_90 | fwd |" in (out / "compile.md").read_text()
    assert "bench_attention.py --seq-lens 8192 32768" in SCRIPT.read_text()  # the real run's sizes
