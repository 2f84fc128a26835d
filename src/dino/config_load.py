"""Building a :class:`~dino.config.Config`: the dataclass defaults, then a preset or YAML file
(which may name a ``base`` preset), then command-line overrides, each value coerced to its field's
type; :func:`~dino.config_checks.validate` checks the result."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from dino.config import SECTIONS, Config, leaf_fields
from dino.config_checks import validate
from dino.errors import DinoError

PRESET_DIR = Path(__file__).parent / "presets"

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(name: str, value: Any, typ: Any) -> Any:
    """``value`` (from YAML or the command line) as the type ``typ`` of config field ``name``."""
    origin = typing.get_origin(typ)
    what = _TYPE_NAMES.get(typ, str(typ))
    try:
        if value is None:
            raise DinoError(f"config field {name!r} has no value; give it one or leave it out")
        if origin is list:
            (inner,) = typing.get_args(typ)
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(name, v, inner) for v in value]
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(value)
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if value not in (0, 1):
                raise ValueError(value)
            return bool(value)
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return typ(value)
    except (TypeError, ValueError, OverflowError):
        if origin is list:
            what = f"a list of {_TYPE_NAMES.get(typing.get_args(typ)[0], 'values')[2:]}s"
        raise DinoError(f"config field {name!r} expects {what}, got {value!r}") from None


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set fields from a flat ``{leaf_name: value}`` or nested ``{section: {leaf: value}}`` dict."""
    leaves = leaf_fields()
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            apply_overrides(cfg, value)
            continue
        key = key.replace("-", "_")
        if key not in leaves:
            raise DinoError(f"unknown config field {key!r}; see `dino train --help` for the fields")
        section, f, typ = leaves[key]
        setattr(getattr(cfg, section), key, coerce(key, value, typ))
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Read a preset by name or a YAML file by path."""
    path = Path(name_or_path)
    if not path.exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise DinoError(
            f"no config file or preset named {name_or_path!r}; presets: {', '.join(list_presets())}"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise DinoError(f"{path} is not valid YAML ({where}{problem}); fix the file") from None
    if not isinstance(data, dict):
        raise DinoError(f"{path} must hold a mapping of config fields")
    return data


#: The built-in datasets, each with a preset of its own name: ``dino train`` with no --config
#: uses it on that dataset, and the reference recipe (``default``) on a folder.
OWN_PRESETS = ("fashion-mnist", "fashion-mnist-scenes", "fashion-mnist-photos")


def default_preset(data: str) -> str:
    """The preset ``dino train`` uses when no --config is given, for ``--data data``."""
    return data if data in OWN_PRESETS else "default"


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then a preset or YAML file (which may name a ``base`` preset), then overrides."""
    cfg = Config()
    if name_or_path:
        data = load_yaml(name_or_path)
        chain = [data]
        while "base" in chain[-1]:
            chain.append(load_yaml(chain[-1]["base"]))
        for layer in reversed(chain):
            apply_overrides(cfg, {k: v for k, v in layer.items() if k != "base"})
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg
