"""The heal stage: LoRA-heal the sparse model, sparse attention active → `04_heal/` (adapter, merged).

Data-parallel under a launcher: every rank trains (Trainer's DDP, or FSDP2 from an accelerate config) and
scores its share of the held-out windows; rank 0 writes the folder. Under FSDP rank 0 alone holds the
merged model and scores the held-out text after healing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.model.io import resolve_model_path
from gravity_sparse.run.artifacts import stage_dirname
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import common

DATA_PARALLEL = True  # every rank of a launcher runs it (runner.run_stage)


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "model": resolve_model_path(cfg.model.path),
        "solve": cfg.run_path() / stage_dirname("solve"),
        "heal": common.text_digest(cfg.heal.text),
        "eval": common.text_digest(cfg.heal.eval_text),
    }


def dense_healed_loss(cfg: PipelineConfig, tok) -> float:
    """Held-out loss of the dense model healed exactly like the sparse one (same seed, data, steps)."""
    from gravity_sparse.stages.s4_heal.heal import heal_model, held_out_loss

    torch.manual_seed(cfg.seed)
    model, _ = common.load(cfg)
    with tempfile.TemporaryDirectory() as scratch:
        peft_model, record = heal_model(model, tok, cfg.heal, Path(scratch), seed=cfg.seed)
    if record["fsdp"]:
        merged = peft_model.merge_and_unload().eval() if peft_model is not None else None
        return dist.broadcast(held_out_loss(merged, tok, cfg.heal) if merged is not None else None)
    return held_out_loss(peft_model.merge_and_unload().eval(), tok, cfg.heal, data_parallel=True)


def run(cfg: PipelineConfig) -> Path:
    from gravity_sparse.model.io import save_model
    from gravity_sparse.model.masks import attach_masks, read_masks
    from gravity_sparse.stages.s4_heal.heal import (
        heal_model,
        held_out_loss,
        save_adapter,
        write_record,
    )
    from gravity_sparse.stages.s4_heal.plots import plot_loss_curve

    t0 = time.time()
    masks = read_masks(common.pattern_file(cfg))
    if cfg.heal.seq_len > masks.max_length:
        raise UserError(
            f"heal.seq_len {cfg.heal.seq_len} exceeds the masks' max_length {masks.max_length}"
        )
    torch.manual_seed(cfg.seed)
    model, tok = common.load(cfg)
    dense = held_out_loss(model, tok, cfg.heal, data_parallel=True)
    attach_masks(model, masks, kernel=cfg.heal.kernel)
    before = held_out_loss(model, tok, cfg.heal, data_parallel=True)
    with (
        common.folder(cfg, "heal", inputs(cfg), t0) as sf,
        tempfile.TemporaryDirectory() as scratch,
    ):
        peft_model, record = heal_model(model, tok, cfg.heal, Path(scratch), seed=cfg.seed)
        merged = None
        if peft_model is not None:  # every rank, or under FSDP rank 0 (the full trained state)
            if sf.writer:
                save_adapter(peft_model, sf.path / "adapter")
            merged = peft_model.merge_and_unload()
            merged.eval()
        if record["fsdp"]:  # only rank 0 holds the whole merged model
            after = held_out_loss(merged, tok, cfg.heal) if merged is not None else None
            after = dist.broadcast(after)
        else:
            after = held_out_loss(merged, tok, cfg.heal, data_parallel=True)
        record.update(
            masks=cfg.masks,
            density=masks.density(),
            heads_kept=masks.heads_kept(),
            heldout_dense=dense,
            heldout_before=before,
            heldout_after=after,
            gap_to_dense_pct=100.0 * (after - dense) / dense,
        )
        if cfg.heal.dense_reference:
            ref = dense_healed_loss(cfg, tok)
            record.update(
                heldout_dense_healed=ref,
                gap_to_dense_healed_pct=100.0 * (after - ref) / ref,
            )
        sf.summary.update({k: v for k, v in record.items() if k != "log_history"})
        if sf.writer:
            save_model(merged, tok, sf.path / "merged")
            write_record(record, sf.path / "heal.json")
            plot_loss_curve(record["log_history"], sf.path / "loss_curve.png")
    return sf.final
