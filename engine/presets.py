"""Find, list and read the preset TOML files shipped in the `presets` package."""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from engine.config import ConfigError


def preset_names() -> list[str]:
    files = resources.files("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"Unknown preset {name!r}; available: {', '.join(preset_names())}.")
    return resources.files("presets").joinpath(f"{name}.toml").read_text()


def load_preset_raw(name: str) -> dict[str, Any]:
    return tomllib.loads(preset_text(name))
