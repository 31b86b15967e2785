"""Which block values should the QUBO use? Held-out loss of each formulation variant at one budget.

    python benchmarks/ablate_block_value.py -c pipelines/tiny.yaml --out benchmarks/results/<date>-tiny-block-value
    python benchmarks/ablate_block_value.py -c pipelines/tiny.yaml --smoke --out /tmp/smoke/ablate  # tests

Reads the run's measured field (`RUN/01_measure`), solves the QUBO for every (solve.block_value,
solve.block_scale) pair at the config's density and head budget, adds the baselines at the same budget,
evaluates each pattern on the held-out text (unhealed), and writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import provenance  # noqa: E402

from gravity_sparse.model.data import encode_text, resolve_text  # noqa: E402
from gravity_sparse.model.io import load_model  # noqa: E402
from gravity_sparse.model.masks import Masks  # noqa: E402
from gravity_sparse.qubo.baselines import baseline_masks  # noqa: E402
from gravity_sparse.run.artifacts import require_stage  # noqa: E402
from gravity_sparse.run.config import load_config  # noqa: E402
from gravity_sparse.run.pipeline import PipelineConfig  # noqa: E402
from gravity_sparse.stages.s1_measure.measure import run_measure  # noqa: E402
from gravity_sparse.stages.s2_solve.field_io import read_field  # noqa: E402
from gravity_sparse.stages.s2_solve.solve import full_mask, solve_field  # noqa: E402
from gravity_sparse.stages.s3_apply.apply import sparse_loss  # noqa: E402

VARIANTS = [(v, s) for v in ("profile", "kl", "mass") for s in ("flat", "importance")]
VARIANTS += [("grad", "flat"), ("grad_abs", "flat")]  # absolute values in nats: no block_scale


SMOKE = [
    "measure.seq_len=64",
    "measure.block_size=8",
    "measure.num_sequences=2",
    "measure.importance=grad",
    "measure.block_grad=true",
    "solve.num_sweeps=50",
    "apply.seq_len=64",
    "apply.max_tokens=128",
    "heal.seq_len=64",
]


def _variant(spec: str) -> dict[str, Any]:
    """block_value[:block_scale[:row_coupling]], or window[:structure_cost[:block_scale[:sink]]] (the
    structured QUBO) → solve config fields."""
    parts = spec.split(":")
    if parts[0] == "window":
        return {
            "structure": "window",
            "structure_cost": (parts[1:2] or ["kl"])[0] or "kl",
            "block_scale": (parts[2:3] or ["flat"])[0] or "flat",
            "structure_sink": (parts[3:4] or ["always"])[0] or "always",
        }
    return {
        "block_value": parts[0],
        "block_scale": (parts[1:2] or ["flat"])[0] or "flat",
        "row_coupling": float((parts[2:3] or [0.0])[0]),
    }


def _name(variant: dict[str, Any]) -> str:
    if variant.get("structure") == "window":
        return (
            f"qubo structure=window cost={variant['structure_cost']} "
            f"block_scale={variant['block_scale']} sink={variant['structure_sink']}"
        )
    name = f"qubo block_value={variant['block_value']} block_scale={variant['block_scale']}"
    return name + (f" row_coupling={variant['row_coupling']:g}" if variant["row_coupling"] else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="measure a tiny field first (into --out's folder), short windows: seconds (tests)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="block_value[:block_scale[:row_coupling]] or window[:cost[:block_scale[:sink]]] "
        "(the structured QUBO) to run (default: every block value, uncoupled; the first also runs "
        "the baselines), e.g. kl kl:flat:1 window window:mass",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        default=["window", "uniform", "greedy", "random"],
        help="baselines run with the first variant (default: all)",
    )
    p.add_argument(
        "--densities", nargs="+", type=float, default=None, help="default: the config's density"
    )
    p.add_argument(
        "--window-on-qubo-heads",
        action="store_true",
        help="also the window + sink blocks on the first variant's own heads (the window baseline keeps "
        "the most important heads): separates the QUBO's head choice from its block choice",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if any("=" in v for v in args.variants or []):
        p.error(
            "config overrides go after `--` (--variants takes every word after it as a variant)"
        )
    overrides = list(args.overrides)
    if args.smoke:
        overrides = [*SMOKE, f"run_dir={args.out.parent / 'smoke-run'}", *overrides]
    cfg = load_config(PipelineConfig, args.config, overrides)
    model, tok = load_model(
        cfg.model.path, dtype=cfg.model.torch_dtype(), device=cfg.model.torch_device()
    )
    if args.smoke:
        measured = cfg.run_path() / "01_measure"
        ids = encode_text(tok, resolve_text(cfg.calibration_text))
        run_measure(model, ids, dataclasses.replace(cfg.measure, plots=False), measured)
        tensors, meta = read_field(measured / "field.safetensors")
    else:
        tensors, meta = read_field(require_stage(cfg.run_path(), "measure") / "field.safetensors")
    ids = encode_text(tok, resolve_text(cfg.apply.eval_text))
    block, length = int(meta["block_size"]), int(meta["seq_len"])
    rows = [{"pattern": "dense", "loss": sparse_loss(model, None, ids, cfg.apply)[0]}]
    start = time.perf_counter()
    variants = [_variant(f"{v}:{s}") for v, s in VARIANTS]
    if args.smoke:
        variants = [*variants[:2], *variants[-2:], _variant("mass:flat:1"), _variant("window")]
    if args.variants:
        variants = [_variant(v) for v in args.variants]
    for density in args.densities or [cfg.solve.density]:
        for variant in variants:
            first = variant is variants[0]
            solve_cfg = dataclasses.replace(
                cfg.solve,
                density=density,
                **variant,
                exact_layers=0,
                baselines=args.baselines if first else [],
            )
            result = solve_field(tensors, meta, solve_cfg)
            patterns = {_name(variant): (result.head_keep, result.block_mask)}
            if args.window_on_qubo_heads and first:
                heads, blocks = baseline_masks(
                    "window",
                    tensors["block_field"].double().numpy(),
                    int(result.report["blocks_target"]),
                    sink_blocks=cfg.solve.sink_blocks,
                    heads=result.head_keep.numpy(),
                )
                nqb = tensors["block_field"].shape[-1]
                patterns["baseline window on the QUBO's heads"] = (
                    torch.from_numpy(heads),
                    full_mask(nqb, heads, blocks),
                )
            patterns.update({f"baseline {k}": v for k, v in result.baselines.items()})
            for name, (hk, bm) in patterns.items():
                masks = Masks(hk, bm, block, length, name)
                loss = sparse_loss(model, masks, ids, cfg.apply)[0]
                rows.append(
                    {
                        "pattern": name,
                        "density_target": density,
                        "density": masks.density(),
                        "heads_kept": masks.heads_kept(),
                        "loss": loss,
                    }
                )
                print(
                    f"{name:45s} density {masks.density():.4f} heads {masks.heads_kept()} "
                    f"loss {loss:.4f}",
                    flush=True,
                )
    dense = rows[0]["loss"]
    result = {
        "command": " ".join(sys.argv),
        "provenance": provenance({"config": args.config, "overrides": overrides}),
        "smoke": args.smoke,
        "config": {
            "density": args.densities or [cfg.solve.density],
            "head_drop": cfg.solve.head_drop,
            "eval_text": cfg.apply.eval_text,
            "eval_max_tokens": cfg.apply.max_tokens,
            "model": cfg.model.path or "checkpoints/gravity-tiny",
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Held-out loss (nats/token), unhealed, at density "
        f"{', '.join(str(d) for d in args.densities or [cfg.solve.density])} with head_drop "
        f"{cfg.solve.head_drop}; dense {dense:.4f}. Command: `{result['command']}`",
        "",
        "| pattern | density | heads kept | loss | vs dense |",
        "|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['pattern']} | {r['density']:.4f} | {r['heads_kept']} | {r['loss']:.4f} | "
            f"{100 * (r['loss'] - dense) / dense:+.2f}% |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
