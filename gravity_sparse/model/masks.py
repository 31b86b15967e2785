"""Head and block masks: the file format, density, validation, and attaching them to a model.

`masks.safetensors` (DESIGN §4):
    head_keep  [L, H] bool
    block_mask [L, H, NQB, NKB] bool, lower-triangular; the diagonal of every kept head is set; a dropped
               head has no block
    metadata   block_size, max_length, density, heads_kept, method (strings)

Density = computed causal blocks / all causal blocks over all heads of the model (a dropped head computes
none); all causal blocks = L · H · NQB(NQB+1)/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gravity_sparse.atomic import atomic_path
from gravity_sparse.errors import UserError
from gravity_sparse.kernels import attach_kernel, detach_kernel


@dataclass
class Masks:
    head_keep: torch.Tensor  # (L, H) bool
    block_mask: torch.Tensor  # (L, H, NQB, NKB) bool
    block_size: int
    max_length: int
    method: str = "qubo"

    @property
    def num_blocks(self) -> int:
        return int(self.block_mask.shape[-1])

    def computed_blocks(self) -> torch.Tensor:
        """(L, H, NQB, NKB) bool: blocks a kernel computes (causal, kept, in a kept head)."""
        tril = torch.ones(self.num_blocks, self.num_blocks, dtype=torch.bool).tril()
        return self.block_mask & tril & self.head_keep[..., None, None]

    def density(self) -> float:
        nb = self.num_blocks
        total = self.head_keep.numel() * nb * (nb + 1) // 2
        return float(self.computed_blocks().sum()) / total

    def heads_kept(self) -> int:
        return int(self.head_keep.sum())

    def check(self) -> None:
        """Raise UserError unless the masks are a valid pattern (shapes, triangular, diagonals, heads)."""
        hk, bm = self.head_keep, self.block_mask
        if hk.dtype != torch.bool or bm.dtype != torch.bool:
            raise UserError("masks: head_keep and block_mask must be bool tensors")
        if hk.dim() != 2 or bm.dim() != 4 or bm.shape[:2] != hk.shape or bm.shape[2] != bm.shape[3]:
            raise UserError(
                f"masks: head_keep {list(hk.shape)} and block_mask {list(bm.shape)} do not fit "
                "[L, H] and [L, H, NB, NB]"
            )
        if self.block_size <= 0 or -(-self.max_length // self.block_size) != bm.shape[-1]:
            raise UserError(
                f"masks: {bm.shape[-1]} blocks do not cover max_length {self.max_length} "
                f"at block size {self.block_size}"
            )
        if (bm & ~torch.ones_like(bm[0, 0]).tril()).any():
            raise UserError("masks: block_mask has blocks above the diagonal (must be causal)")
        diag = bm.diagonal(dim1=-2, dim2=-1)  # (L, H, NB)
        if (hk[..., None] & ~diag).any():
            raise UserError(
                "masks: a kept head misses a diagonal block (every query must see itself)"
            )
        if (bm & ~hk[..., None, None]).any():
            raise UserError("masks: a dropped head still has kept blocks")


def dense_masks(num_layers: int, num_heads: int, block_size: int, max_length: int) -> Masks:
    """Every causal block of every head kept (density 1)."""
    nb = -(-max_length // block_size)
    tril = torch.ones(nb, nb, dtype=torch.bool).tril()
    return Masks(
        torch.ones(num_layers, num_heads, dtype=torch.bool),
        tril.expand(num_layers, num_heads, nb, nb).clone(),
        block_size,
        max_length,
        "dense",
    )


def write_masks(masks: Masks, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write `masks.safetensors` (validated first). Atomic: written beside the target, then renamed."""
    masks.check()
    path = Path(path)
    meta = {
        "block_size": str(masks.block_size),
        "max_length": str(masks.max_length),
        "density": f"{masks.density():.6f}",
        "heads_kept": str(masks.heads_kept()),
        "method": masks.method,
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tensors = {
        "head_keep": masks.head_keep.contiguous(),
        "block_mask": masks.block_mask.contiguous(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def read_masks(path: str | Path) -> Masks:
    """Read and validate a masks file; any problem is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"masks file {path} does not exist")
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read masks file {path}: {e}") from e
    missing = {"head_keep", "block_mask"} - set(tensors)
    if missing:
        raise UserError(f"masks file {path} lacks {sorted(missing)}")
    try:
        masks = Masks(
            tensors["head_keep"],
            tensors["block_mask"],
            int(meta["block_size"]),
            int(meta["max_length"]),
            meta.get("method", "unknown"),
        )
    except (KeyError, ValueError) as e:
        raise UserError(f"masks file {path}: metadata lacks block_size/max_length ({e})") from e
    try:
        masks.check()
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    return masks


def read_masks_method(path: str | Path) -> str:
    """The method a masks file stores in its metadata ('qubo-sa', 'greedy', ...), without its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("method", "unknown")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read masks file {path}: {e}") from e


def check_masks_match(model: torch.nn.Module, masks: Masks) -> None:
    """The masks were made for this model's shape (layers × heads), or a UserError."""
    layers = model.gravity_layers()
    heads = {attn.num_heads for attn in layers}
    L, H = masks.head_keep.shape
    if len(layers) != L or heads != {H}:
        raise UserError(
            f"masks are for a model of {L} layers × {H} heads; this model has {len(layers)} layers × "
            f"{sorted(heads)} heads"
        )


def attach_masks(model: torch.nn.Module, masks: Masks, *, kernel: str = "auto") -> torch.nn.Module:
    """Make the model's attention sparse: per-layer head and block masks, run by `kernel`.

    kernel: a backend name for `gravity_sparse.kernels.resolve_backend` (auto: Triton on CUDA, the
    block path with its hand-written backward on CPU; cpu; reference; triton; flex).
    """
    check_masks_match(model, masks)
    model.config.gravity_block_size = masks.block_size
    model.config.gravity_max_length = masks.max_length
    for i, attn in enumerate(model.gravity_layers()):
        attn.set_sparsity(masks.head_keep[i], masks.block_mask[i])
    attach_kernel(model, kernel)
    return model


def detach_masks(model: torch.nn.Module) -> torch.nn.Module:
    """Dense gravity attention again (reference path)."""
    for attn in model.gravity_layers():
        attn.set_sparsity(None, None)
    detach_kernel(model)
    model.config.gravity_block_size = None
    model.config.gravity_max_length = None
    return model


def extend_masks(masks: Masks, max_length: int) -> Masks:
    """Masks for sequences longer than `masks.max_length`, by the "diagonal" rule (DESIGN §4).

    Rows inside the original grid are unchanged. A new query-block row r copies the last row's pattern:
    a kept block of the last row whose column lies in the first half of the grid is an *anchor* (sink-like)
    and stays at its absolute column; every other kept block keeps its *offset from the diagonal*. Diagonal
    blocks of kept heads stay kept, dropped heads stay empty.
    """
    nb_old = masks.num_blocks
    nb = -(-max_length // masks.block_size)
    if nb <= nb_old:
        return masks
    L, H = masks.head_keep.shape
    grid = torch.zeros(L, H, nb, nb, dtype=torch.bool)
    grid[..., :nb_old, :nb_old] = masks.block_mask
    last = masks.block_mask[..., nb_old - 1, :]  # (L, H, nb_old)
    cols = torch.arange(nb_old)
    anchored = last & (cols < nb_old // 2)
    sliding = last & ~(cols < nb_old // 2)
    offsets = (nb_old - 1) - cols  # offset from the diagonal of each column in the last row
    for r in range(nb_old, nb):
        grid[..., r, :nb_old] |= anchored
        target = r - offsets  # (nb_old,)
        ok = target >= 0
        grid[..., r, target[ok]] |= sliding[..., ok]
        grid[..., r, r] = masks.head_keep
    grid &= masks.head_keep[..., None, None]
    out = Masks(masks.head_keep.clone(), grid, masks.block_size, max_length, masks.method)
    out.check()
    return out
