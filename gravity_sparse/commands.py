"""Subcommands that are not pipeline stages: `info`, `validate` and `pretrain`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from . import pipeline_run  # noqa: F401  (registers the stage commands and `run`)
from .cli import add_config_arguments, command, emit
from .config import config_to_dict, load_config
from .pipeline import PipelineConfig


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture, parameter count, attention implementation and per-layer mass summary of a model."""
    cfg = model.config
    layers = []
    for i, attn in enumerate(model.gravity_layers()):
        mass = F.softplus(attn.gravity_mass_log.detach().float())
        entry = {
            "layer": i,
            "q_heads": attn.num_heads,
            "kv_heads": attn.num_key_value_heads,
            "mass_min": round(float(mass.min()), 4) if mass.numel() else None,
            "mass_mean": round(float(mass.mean()), 4) if mass.numel() else None,
            "mass_max": round(float(mass.max()), 4) if mass.numel() else None,
        }
        if attn.gravity_block_mask is not None:
            entry["sparse"] = True
        layers.append(entry)
    return {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": cfg._attn_implementation,
        "gravity_eps": cfg.gravity_eps,
        "block_size": cfg.gravity_block_size,
        "sparsity": cfg.gravity_sparsity,
        "layers": layers,
    }


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", nargs="?", default=None, help="model directory (default: the bundled tiny model)"
    )


@command(
    "info",
    "show a gravity model's architecture, size, masses and attention implementation",
    _info_args,
)
def run_info(args: argparse.Namespace) -> int:
    from .io import load_model, resolve_model_path

    path = resolve_model_path(args.path)
    model, tokenizer = load_model(path)
    s = model_summary(model)
    s["path"] = str(path)
    s["tokenizer"] = type(tokenizer).__name__ if tokenizer is not None else None
    if args.json:
        emit(args, s, "")
        return 0
    print(f"model        {path}")
    print(
        f"architecture {s['architecture']} ({s['model_type']}): {s['num_layers']} layers, hidden "
        f"{s['hidden_size']}, {s['num_attention_heads']} q / {s['num_key_value_heads']} kv heads, "
        f"head_dim {s['head_dim']}, vocab {s['vocab_size']}, context {s['max_position_embeddings']}"
    )
    print(f"parameters   {s['parameters']:,} ({s['dtype']})")
    print(f"attention    {s['attn_implementation']} (eps {s['gravity_eps']})")
    if s["block_size"]:
        print(f"sparsity     block size {s['block_size']}: {s['sparsity']}")
    print("masses M_h = softplus(gravity_mass_log), per layer:")
    print("  layer  q/kv heads   min      mean     max")
    for e in s["layers"]:
        if e["mass_min"] is None:
            print(
                f"  {e['layer']:>5}  {e['q_heads']:>2}/{e['kv_heads']:<2}       (all heads pruned)"
            )
            continue
        print(
            f"  {e['layer']:>5}  {e['q_heads']:>2}/{e['kv_heads']:<2}       "
            f"{e['mass_min']:<8.4f} {e['mass_mean']:<8.4f} {e['mass_max']:<8.4f}"
        )
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, config_required=True)


@command("validate", "resolve a pipeline config and check its paths; runs nothing", _validate_args)
def run_validate(args: argparse.Namespace) -> int:
    import yaml

    from .io import resolve_model_path

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    model_path = resolve_model_path(cfg.model.path)
    cfg.model.torch_device()
    resolved = config_to_dict(cfg)
    if args.json:
        emit(args, {"config": resolved, "model_path": str(model_path)}, "")
    else:
        print(yaml.safe_dump(resolved, sort_keys=False).rstrip())
        print(f"# ok: model {model_path}, run folder {Path(cfg.run_dir)}")
    return 0


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: the config's out_dir)")
    p.add_argument("--publish", default=None, help="copy the finished run here with a model card")


@command(
    "pretrain",
    "train a gravity model from scratch (the bundled tiny model's recipe)",
    _pretrain_args,
)
def run_pretrain_command(args: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, publish_checkpoint, run_pretrain

    cfg = load_config(PretrainConfig, args.config or "pipelines/pretrain-tiny.yaml", args.overrides)
    out = Path(args.out or cfg.out_dir)
    if args.publish:
        dest = publish_checkpoint(out, Path(args.publish))
        emit(args, {"published": str(dest)}, f"published {dest}")
        return 0
    model = run_pretrain(cfg, out)
    emit(args, {"model": str(model)}, f"pretrain {model}")
    return 0


__all__ = ["model_summary"]
