"""The export stage: the healed model pruned to its kept heads, parity-checked → `05_export/model/`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from gravity_sparse.errors import UserError
from gravity_sparse.run.artifacts import require_stage, stage_dirname
from gravity_sparse.run.config import config_to_dict
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import common


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    run = cfg.run_path()
    return {"heal": run / stage_dirname("heal"), "solve": run / stage_dirname("solve")}


def run(cfg: PipelineConfig, overwrite: bool = False) -> Path:
    from gravity_sparse.kernels import Backend
    from gravity_sparse.model.data import token_blocks
    from gravity_sparse.model.io import save_model
    from gravity_sparse.model.masks import attach_masks, read_masks
    from gravity_sparse.stages.s5_export.export import model_costs, prune_model
    from gravity_sparse.stages.s5_export.parity import plain_transformers_parity

    t0 = time.time()
    heal_dir = require_stage(cfg.run_path(), "heal")
    masks = read_masks(common.pattern_file(cfg))
    target = Path(cfg.export.dir) if cfg.export.dir else None
    if target is not None and target.exists() and not overwrite:
        raise UserError(f"export directory {target} already exists (use --overwrite to replace it)")
    healed, tok = common.load(cfg, heal_dir / "merged")
    # the in-pipeline sparse model the export must match: the specification itself
    attach_masks(healed, masks, kernel=Backend.REFERENCE)
    dense_model, _ = common.load(cfg)
    pruned = prune_model(healed, masks, record={"pipeline_config": config_to_dict(cfg)})
    ids = token_blocks(
        common.tokens(tok, cfg.apply.eval_text), min(cfg.export.parity_len, masks.max_length)
    )
    x = ids[: cfg.export.parity_batch, :-1].to(next(healed.parameters()).device)
    with common.folder(cfg, "export", inputs(cfg), t0) as sf:
        out = save_model(pruned, tok, sf.path / "model")
        reloaded, _ = common.load(cfg, out)
        with torch.no_grad():
            ref = healed(x).logits.float()
            got = reloaded(x).logits.float()
            dense_logits = dense_model(x).logits.float()
        diff = float((got - ref).abs().max())
        plain = (
            plain_transformers_parity(out.resolve(), x.cpu(), ref.cpu())
            if cfg.export.check_plain
            else None
        )
        seq = masks.max_length
        summary = {
            "model_dir": str(target or sf.final / "model"),
            "parity_max_abs_diff": diff,
            "parity_tolerance": cfg.export.parity_tolerance,
            "parity_ok": diff <= cfg.export.parity_tolerance,
            "parity_plain_transformers_max_abs_diff": plain,
            "pruned_differs_from_dense_max_abs": float((got - dense_logits).abs().max()),
            "dense": model_costs(dense_model, seq),
            "pruned": model_costs(reloaded, seq),
            "heads_kept": masks.heads_kept(),
            "kv_heads_kept": sum(a.num_key_value_heads for a in reloaded.gravity_layers()),
            "density": masks.density(),
        }
        if not summary["parity_ok"] or (plain is not None and plain > cfg.export.parity_tolerance):
            raise UserError(
                f"export parity check failed: max |Δlogit| {diff:.3g} (plain transformers {plain}) "
                f"> {cfg.export.parity_tolerance}"
            )
        (sf.path / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
        sf.summary.update(summary)
    if target is not None:
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(sf.final / "model", target)
    return sf.final
