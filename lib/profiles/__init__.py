"""Run profiles (smoke / quick / paper): every scale-dependent number lives in one YAML file."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

PROFILES: tuple[str, ...] = ("smoke", "quick", "paper")
_DIR = Path(__file__).resolve().parent


def load_profile(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read profile `name`; `overrides` maps dotted keys ("datasets.digits.test_size") to new values."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    profile = yaml.safe_load((_DIR / f"{name}.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        _set_dotted(profile, dotted, value)
    return profile


def notebook_config(profile: Mapping[str, Any], notebook: str) -> dict[str, Any]:
    """The profile's section for one notebook (ValueError naming the notebook if absent)."""
    return _section(profile, "notebooks", notebook, "no section for notebook")


def dataset_config(profile: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The profile's data and classifier settings for one dataset."""
    return _section(profile, "datasets", dataset, "no settings for dataset")


def _section(profile: Mapping[str, Any], group: str, key: str, missing: str) -> dict[str, Any]:
    sections = profile.get(group, {})
    if key not in sections:
        raise ValueError(f"profile {profile['name']!r} has {missing} {key!r}; it has: {', '.join(sorted(sections))}")
    return copy.deepcopy(sections[key])


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section of the profile")
        node = node[key]
    node[keys[-1]] = value
