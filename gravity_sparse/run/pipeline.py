"""The pipeline configuration: one YAML file (`pipelines/*.yaml`) with a section per stage.

Every stage command reads the same file, so `gravity-sparse solve -c pipelines/tiny.yaml solve.density=0.2`
and `gravity-sparse run pipelines/tiny.yaml` agree on everything. The resolved config is written into every
stage folder's meta.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.experiments.sweep.config import SweepConfig
from gravity_sparse.qubo.registry import METHODS
from gravity_sparse.stages.s1_measure.config import MeasureConfig
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s3_apply.config import ApplyConfig
from gravity_sparse.stages.s4_heal.config import HealConfig
from gravity_sparse.stages.s5_export.config import ExportConfig
from gravity_sparse.stages.s6_bench.config import BenchConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    path: str | None = field(
        default=None,
        metadata={"help": "model directory; null = the bundled checkpoints/gravity-tiny"},
    )
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda[:N]"}
    )

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise UserError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        """The device; under a launcher, `auto` and `cuda` mean this process's GPU (LOCAL_RANK)."""
        if self.device == "auto":
            return dist.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise UserError(f"model.device {self.device!r} is not a device") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"model.device is {self.device} but no CUDA GPU is available")
        return dist.local_device(dev)


@dataclass
class PipelineConfig:
    run_dir: str = field(
        default="runs/tiny", metadata={"help": "folder holding the NN_stage folders"}
    )
    seed: int = field(default=0, metadata={"help": "seed for everything random"})
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration_text: str = field(
        default="calibration",
        metadata={"help": "text measure runs: a corpus split name or a UTF-8 text file"},
    )
    masks: str = field(
        default="qubo",
        metadata={
            "help": "pattern heal/export/bench use: qubo or a baseline (greedy, window, ...)"
        },
    )
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    solve: SolveConfig = field(default_factory=SolveConfig)
    apply: ApplyConfig = field(default_factory=ApplyConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        if self.masks not in METHODS:
            raise UserError(f"masks must be one of {', '.join(METHODS)}, got {self.masks!r}")
        for name in ("apply", "heal"):
            if getattr(self, name).seq_len > self.measure.seq_len:
                raise UserError(
                    f"{name}.seq_len {getattr(self, name).seq_len} is longer than measure.seq_len "
                    f"{self.measure.seq_len} (the masks cover measure.seq_len tokens)"
                )

    def run_path(self) -> Path:
        return Path(self.run_dir)
