"""Loading and saving gravity models.

Two layouts are accepted (DESIGN §2):

- **Gravity-2 layout**: a Hugging Face Qwen2 directory (config.json with model_type "qwen2", *.safetensors,
  tokenizer files) plus the learned masses, either as `gravity_mass_log.pt` — a float tensor
  [num_layers, num_heads] or a dict {"<prefix>layers.{i}.self_attn.gravity_mass_log": tensor[num_heads]} —
  or already inside the safetensors under those parameter names (any prefix).
- **Our format**: config.json with model_type "gravity" and `auto_map`, the weights, and the modeling
  files (`SOURCE_FILES`: configuration_gravity.py, modeling_gravity.py and the files it imports) beside
  them, so plain transformers loads it with `trust_remote_code=True`. `save_model` writes it.

Nothing is ever fetched from a hub: a path that does not exist is an error at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from gravity_sparse.atomic import atomic_path
from gravity_sparse.errors import UserError
from gravity_sparse.model.configuration_gravity import GravityConfig
from gravity_sparse.model.modeling_gravity import GravityForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "gravity-tiny"
MASS_FILE = "gravity_mass_log.pt"
_MASS_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.gravity_mass_log$")
BASE_KEY = "gravity_base"  # config key of a model shipped as a delta (gravitize/delta.py)
# the modeling files copied next to every checkpoint (modeling_gravity imports the others relatively)
SOURCE_FILES = (
    "configuration_gravity.py",
    "modeling_gravity.py",
    "gravity_reference.py",
    "gravity_blocks.py",
    "gravity_block_stores.py",
    "gravity_block_attention.py",
    "gravity_cache.py",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

AutoConfig.register("gravity", GravityConfig, exist_ok=True)
AutoModelForCausalLM.register(GravityConfig, GravityForCausalLM, exist_ok=True)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """The model directory to use: `path`, or the bundled tiny model when None. Must exist locally."""
    p = DEFAULT_MODEL if path is None else Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model path {p} does not exist (models are never downloaded)")
    if not p.is_dir():
        raise UserError(f"model path {p} is not a directory")
    if not (p / "config.json").is_file():
        raise UserError(f"{p} has no config.json: not a model directory")
    return p


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


def _check_safetensors(path: Path) -> list[str]:
    """Open every *.safetensors header (a truncated or corrupt file fails here) and return all keys."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights")
    keys: list[str] = []
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                keys.extend(sf.keys())
                expected = f.stat().st_size
            # the header lists offsets; a truncated body is only noticed when reading the last tensor
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    sf.get_slice(k)
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"corrupt or truncated weights file {f}: {e}") from e
        if expected == 0:
            raise UserError(f"empty weights file {f}")
    return keys


