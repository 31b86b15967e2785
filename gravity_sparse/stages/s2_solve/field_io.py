"""Reading the field file that measure writes (`field.safetensors`), with one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gravity_sparse.errors import UserError

REQUIRED_KEYS = ("block_field", "importance", "redundancy", "mass", "kv_groups")
META_KEYS = ("block_size", "seq_len", "num_layers", "num_heads", "num_kv_heads")


def validate_field(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in tensors]
    if missing:
        raise UserError(f"{where}: field is missing tensor(s) {', '.join(missing)}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{where}: field metadata is missing {', '.join(missing)}")
    try:
        dims = {k: int(meta[k]) for k in META_KEYS}
    except ValueError:
        raise UserError(f"{where}: field metadata {META_KEYS} must be integers") from None
    num_layers, num_heads = dims["num_layers"], dims["num_heads"]
    nqb = -(-dims["seq_len"] // max(dims["block_size"], 1))
    expected = {
        "block_field": (num_layers, num_heads, nqb, nqb),
        "importance": (num_layers, num_heads),
        "redundancy": (num_layers, num_heads, num_heads),
        "mass": (num_layers, num_heads),
        "kv_groups": (num_layers, num_heads),
    }
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise UserError(
                f"{where}: {key} has shape {tuple(tensors[key].shape)}, metadata implies {shape}"
            )
    for key in ("block_grad", "block_grad_abs"):  # optional: measured with grad importance
        if key not in tensors:
            continue
        if tuple(tensors[key].shape) != expected["block_field"]:
            raise UserError(
                f"{where}: {key} has shape {tuple(tensors[key].shape)}, metadata "
                f"implies {expected['block_field']}"
            )
        if not torch.isfinite(tensors[key]).all():
            raise UserError(f"{where}: {key} holds non-finite values")
    groups = tensors["kv_groups"]
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= dims["num_kv_heads"]):
        raise UserError(f"{where}: kv_groups index a KV head outside 0..{dims['num_kv_heads'] - 1}")
    for key in ("block_field", "importance", "redundancy", "mass"):
        if not torch.isfinite(tensors[key]).all():
            raise UserError(f"{where}: {key} holds non-finite values")


def read_field(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load and validate a field.safetensors; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"field file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot read field {path}: {str(err).splitlines()[0]}") from None
    validate_field(tensors, meta, str(path))
    return tensors, meta


def check_field_matches_model(
    meta: dict[str, str], num_layers: int, num_heads: int, num_kv_heads: int
) -> None:
    """UserError if the field was measured on a model of another shape."""
    got = tuple(int(meta.get(k, -1)) for k in ("num_layers", "num_heads", "num_kv_heads"))
    want = (num_layers, num_heads, num_kv_heads)
    if got != want:
        raise UserError(
            f"field is for a model with (layers, heads, kv heads) = {got}, this model has {want}"
        )
