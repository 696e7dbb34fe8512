"""The schema every profile file is checked against when it is loaded: unknown keys and wrong types are one
ValueError that names the file, the setting's dotted path, the value and what is allowed.

Checked: the top level, each dataset's section and its classifier settings (lib.train reads them), the names of
the notebook sections (one per notebook of the series) and every attack entry (a list of mappings with a `name`,
anywhere in a notebook's section: a registered attack, parameters it accepts). A notebook's other settings are
read, with their defaults, by the paper code that owns them.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Mapping

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"

_INT, _NUMBER, _STR, _BOOL, _MAP, _NONE = "an integer", "a number", "a string", "true/false", "a mapping", "null"

TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "name": (_STR,), "description": (_STR,), "seed": (_INT,), "threads": (_INT, _NONE),
    "eval_batch_size": (_INT,), "notebook_timeout_s": (_NUMBER, _NONE), "datasets": (_MAP,), "notebooks": (_MAP,),
    "dry_run": (_BOOL,), "purify_batch_sizes": (_MAP,),
}
# in a notebook section: settings a dry run uses instead of the section's own, nested mappings key by key
# (lib.profiles.dry_run; a full run ignores them)
DRY_RUN_KEY = "dry_run"
REQUIRED = ("name", "seed", "datasets", "notebooks")
# lib.train.trained_classifier's roles -> the dataset section's key that holds each role's classifier spec
CLASSIFIER_ROLES: dict[str, str] = {"target": "classifier", "surrogate": "surrogate", "adversarial": "adversarial",
                                    "transfer": "transfer"}
DATASET: dict[str, tuple[str, ...]] = {
    "train_size": (_INT, _NONE), "test_size": (_INT, _NONE), **{key: (_MAP,) for key in CLASSIFIER_ROLES.values()},
}
CLASSIFIER: dict[str, tuple[str, ...]] = {   # lib.train.trained_classifier, TrainConfig and lib.models' specs
    "arch": (_STR,), "width": (_NUMBER,), "depth": (_INT, _NONE), "epochs": (_INT,), "batch_size": (_INT,),
    "optimizer": (_STR,), "lr": (_NUMBER,), "momentum": (_NUMBER,), "weight_decay": (_NUMBER,), "cosine": (_BOOL,),
    "augment": (_BOOL,), "seed": (_INT,), "attack": (_MAP,), "train_size": (_INT, _NONE), "pretrained": (_BOOL,),
    "image_size": (_INT,), "widen_factor": (_INT,), "dropout": (_NUMBER,), "weights": (_STR, _NONE),
}


def check_profile(profile: Any, source: str | Path) -> None:
    """ValueError naming `source` (the profile file) unless `profile` follows the schema above."""
    where = f"profile {source}"
    if profile is None:
        raise ValueError(f"{where} is empty; a profile is a mapping with at least {', '.join(REQUIRED)}")
    _check_section(profile, TOP_LEVEL, where, "")
    missing = [k for k in REQUIRED if k not in profile]
    if missing:
        raise ValueError(f"{where} lacks the required setting(s) {', '.join(missing)}")
    for dataset, section in profile["datasets"].items():
        _check_section(section, DATASET, where, f"datasets.{dataset}")
        for role in CLASSIFIER_ROLES.values():
            if role in section:
                _check_section(section[role], CLASSIFIER, where, f"datasets.{dataset}.{role}")
    known = sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    for notebook, section in profile["notebooks"].items():
        if str(notebook) not in known:
            raise ValueError(f"{where}: notebooks.{notebook} is not a notebook of the series; have: {', '.join(known)}")
        if not isinstance(section, Mapping):
            raise ValueError(f"{where}: notebooks.{notebook} must be a mapping of settings, got {section!r}")
        _check_attack_entries(section, where, f"notebooks.{notebook}")
        _check_dry_run_settings(section, where, f"notebooks.{notebook}")


def _check_dry_run_settings(section: Mapping[str, Any], where: str, path: str) -> None:
    """A section's DRY_RUN_KEY mapping may only replace settings the section has, at any depth (a misspelt key
    would add one)."""
    replaced = section.get(DRY_RUN_KEY, {})
    if not isinstance(replaced, Mapping):
        raise ValueError(f"{where}: {path}.dry_run must be a mapping of the section's settings, got {replaced!r}")
    unknown = _unknown_keys(replaced, {k: v for k, v in section.items() if k != DRY_RUN_KEY})
    if unknown:
        raise ValueError(f"{where}: {path}.dry_run replaces {', '.join(unknown)}, which the section does not set")


def _unknown_keys(replaced: Mapping[str, Any], settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of `replaced` that `settings` lacks (nested mappings are compared key by key)."""
    unknown = []
    for key, value in replaced.items():
        if key not in settings:
            unknown.append(f"{prefix}{key}")
        elif isinstance(value, Mapping) and isinstance(settings[key], Mapping):
            unknown += _unknown_keys(value, settings[key], f"{prefix}{key}.")
    return sorted(unknown)


def _check_section(section: Any, schema: Mapping[str, tuple[str, ...]], where: str, path: str) -> None:
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: {path or 'the file'} must be a mapping of settings, got {section!r}")
    for key, value in section.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in schema:
            raise ValueError(f"{where}: unknown setting {dotted!r}; allowed here: {', '.join(schema)}")
        if not any(_is(value, kind) for kind in schema[key]):
            raise ValueError(f"{where}: {dotted} must be {' or '.join(schema[key])}, got {value!r}")


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == _BOOL
    return {_INT: isinstance(value, numbers.Integral), _NUMBER: isinstance(value, numbers.Real),
            _STR: isinstance(value, str), _MAP: isinstance(value, Mapping), _NONE: value is None}.get(kind, False)


def _check_attack_entries(node: Any, where: str, path: str) -> None:
    """Every list under `node` with a mapping that has a `name` is a list of attack entries: check each entry."""
    from lib.attacks.registry import check_attack_entry

    if isinstance(node, Mapping):
        for key, value in node.items():
            _check_attack_entries(value, where, f"{path}.{key}")
    elif isinstance(node, list) and any(isinstance(e, Mapping) and "name" in e for e in node):
        for i, entry in enumerate(node):
            try:
                check_attack_entry(entry, f"{path}[{i}]")
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None


def read_profile(path: Path) -> dict[str, Any]:
    """Parse the profile file at `path` and check it against the schema (ValueError naming the file otherwise,
    also for YAML that does not parse)."""
    import yaml

    try:
        profile = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"profile {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    check_profile(profile, path)
    return profile
