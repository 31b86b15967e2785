"""Stage runners: each reads the folders of earlier stages and writes its own `RUN/NN_stage/` atomically.

A runner returns (folder, summary). `stage_inputs` names what a stage reads, so `run` can skip a stage whose
config and inputs are unchanged (see `pipeline_run.py`). The numbers come from the stage modules (measure,
qubo, apply, heal, export, bench, report); this file only wires files, models and configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from .config import config_to_dict
from .errors import UserError
from .io import load_model, require_tokenizer, resolve_model_path, save_model
from .pipeline import PipelineConfig
from .stage import require_stage, stage_dirname, stage_folder


def _text_digest(source: str) -> str:
    from .data import resolve_text

    return "sha256:" + hashlib.sha256(resolve_text(source).encode("utf-8")).hexdigest()


def _model(cfg: PipelineConfig, path: str | Path | None = None):
    """The model and its tokenizer (a one-line error when the directory has no tokenizer)."""
    path = path if path is not None else cfg.model.path
    model, tok = load_model(path, dtype=cfg.model.torch_dtype(), device=cfg.model.torch_device())
    return model, require_tokenizer(tok, path)


def _tokens(tok, source: str) -> torch.Tensor:
    """Ids of a corpus split or text file through the model's own tokenizer."""
    from .data import encode_text, resolve_text

    return encode_text(tok, resolve_text(source))


