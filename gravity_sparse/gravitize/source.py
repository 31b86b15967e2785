"""Reading the dot-product model to gravitize: a Hugging Face directory or a GGUF file, offline.

GGUF files go through transformers' own GGUF loading (it needs the `gguf` package) and are de-quantised to
float32. Every failure is a one-line UserError: a missing path, a file that is not GGUF, a missing `gguf`
package, a loader error, a missing tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def load_source(path: str | Path, tokenizer_dir: str | Path | None = None):
    """(model, tokenizer) of a Hugging Face directory or a GGUF file, offline; errors are one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"source model {p} does not exist (models are never downloaded)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"{p} is a file but not a .gguf model")
        if importlib.util.find_spec("gguf") is None:
            raise UserError("reading a GGUF file needs the gguf package: pip install gguf")
        kwargs["gguf_file"] = p.name
        p = p.parent
    elif not (p / "config.json").is_file():
        raise UserError(f"{p} has no config.json: not a Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, **kwargs).eval()
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's input
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load the source model {path}: {first}") from e
    tok_path = Path(tokenizer_dir) if tokenizer_dir else p
    try:
        tok_kwargs = {} if tokenizer_dir else {k: v for k, v in kwargs.items() if k == "gguf_file"}
        tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True, **tok_kwargs)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"no usable tokenizer for {path} (looked in {tok_path}: tokenizer.json, "
            f"tokenizer_config.json or the GGUF's own): {str(e).splitlines()[0] if str(e) else e}"
        ) from e
    return model, tokenizer
