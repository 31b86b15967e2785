"""The export's parity check in a Python without gravity_sparse: plain transformers, trust_remote_code."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from gravity_sparse.errors import UserError


def plain_transformers_parity(model_dir: Path, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |Δlogit| of the export loaded by plain transformers in a process without gravity_sparse."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"x": x, "ref": ref}, Path(tmp) / "io.pt")
        code = textwrap.dedent(f"""
            import sys
            sys.modules["gravity_sparse"] = None
            import torch
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
            d = torch.load({str(Path(tmp) / "io.pt")!r})
            with torch.no_grad():
                print((m(d["x"]).logits.float() - d["ref"]).abs().max().item())
        """)
        env = {
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(Path(tmp) / "modules"),
            "PATH": "/usr/bin:/bin",
        }
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, env=env
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the exported model does not load in plain transformers: {last}")
    return float(proc.stdout.strip().splitlines()[-1])
