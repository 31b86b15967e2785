"""Several processes for the tests: the real launchers (torchrun, accelerate launch) on CPU with gloo.

Tests import these like tiny_models (`from launchers import ...`). Every launch is `python -m` of the
launcher's module with this interpreter, so it finds the venv's torch, accelerate and gravity_sparse
wherever the suite runs (the repository root goes on PYTHONPATH). Children get OMP_NUM_THREADS=1, so two
ranks share a 2-core machine without oversubscribing it, and the single-process references run the same
way (same thread count, so the same float arithmetic).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from tiny_models import tiny_model

from gravity_sparse import save_model
from gravity_sparse.model.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
GRAVITY = ["-m", "gravity_sparse"]
LAUNCHER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in LAUNCHER_ENV:
        env.pop(key, None)  # a launcher sets these; none may leak in from the test process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        GRAVITY_SPARSE_DIST_TIMEOUT="120",
    )
    env.update(extra)
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m gravity_sparse ARGS` (a free port of its own)."""
    return [*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), *GRAVITY, *args]


def accelerate_launch(nproc: int, *args: str) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N -m gravity_sparse ARGS`.

    `--multi_gpu` is accelerate's several-process launcher (torchrun inside) on any machine; without a GPU
    the ranks join with gloo. (`--cpu` would start one process: accelerate runs multi-CPU jobs via mpirun.)
    """
    return [
        *ACCELERATE,
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        *GRAVITY,
        *args,
    ]


def single(*args: str) -> list[str]:
    """The same command in one plain process."""
    return [sys.executable, *GRAVITY, *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """Run a command from the repository root; a failure shows the end of its output."""
    proc = subprocess.run(
        cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def small_pipeline(root: Path, **sections: dict) -> Path:
    """A tiny model and a pipeline YAML sized for seconds per stage; returns the YAML's path."""
    model_dir = root / "model"
    if not model_dir.exists():
        save_model(tiny_model(seed=5), build_tokenizer(), model_dir)
    cfg = {
        "run_dir": str(root / "run"),
        "model": {"path": str(model_dir), "device": "cpu"},
        "measure": {
            "seq_len": 64,
            "block_size": 16,
            "num_sequences": 8,
            "batch_size": 2,
            "importance": "both",
            "ablation_sequences": 4,
            "plots": False,
            "progress": False,
        },
        "solve": {"density": 0.5, "head_drop": 0.25, "num_sweeps": 100, "exact_layers": 0},
        "apply": {"seq_len": 64, "max_tokens": 512},
        "heal": {
            "seq_len": 64,
            "batch_size": 4,
            "token_budget": 4 * 64 * 4,
            "eval_every": 2,
            "eval_max_tokens": 512,
            "eval_batch_size": 2,
            "lora_r": 4,
            "lora_alpha": 8,
            "lr": 0.005,
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def copy_run(src: Path, dst: Path, stages: tuple[str, ...]) -> None:
    """The finished folders `stages` of run `src` into run `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in stages:
        shutil.copytree(src / name, dst / name)


def leftovers(run_dir: Path) -> list[str]:
    """Temporary stage folders (`.NN_stage.tmp-PID`) left in a run folder."""
    return sorted(p.name for p in run_dir.glob(".*.tmp-*"))
