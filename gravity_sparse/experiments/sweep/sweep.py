"""sweep: held-out quality against density — the project's central evidence.

For every (density, head-drop fraction) of the sweep, the QUBO and the baselines are solved at exactly the
same budget from the run's measured field (`NN_measure/field.safetensors`); each pattern is evaluated on the
held-out text before healing and, optionally, after a short LoRA heal with the same token budget. With
`sweep.recall_trials` > 0 every pattern (and the dense model) is also scored on the recall task
(`experiments.passkey.recall`), unhealed and healed, on the same prompts. Output in `RUN/sweep/`:
`sweep.json` (one row per pattern), `sweep.md` (the tables), `pareto.png` (held-out loss against density,
one line per method, unhealed dashed, healed solid, dense as a horizontal line), `recall.png` with recall
on, and a `meta.json` like every stage folder's (written atomically by `run.artifacts.stage_folder`).

Fanned out under a launcher: the points (head-drop fraction, density) are independent, so each rank solves,
evaluates and heals a contiguous share of them by itself (its heals train alone, `dist.alone`), the dense
loss is scored data-parallel, and every rank's rows are gathered in the order of the points; rank 0 writes
the folder. The rows do not depend on the number of processes.

Resumable: every finished pattern is appended to `RUN/sweep.progress/rows-rank<R>.jsonl` under the hash of
the sweep's config and inputs, and a rerun of the same sweep reuses those rows instead of recomputing them
(a healed pattern of gravity-smol costs minutes). The dense model's recall is logged there too, under the
hash of what it depends on (model, recall settings, seed).
The progress folder is removed once `RUN/sweep/` is written; rows of another config or input are never
reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.experiments.sweep.plots import mean_accuracy
from gravity_sparse.run.artifacts import stage_dirname, stage_folder
from gravity_sparse.run.config import config_to_dict

SWEEP_DIR = "sweep"  # RUN/sweep/: an experiment, not a numbered pipeline stage
PROGRESS_DIR = "sweep.progress"  # finished rows of an unfinished sweep


def sweep_config(cfg) -> dict[str, Any]:
    """The part of the pipeline config the sweep depends on (hashed into its meta.json)."""
    full = config_to_dict(cfg)
    keys = ("model", "seed", "solve", "apply", "heal", "sweep")
    return {k: full[k] for k in keys}


def sweep_inputs(cfg) -> dict[str, Any]:
    from gravity_sparse.model.io import resolve_model_path
    from gravity_sparse.stages.common import text_digest

    return {
        "model": resolve_model_path(cfg.model.path),
        "field": cfg.run_path() / stage_dirname("measure"),
        "eval": text_digest(cfg.apply.eval_text),
        "heal": text_digest(cfg.heal.text),
    }


def _progress_key(cfg) -> str:
    from gravity_sparse.run.artifacts import config_hash, hash_path

    inputs = {k: hash_path(v) for k, v in sweep_inputs(cfg).items()}
    return config_hash({"config": sweep_config(cfg), "inputs": inputs})


def _dense_key(cfg) -> str:
    """What the dense model's recall depends on: the model, the recall settings and the seed (not the
    solve, apply or heal config, so a sweep of another solve config in the same run reuses it)."""
    from gravity_sparse.model.io import resolve_model_path
    from gravity_sparse.run.artifacts import config_hash, hash_path

    recall = {k: v for k, v in config_to_dict(cfg.sweep).items() if k.startswith("recall_")}
    model = hash_path(resolve_model_path(cfg.model.path))
    return config_hash({"recall": recall, "seed": cfg.seed, "model": model})


def _logged(folder: Path, field: str, key: str) -> list[dict[str, Any]]:
    """The entries of the progress logs (any rank's) whose `field` is `key`."""
    out = []
    for path in sorted(folder.glob("rows-rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that pattern is redone
                continue
            if entry.get(field) == key:
                out.append(entry)
    return out


def _done_rows(folder: Path, key: str) -> dict[tuple, dict[str, Any]]:
    """{(head_drop, density_target, method): row} of this sweep's finished patterns (any rank's)."""
    rows = (e["row"] for e in _logged(folder, "key", key) if "row" in e)
    return {(r["head_drop"], r["density_target"], r["method"]): r for r in rows}


def _dense_recall(folder: Path, dense_key: str) -> list[dict[str, Any]] | None:
    """The dense model's recall rows logged under `_dense_key`, if any."""
    logged = [e["recall_dense"] for e in _logged(folder, "dense_key", dense_key)]
    return logged[0] if logged else None


def _patterns(cfg, tensors, meta, density: float, head_drop: float, eps: float):
    """{method: Masks} at one budget, all from one solve."""
    from gravity_sparse.model.masks import Masks
    from gravity_sparse.stages.s2_solve.solve import solve_field

    baselines = [m for m in cfg.sweep.methods if m != "qubo"]
    solve_cfg = dataclasses.replace(
        cfg.solve,
        density=density,
        head_drop=head_drop,  # an exact fraction: 0.0 keeps every head
        baselines=baselines,
        exact_layers=0,
    )
    result = solve_field(tensors, meta, solve_cfg, eps=eps)
    block, length = int(meta["block_size"]), int(meta["seq_len"])
    out = {"qubo": Masks(result.head_keep, result.block_mask, block, length, "qubo")}
    for name, (hk, bm) in result.baselines.items():
        out[name] = Masks(hk, bm, block, length, name)
    return {m: out[m] for m in cfg.sweep.methods}


def run_sweep(cfg) -> tuple[Path, dict[str, Any]]:
    """Run the sweep of `cfg.sweep` on the run's measured field; returns (folder, summary)."""
    from gravity_sparse.experiments.sweep.plots import plot_pareto, plot_recall
    from gravity_sparse.model.data import encode_text, resolve_text
    from gravity_sparse.model.io import load_model, require_tokenizer
    from gravity_sparse.model.masks import attach_masks
    from gravity_sparse.run.artifacts import require_stage
    from gravity_sparse.stages.s2_solve.config import resolve_eps
    from gravity_sparse.stages.s2_solve.field_io import read_field
    from gravity_sparse.stages.s3_apply.apply import sparse_loss
    from gravity_sparse.stages.s4_heal.heal import heal_model

    t0 = time.time()
    run = cfg.run_path()
    tensors, meta = read_field(require_stage(run, "measure") / "field.safetensors")
    sw = cfg.sweep
    apply_cfg = dataclasses.replace(cfg.apply, max_tokens=sw.eval_max_tokens)
    heal_cfg = dataclasses.replace(
        cfg.heal, token_budget=sw.heal_token_budget, eval_max_tokens=sw.eval_max_tokens
    )
    dtype, device = cfg.model.torch_dtype(), cfg.model.torch_device()
    base, tok = load_model(cfg.model.path, dtype=dtype, device=device)
    tok = require_tokenizer(tok, cfg.model.path)
    eps = resolve_eps(cfg.solve, float(base.config.gravity_eps))
    ids = encode_text(tok, resolve_text(apply_cfg.eval_text))
    dense_loss, scored = sparse_loss(base, None, ids, apply_cfg, data_parallel=True)
    recall = _recall_task(sw, tok, int(meta["seq_len"]), cfg.seed)
    start = time.perf_counter()
    points = [(h, d) for h in sw.head_drops for d in sw.densities]
    mine = dist.share(len(points))
    progress, key = run / PROGRESS_DIR, _progress_key(cfg)
    progress.mkdir(parents=True, exist_ok=True)
    done_before = _done_rows(progress, key)
    log = progress / f"rows-rank{dist.rank()}.jsonl"
    dense_key = _dense_key(cfg)
    recall_dense = _dense_recall(progress, dense_key) if recall else None
    if recall and recall_dense is None:  # minutes on gravity-smol: logged, and reused on a rerun
        recall_dense = recall(base, None)
        if dist.is_main():
            with log.open("a") as f:
                f.write(json.dumps({"dense_key": dense_key, "recall_dense": recall_dense}) + "\n")
    done: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
    for head_drop, density in points[mine.start : mine.stop]:
        rows: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        done.append((rows, skipped))
        try:
            patterns = _patterns(cfg, tensors, meta, density, head_drop, eps)
        except UserError as e:  # e.g. a density the heads left by head_drop cannot reach
            skipped.append({"density": density, "head_drop": head_drop, "reason": str(e)})
            print(f"sweep density {density} head_drop {head_drop}: skipped ({e})", flush=True)
            continue
        for method, masks in patterns.items():
            if (head_drop, density, method) in done_before:
                rows.append(done_before[(head_drop, density, method)])
                print(_row_line(rows[-1]) + " (from sweep.progress)", flush=True)
                continue
            row = {
                "density_target": density,
                "head_drop": head_drop,
                "method": method,
                "density": round(masks.density(), 6),
                "heads_kept": masks.heads_kept(),
                "heads_total": int(masks.head_keep.numel()),
                "loss_dense": dense_loss,
                "loss_unhealed": sparse_loss(base, masks, ids, apply_cfg)[0],
            }
            if recall:
                row["recall_unhealed"] = recall(base, masks)
            if sw.heal:
                torch.manual_seed(cfg.seed)
                model, _ = load_model(cfg.model.path, dtype=dtype, device=device)
                attach_masks(model, masks, kernel=heal_cfg.kernel)
                with tempfile.TemporaryDirectory() as scratch, dist.alone():
                    peft_model, record = heal_model(
                        model, tok, heal_cfg, Path(scratch), seed=cfg.seed
                    )
                healed = peft_model.merge_and_unload().eval()
                row["loss_healed"] = sparse_loss(healed, masks, ids, apply_cfg)[0]
                row["heal_steps"] = record["steps_run"]
                if recall:
                    row["recall_healed"] = recall(healed, masks)
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps({"key": key, "row": row}) + "\n")
            print(_row_line(row), flush=True)
    # every rank's points, in the order of the points (each rank's share is contiguous)
    every = [point for share in dist.gather(done) for point in share]
    rows = [row for point_rows, _ in every for row in point_rows]
    skipped = [skip for _, point_skipped in every for skip in point_skipped]
    summary = {
        **_summary_head(
            cfg, scored, dense_loss
        ),  # tokens actually scored (≤ sweep.eval_max_tokens)
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
        "skipped": skipped,
    }
    if recall_dense is not None:
        summary["recall_dense"] = recall_dense
    with stage_folder(
        run, "sweep", config=sweep_config(cfg), inputs=sweep_inputs(cfg), started=t0,
        dirname=SWEEP_DIR,
    ) as sf:  # fmt: skip
        if sf.writer:  # rank 0
            (sf.path / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
            (sf.path / "sweep.md").write_text(sweep_markdown(summary))
            plot_pareto(summary, sf.path / "pareto.png")
            if recall:
                plot_recall(summary, sf.path / "recall.png")
        sf.summary.update(rows=len(rows), skipped=len(skipped), wall_s=summary["wall_s"])
    if dist.is_main():
        shutil.rmtree(progress, ignore_errors=True)
    return sf.final, summary


def _recall_task(sw, tok, mask_length: int, seed: int):
    """model, masks (None: dense) -> recall rows, or None with recall off; lengths past the masks are
    refused before any pattern is solved."""
    if not sw.recall_trials:
        return None
    if max(sw.recall_lengths) > mask_length:
        raise UserError(
            f"sweep.recall_lengths {max(sw.recall_lengths)} is longer than the masks "
            f"({mask_length} tokens)"
        )
    from gravity_sparse.experiments.passkey.recall import evaluate_recall
    from gravity_sparse.model.data import encode_text, resolve_text
    from gravity_sparse.model.masks import attach_masks, detach_masks

    pool = encode_text(tok, resolve_text("train"))

    def run(model, masks) -> list[dict[str, Any]]:
        if masks is not None:
            attach_masks(model, masks)
        try:
            return evaluate_recall(
                model.eval(), tok, sw.recall_lengths, sw.recall_depths, sw.recall_trials, seed,
                choices=sw.recall_choices, segment=sw.recall_segment, pool=pool,
            )  # fmt: skip
        finally:
            if masks is not None:
                detach_masks(model)

    return run


def collect_sweep(cfg) -> dict[str, Any]:
    """The sweep of `cfg` as far as it has run, running nothing: the finished sweep's summary
    (`RUN/sweep/sweep.json`), or for an unfinished one the rows in `RUN/sweep.progress` logged under
    this config's key, in the sweep's order. `missing` lists the patterns still to run (empty when done)."""
    run = cfg.run_path()
    final, progress = run / SWEEP_DIR / "sweep.json", run / PROGRESS_DIR
    if final.is_file() and not progress.exists():
        return {**json.loads(final.read_text()), "missing": []}
    done = _done_rows(progress, _progress_key(cfg)) if progress.is_dir() else {}
    sw = cfg.sweep
    order = [(h, d, m) for h in sw.head_drops for d in sw.densities for m in sw.methods]
    rows = [done[k] for k in order if k in done]
    if not rows:
        raise UserError(f"no finished pattern of this sweep in {progress} (nor a finished {final})")
    missing = [
        {"head_drop": h, "density_target": d, "method": m}
        for h, d, m in order
        if (h, d, m) not in done
    ]
    # eval tokens: at most sweep.eval_max_tokens (the finished sweep records the count scored)
    head = _summary_head(cfg, sw.eval_max_tokens, rows[0]["loss_dense"])
    dense = _dense_recall(progress, _dense_key(cfg)) if progress.is_dir() else None
    head |= {} if dense is None else {"recall_dense": dense}
    return {**head, "rows": rows, "skipped": [], "missing": missing}


def _summary_head(cfg, eval_tokens: int, loss_dense: float) -> dict[str, Any]:
    """What a sweep summary says before its rows: model, held-out text and tokens, heal budget, dense."""
    sw = cfg.sweep
    return {
        "model": str(cfg.model.path or "checkpoints/gravity-tiny"),
        "eval_text": cfg.apply.eval_text,
        "eval_tokens": eval_tokens,
        "heal_token_budget": sw.heal_token_budget if sw.heal else None,
        "loss_dense": loss_dense,
    }


def _row_line(r: dict[str, Any]) -> str:
    healed = f" healed {r['loss_healed']:.4f}" if "loss_healed" in r else ""
    recall = "".join(
        f" recall {k} {mean_accuracy(r[f'recall_{k}']):.3f}"
        for k in ("unhealed", "healed")
        if f"recall_{k}" in r
    )
    return (
        f"sweep density {r['density']:.3f} heads {r['heads_kept']}/{r['heads_total']} "
        f"{r['method']:8s} unhealed {r['loss_unhealed']:.4f}{healed} (dense {r['loss_dense']:.4f})"
        + recall
    )


def sweep_markdown(summary: dict[str, Any]) -> str:
    dense = summary["loss_dense"]
    lines = [
        f"Held-out loss (nats/token) on `{summary['eval_text']}` ({summary['eval_tokens']} tokens); "
        f"dense **{dense:.4f}** (perplexity {math.exp(dense):.3f}). Healing: "
        + (
            f"{summary['heal_token_budget']} tokens of LoRA per pattern."
            if summary["heal_token_budget"]
            else "off."
        ),
        "",
        "| density | heads kept | method | unhealed | healed | healed vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        healed = r.get("loss_healed")
        lines.append(
            f"| {r['density']:.3f} | {r['heads_kept']}/{r['heads_total']} | {r['method']} | "
            f"{r['loss_unhealed']:.4f} | {'–' if healed is None else f'{healed:.4f}'} | "
            f"{'–' if healed is None else f'{100 * (healed - dense) / dense:+.2f}%'} |"
        )
    if "recall_dense" in summary:
        lines += ["", *recall_markdown(summary)]
    return "\n".join(lines) + "\n"


def recall_markdown(summary: dict[str, Any]) -> list[str]:
    """The recall table: accuracy per cell, unhealed / healed, with the dense model's and chance."""
    dense = summary["recall_dense"]
    cells = " | ".join(f"{r['length']} @ {r['depth']:.0%}" for r in dense)
    fmt = lambda rows: " | ".join(f"{r['accuracy']:.3f}" for r in rows)  # noqa: E731
    lines = [
        f"Recall accuracy ({dense[0]['trials']} trials per cell, chance {dense[0]['chance']:.2f}; "
        "`experiments.passkey.recall`), unhealed / healed:",
        "",
        f"| density | method | {cells} | mean unhealed | mean healed |",
        "|---|---|" + "---|" * (len(dense) + 2),
        f"| 1 | dense | {fmt(dense)} | {mean_accuracy(dense):.3f} | – |",
    ]
    for r in summary["rows"]:
        if "recall_unhealed" not in r:
            continue
        healed = r.get("recall_healed")
        after = [f"{h['accuracy']:.3f}" for h in healed] if healed else ["–"] * len(dense)
        per = " | ".join(
            f"{u['accuracy']:.3f} / {a}" for u, a in zip(r["recall_unhealed"], after, strict=True)
        )
        mean_h = "–" if healed is None else f"{mean_accuracy(healed):.3f}"
        lines.append(
            f"| {r['density']:.3f} | {r['method']} | {per} | "
            f"{mean_accuracy(r['recall_unhealed']):.3f} | {mean_h} |"
        )
    return lines
