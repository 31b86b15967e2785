"""Typed configs: dataclasses filled from YAML plus dotted `key=value` overrides.

Unknown keys are errors (nanoGPT's configurator refuses unknown `--key`s; we keep that, not its `exec`).
Values are parsed as YAML scalars (`solve.density=0.3`, `heal.enabled=false`, `measure.layers=[0,1]`) and
checked against the field's type. `config_to_dict` gives the JSON/YAML form written next to every output;
`build_config(cls, config_to_dict(cfg)) == cfg` for every config (tested).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gravity_sparse.errors import UserError

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise UserError(f"config key {where} may not be null")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise UserError(f"config key {where} must be a mapping, got {value!r}")
        return build_config(inner, value, prefix=where)
    origin = typing.get_origin(inner)
    if inner is Any:
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key {where} must be true or false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {where} must be an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {where} must be a number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"config key {where} must be a string, got {value!r}")
        return str(value)
    if origin in (list, tuple) or inner in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {where} must be a list, got {value!r}")
        args = typing.get_args(inner)
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(inner)
        if value not in allowed:
            raise UserError(f"config key {where} must be one of {list(allowed)}, got {value!r}")
        return value
    return value


def build_config(cls: type[T], data: dict[str, Any] | None, *, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a (nested) mapping; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(
            f"unknown config key {where}{unknown[0]} (known under {prefix or 'the top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid config{' ' + prefix if prefix else ''}: {e}") from e


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (JSON/YAML-safe) of a config dataclass."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'solve.density=0.3' -> (['solve', 'density'], 0.3); the value is a YAML scalar/list."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: cannot parse the value ({e})") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested mapping (a copy); creates intermediate mappings as needed."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {text!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {p}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {p} must be a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + dotted overrides -> a validated `cls` instance."""
    data = read_yaml(path) if path is not None else {}
    return build_config(cls, apply_overrides(data, list(overrides or [])))
