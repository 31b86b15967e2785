"""gravitize: turn a pretrained dot-product Llama/Qwen2 model into a gravity model (the Gravity-2 recipe)."""

from .config import GravitizeConfig

__all__ = ["GravitizeConfig"]