def _masses_from_object(
    obj: object, num_layers: int, heads: list[int], source: str
) -> list[torch.Tensor]:
    """Per-layer mass tensors from a [L, H] tensor or a {...layers.{i}.self_attn.gravity_mass_log: [H]} dict."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 2 or obj.shape[0] != num_layers or any(obj.shape[1] != h for h in heads):
            raise UserError(
                f"{source}: mass tensor has shape {list(obj.shape)}, expected [{num_layers}, {heads[0]}]"
            )
        return [obj[i].float() for i in range(num_layers)]
    if isinstance(obj, dict):
        found: dict[int, torch.Tensor] = {}
        for key, value in obj.items():
            m = _MASS_KEY.search(str(key))
            if m is None or not isinstance(value, torch.Tensor):
                raise UserError(
                    f"{source}: unexpected entry {key!r} (expected ...layers.N.self_attn.gravity_mass_log)"
                )
            found[int(m.group(1))] = value
        missing = [i for i in range(num_layers) if i not in found]
        if missing or len(found) != num_layers:
            raise UserError(
                f"{source}: masses for layers {missing or sorted(found)} do not match {num_layers} layers"
            )
        out = []
        for i in range(num_layers):
            t = found[i].reshape(-1).float()
            if t.numel() != heads[i]:
                raise UserError(
                    f"{source}: layer {i} has {t.numel()} masses, the layer has {heads[i]} heads"
                )
            out.append(t)
        return out
    raise UserError(f"{source}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer in {path}: {e}") from e


def require_tokenizer(
    tokenizer: PreTrainedTokenizerBase | None, path: str | os.PathLike | None
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, or a one-line UserError naming the files a tokenizer would come from."""
    if tokenizer is None:
        p = resolve_model_path(path)
        raise UserError(
            f"{p} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): text can only become "
            "token ids through the model's own tokenizer; copy its tokenizer files there"
        )
    return tokenizer


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[GravityForCausalLM, PreTrainedTokenizerBase | None]:
    """Load a gravity model (Gravity-2 layout or our format) and its tokenizer (None if it has none).

    `path` None loads the bundled tiny model. The model comes back in eval mode on `device` (default CPU),
    with gravity attention active.
    """
    p = resolve_model_path(path)
    raw = _read_json(p / "config.json")
    model_type = raw.get("model_type")
    keys = _check_safetensors(p)
    if BASE_KEY in raw:  # shipped as a difference to an installed base model (gravitize ship=delta)
        model = _load_delta(p, raw)
        model = model.to(dtype=dtype or torch.float32, device=device or "cpu").eval()
        return model, _load_tokenizer(p)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if model_type == "gravity":
            model = GravityForCausalLM.from_pretrained(p, **kwargs)
        elif model_type == "qwen2":
            fields = {
                k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")
            }
            config = GravityConfig(**{k: v for k, v in fields.items() if not k.startswith("_")})
            model = _load_gravity2(p, config, keys, kwargs)
        else:
            raise UserError(
                f"{p}: model_type {model_type!r} is neither 'gravity' nor a Qwen2 ('qwen2') model"
            )
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the model in {p}: {first}") from e
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, _load_tokenizer(p)


def _load_delta(p: Path, raw: dict) -> GravityForCausalLM:
    from gravity_sparse.gravitize.delta import load_from_base

    try:
        return load_from_base(p, raw)
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot rebuild the model in {p} from its base: {first}") from e


def _load_gravity2(
    p: Path, config: GravityConfig, keys: list[str], kwargs: dict
) -> GravityForCausalLM:
    model, info = GravityForCausalLM.from_pretrained(
        p, config=config, output_loading_info=True, **kwargs
    )
    layers = model.gravity_layers()
    heads = [attn.num_heads for attn in layers]
    mass_file = p / MASS_FILE
    masses_in_weights = not any(k.endswith("gravity_mass_log") for k in info["missing_keys"])
    if mass_file.exists():
        try:
            obj = torch.load(mass_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {mass_file}: {e}") from e
        masses = _masses_from_object(obj, len(layers), heads, str(mass_file))
    elif masses_in_weights:
        return model
    else:
        # masses stored in the safetensors under another prefix than the model's own
        stored = {k: None for k in keys if _MASS_KEY.search(k)}
        if not stored:
            raise UserError(
                f"{p}: no gravity masses (no {MASS_FILE} and no *.gravity_mass_log in the safetensors); "
                "the weights are meaningless under plain attention"
            )
        tensors = {}
        for f in sorted(p.glob("*.safetensors")):
            with safe_open(f, framework="pt") as sf:
                tensors.update({k: sf.get_tensor(k) for k in sf.keys() if k in stored})
        masses = _masses_from_object(tensors, len(layers), heads, f"{p} safetensors")
    with torch.no_grad():
        for attn, m in zip(layers, masses, strict=True):
            attn.gravity_mass_log.copy_(m.to(attn.gravity_mass_log.dtype))
    return model


def save_model(
    model: GravityForCausalLM,
    tokenizer: PreTrainedTokenizerBase | None,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write our format: weights (safetensors), config with `auto_map`, the modeling files, the tokenizer.

    Atomic: written to a temporary sibling folder and renamed, so an interrupted save leaves no directory that
    looks complete. An existing directory is refused unless `overwrite`.
    """
    out = Path(directory)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        model.config.auto_map = {
            "AutoConfig": "configuration_gravity.GravityConfig",
            "AutoModelForCausalLM": "modeling_gravity.GravityForCausalLM",
        }
        model.config.architectures = ["GravityForCausalLM"]
        model.save_pretrained(tmp)
        for name in SOURCE_FILES:
            shutil.copyfile(Path(__file__).with_name(name), tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