def _pattern_file(cfg: PipelineConfig) -> Path:
    solve_dir = require_stage(cfg.run_path(), "solve")
    name = "masks.safetensors" if cfg.masks == "qubo" else f"masks_{cfg.masks}.safetensors"
    path = solve_dir / name
    if not path.is_file():
        raise UserError(f"{solve_dir} has no {name} (masks = {cfg.masks!r})")
    return path


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The part of the config a stage depends on (what its cache key hashes)."""
    full = config_to_dict(cfg)
    common = {"model": full["model"], "seed": cfg.seed}
    section = {"measure": {"calibration_text": cfg.calibration_text, **full["measure"]}}.get(
        stage, full.get(stage, {})
    )
    if stage in ("heal", "export", "bench"):
        common["masks"] = cfg.masks
    return {**common, stage: section}


def stage_inputs(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """What a stage reads: the model directory, texts (by content digest), earlier stage folders."""
    run = cfg.run_path()
    solve = run / stage_dirname("solve")
    if stage == "bench" and cfg.bench.synthetic:
        return {}  # random weights and a synthetic field: nothing is read
    if stage == "report":
        return {
            s: run / stage_dirname(s)
            for s in ("measure", "solve", "apply", "heal", "export", "bench")
            if (run / stage_dirname(s)).exists()
        }
    model = resolve_model_path(cfg.model.path)
    if stage == "measure":
        return {"model": model, "calibration": _text_digest(cfg.calibration_text)}
    if stage == "solve":
        return {"field": run / stage_dirname("measure")}
    if stage == "apply":
        return {"model": model, "solve": solve, "eval": _text_digest(cfg.apply.eval_text)}
    if stage == "heal":
        return {
            "model": model,
            "solve": solve,
            "heal": _text_digest(cfg.heal.text),
            "eval": _text_digest(cfg.heal.eval_text),
        }
    if stage == "export":
        return {"heal": run / stage_dirname("heal"), "solve": solve}
    if stage == "bench":
        return {"model": model, "solve": solve}
    raise ValueError(stage)


def _folder(cfg: PipelineConfig, stage: str, started: float):
    return stage_folder(
        cfg.run_path(),
        stage,
        config=stage_config(cfg, stage),
        inputs=stage_inputs(cfg, stage),
        started=started,
    )


def run_measure_stage(cfg: PipelineConfig) -> tuple[Path, dict[str, Any]]:
    t0 = time.time()
    from .measure import run_measure

    model, tok = _model(cfg)
    ids = _tokens(tok, cfg.calibration_text)
    with _folder(cfg, "measure", t0) as sf:
        summary = run_measure(model, ids, cfg.measure, sf.path)
        (sf.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        sf.summary.update({k: summary[k] for k in ("num_tokens", "loss", "tokens_per_s")})
    return sf.final, summary


def run_solve_stage(cfg: PipelineConfig) -> tuple[Path, dict[str, Any]]:
    t0 = time.time()
    from .qubo.stage import check_field_matches_model, read_field, solve_field, write_solve_outputs

    field_path = require_stage(cfg.run_path(), "measure") / "field.safetensors"
    tensors, meta = read_field(field_path)
    model_cfg = json.loads((resolve_model_path(cfg.model.path) / "config.json").read_text())
    heads = model_cfg["num_attention_heads"]
    check_field_matches_model(
        meta, model_cfg["num_hidden_layers"], heads, model_cfg.get("num_key_value_heads") or heads
    )
    solve_cfg = dataclasses.replace(cfg.solve, eps=float(model_cfg.get("gravity_eps", 0.1)))
    result = solve_field(tensors, meta, solve_cfg)
    with _folder(cfg, "solve", t0) as sf:
        write_solve_outputs(result, sf.path)
        rep = result.report
        sf.summary.update(
            density=rep.get("density"),
            heads_kept=int(result.head_keep.sum()),
            violations=rep.get("constraint_violations"),
            solve_seconds=rep.get("solve_seconds"),
            max_gap=rep.get("max_gap"),
        )
    return sf.final, rep


def run_apply_stage(cfg: PipelineConfig) -> tuple[Path, list[dict[str, Any]]]:
    t0 = time.time()
    from .apply import evaluate_masks, masks_in, write_results

    solve_dir = require_stage(cfg.run_path(), "solve")
    model, tok = _model(cfg)
    rows = evaluate_masks(model, tok, masks_in(solve_dir, cfg.apply.baselines), cfg.apply)
    with _folder(cfg, "apply", t0) as sf:
        write_results(rows, sf.path, f"Held-out loss, unhealed ({cfg.apply.eval_text})")
        sf.summary["rows"] = rows
    return sf.final, rows


def run_heal_stage(cfg: PipelineConfig) -> tuple[Path, dict[str, Any]]:
    t0 = time.time()
    from .heal import heal_model, held_out_loss, plot_loss_curve, save_adapter, write_record
    from .masks import attach_masks, read_masks

    masks = read_masks(_pattern_file(cfg))
    if cfg.heal.seq_len > masks.max_length:
        raise UserError(
            f"heal.seq_len {cfg.heal.seq_len} exceeds the masks' max_length {masks.max_length}"
        )
    torch.manual_seed(cfg.seed)
    model, tok = _model(cfg)
    dense = held_out_loss(model, tok, cfg.heal)
    attach_masks(model, masks)
    before = held_out_loss(model, tok, cfg.heal)
    with _folder(cfg, "heal", t0) as sf, tempfile.TemporaryDirectory() as scratch:
        peft_model, record = heal_model(model, tok, cfg.heal, Path(scratch), seed=cfg.seed)
        save_adapter(peft_model, sf.path / "adapter")
        merged = peft_model.merge_and_unload()
        merged.eval()
        after = held_out_loss(merged, tok, cfg.heal)
        save_model(merged, tok, sf.path / "merged")
        record.update(
            masks=cfg.masks,
            density=masks.density(),
            heads_kept=masks.heads_kept(),
            heldout_dense=dense,
            heldout_before=before,
            heldout_after=after,
            gap_to_dense_pct=100.0 * (after - dense) / dense,
        )
        write_record(record, sf.path / "heal.json")
        plot_loss_curve(record["log_history"], sf.path / "loss_curve.png")
        sf.summary.update({k: v for k, v in record.items() if k != "log_history"})
    return sf.final, record


def run_export_stage(cfg: PipelineConfig, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    t0 = time.time()
    from .data import token_blocks
    from .export import model_costs, prune_model
    from .masks import attach_masks, read_masks

    heal_dir = require_stage(cfg.run_path(), "heal")
    masks = read_masks(_pattern_file(cfg))
    target = Path(cfg.export.dir) if cfg.export.dir else None
    if target is not None and target.exists() and not overwrite:
        raise UserError(f"export directory {target} already exists (use --overwrite to replace it)")
    healed, tok = _model(cfg, heal_dir / "merged")
    attach_masks(healed, masks, kernel="reference")
    dense_model, _ = _model(cfg)
    pruned = prune_model(healed, masks, record={"pipeline_config": config_to_dict(cfg)})
    ids = token_blocks(
        _tokens(tok, cfg.apply.eval_text), min(cfg.export.parity_len, masks.max_length)
    )
    x = ids[: cfg.export.parity_batch, :-1].to(next(healed.parameters()).device)
    with _folder(cfg, "export", t0) as sf:
        out = save_model(pruned, tok, sf.path / "model")
        reloaded, _ = _model(cfg, out)
        with torch.no_grad():
            ref = healed(x).logits.float()
            got = reloaded(x).logits.float()
            dense_logits = dense_model(x).logits.float()
        diff = float((got - ref).abs().max())
        plain = (
            _plain_transformers_parity(out.resolve(), x.cpu(), ref.cpu())
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
    return sf.final, summary


def _plain_transformers_parity(model_dir: Path, x: torch.Tensor, ref: torch.Tensor) -> float:
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


def _synthetic_bench_inputs(cfg: PipelineConfig):
    """A random-weight Gravity-2-shaped model and masks solved from a synthetic Gravity-2 field."""
    from .bench import gravity2_config
    from .masks import Masks
    from .modeling_gravity import GravityForCausalLM
    from .qubo.stage import solve_field
    from .qubo.synthetic import synthetic_field

    layers = cfg.bench.synthetic_layers or 36
    mcfg = gravity2_config(layers)
    device, dtype = cfg.model.torch_device(), cfg.model.torch_dtype()
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = GravityForCausalLM(mcfg).to(dtype).eval()
    block = cfg.measure.block_size
    nqb = -(-cfg.measure.seq_len // block)
    field, meta = synthetic_field(layers, 16, 2, nqb, block_size=block, seed=cfg.seed)
    meta["seq_len"] = str(cfg.measure.seq_len)
    solve_cfg = dataclasses.replace(cfg.solve, exact_layers=0, baselines=[])
    result = solve_field(field, meta, solve_cfg)
    masks = Masks(
        result.head_keep, result.block_mask, block, cfg.measure.seq_len, "qubo-sa-synthetic"
    )
    return model, masks


def run_bench_stage(cfg: PipelineConfig) -> tuple[Path, dict[str, Any]]:
    t0 = time.time()
    from .bench import run_bench, write_bench
    from .masks import read_masks

    if cfg.bench.synthetic:
        model, masks = _synthetic_bench_inputs(cfg)
        source = "synthetic Gravity-2-shaped random weights"
        prompt_ids = None  # no tokenizer: random ids
    else:
        masks = read_masks(_pattern_file(cfg))
        model, tok = _model(cfg)
        source = str(resolve_model_path(cfg.model.path))
        prompt_ids = _tokens(tok, cfg.apply.eval_text)
    result = run_bench(model, masks, cfg.bench, seed=cfg.seed, prompt_ids=prompt_ids)
    result["model"] = source
    with _folder(cfg, "bench", t0) as sf:
        write_bench(result, sf.path)
        best = max(
            (r for r in result["rows"] if r["model"] == "sparse"), key=lambda r: r["seq_len"]
        )
        sf.summary.update(
            device=result["device"]["name"],
            path=result["path"],
            line=f"{result['device']['name']}: {best['phase']} {best['seq_len']} tokens "
            f"sparse/dense {best['speedup_vs_dense']:.2f}× ({result['path']})",
        )
    return sf.final, {**result, "line": sf.summary["line"]}


def run_report_stage(cfg: PipelineConfig) -> tuple[Path, dict[str, Any]]:
    t0 = time.time()
    from .report import write_report

    inputs = stage_inputs(cfg, "report")
    if not inputs:
        raise UserError(f"{cfg.run_path()} has no finished stages to report on")
    with _folder(cfg, "report", t0) as sf:
        summary = write_report(cfg, {k: Path(v) for k, v in inputs.items()}, sf.path)
        sf.summary.update(summary)
    return sf.final, {**summary, "line": f"{sf.final / 'report.md'}"}
