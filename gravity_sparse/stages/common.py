"""What the stage runners share: the model and its tokenizer, texts, the chosen masks file, the cache key.

A stage reads only the folders of earlier stages and writes its own `RUN/NN_stage/` atomically
(`run.artifacts.stage_folder`). `section(cfg, stage)` is the part of the config a stage depends on (what
its cache key hashes); a stage's `inputs(cfg)` names the files it reads.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from gravity_sparse.errors import UserError
from gravity_sparse.run.artifacts import StageFolder, require_stage, stage_folder
from gravity_sparse.run.config import config_to_dict
from gravity_sparse.run.pipeline import PipelineConfig


def text_digest(source: str) -> str:
    """A corpus split or text file by the sha256 of its text (an input hash that ignores where it lives)."""
    from gravity_sparse.model.data import resolve_text

    return "sha256:" + hashlib.sha256(resolve_text(source).encode("utf-8")).hexdigest()


def load(cfg: PipelineConfig, path: str | Path | None = None):
    """The model (at `path`, default the config's) and its tokenizer; a one-line error without one."""
    from gravity_sparse.model.io import load_model, require_tokenizer

    path = path if path is not None else cfg.model.path
    model, tok = load_model(path, dtype=cfg.model.torch_dtype(), device=cfg.model.torch_device())
    return model, require_tokenizer(tok, path)


def tokens(tok, source: str) -> torch.Tensor:
    """Ids of a corpus split or text file through the model's own tokenizer."""
    from gravity_sparse.model.data import encode_text, resolve_text

    return encode_text(tok, resolve_text(source))


def pattern_file(cfg: PipelineConfig) -> Path:
    """The masks file of the pattern `cfg.masks` (qubo or a baseline) in the solve folder.

    Chosen by the method each file stores in its metadata, not by its name.
    """
    from gravity_sparse.model.masks import read_masks_method
    from gravity_sparse.qubo.registry import method_label

    solve_dir = require_stage(cfg.run_path(), "solve")
    found = {}
    for path in sorted(solve_dir.glob("masks*.safetensors")):
        found.setdefault(method_label(read_masks_method(path)), path)
    if cfg.masks not in found:
        raise UserError(
            f"{solve_dir} has no masks of method {cfg.masks!r} (it has: {', '.join(found) or 'none'})"
        )
    return found[cfg.masks]


def section(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The part of the config a stage depends on (what its cache key hashes)."""
    full = config_to_dict(cfg)
    common = {"model": full["model"], "seed": cfg.seed}
    if stage == "measure":
        part = {"calibration_text": cfg.calibration_text, **full["measure"]}
    else:
        part = dict(full.get(stage, {}))
    if stage == "solve" and part.get("eps") is None:
        part.pop("eps", None)  # the model's ε: hashed through the model, not the config
    if stage in ("heal", "export", "bench"):
        common["masks"] = cfg.masks
    return {**common, stage: part}


def folder(
    cfg: PipelineConfig, stage: str, inputs: dict[str, Any], started: float | None = None
) -> AbstractContextManager[StageFolder]:
    """`stage_folder` for a stage of this pipeline: its config section and inputs, hashed into meta.json."""
    return stage_folder(
        cfg.run_path(),
        stage,
        config=section(cfg, stage),
        inputs=inputs,
        started=time.time() if started is None else started,
    )
