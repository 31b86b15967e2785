"""The pipeline configuration: one YAML file (`pipelines/*.yaml`) with a section per stage.

Every stage command reads the same file, so `gravity-sparse solve -c pipelines/tiny.yaml solve.density=0.2`
and `gravity-sparse run pipelines/tiny.yaml` agree on everything. The resolved config is written into every
stage folder's meta.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

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
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise UserError(f"model.device {self.device!r} is not a device") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"model.device is {self.device} but no CUDA GPU is available")
        return dev


@dataclass
class PipelineConfig:
    run_dir: str = field(
        default="runs/tiny", metadata={"help": "folder holding the NN_stage folders"}
    )
    seed: int = field(default=0, metadata={"help": "seed for everything random"})
    model: ModelConfig = field(default_factory=ModelConfig)

    def run_path(self) -> Path:
        return Path(self.run_dir)
