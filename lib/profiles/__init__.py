"""Run profiles (smoke / quick / paper): every scale-dependent number lives in one YAML file."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

from lib.profiles.schema import DRY_RUN_KEY, check_profile, read_profile

PROFILES: tuple[str, ...] = ("smoke", "quick", "paper")
_DIR = Path(__file__).resolve().parent


def load_profile(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read profile `name`; `overrides` maps dotted keys ("datasets.digits.test_size") to new values.

    `name` may also be a dry-run name ("paper-dry-run", see `dry_run_name`): the profile with `dry_run` applied
    after the overrides.
    """
    base = name.removesuffix(DRY_RUN_SUFFIX) if isinstance(name, str) else name
    if base not in PROFILES:
        valid = ", ".join(PROFILES)
        raise ValueError(f"unknown profile {name!r}; valid profiles: {valid} (each also as <name>{DRY_RUN_SUFFIX})")
    path = _DIR / f"{base}.yaml"
    profile = read_profile(path)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a mapping of dotted keys to values, got {overrides!r}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(profile, dotted, value)
    if overrides:
        check_profile(profile, f"{path} with overrides {dict(overrides)!r}")
    return dry_run(profile) if name != base else profile


# --------------------------------------------------------------------------- dry runs

DRY_RUN_SUFFIX = "-dry-run"
DRY_RUN_TRAIN = 16     # images in every training subset (room for a validation split held out of it)
DRY_RUN_SIZE = 8       # images in every other subset a dry run loads
DRY_RUN_FEW = 2        # figure rows, examples, step counts, EOT draws, sweep entries

# One rule per kind of setting, matched on the setting's key (first match wins); every other value is kept, so a
# dry run has the profile's datasets, architectures, image sizes, kinds of attack (with their own eps) and code paths.
# AutoAttack's parameter sets (the mappings with a `version`) also get n_iter, n_queries and n_target_classes =
# DRY_RUN_FEW (its targeted APGD and FAB otherwise cycle through 9 target classes).
#   key pattern                                                  -> dry-run value
_DRY_RUN_RULES: tuple[tuple[str, str], ...] = (
    (r"batch_size|eval_batch_size|.*image_size|patch_size",      "keep"),      # batch and model shapes
    (r"n_atoms|n_feats|n_blocks|noise_copies|top_k",             "keep"),      # architectures, not counts of work
    (r".*examples|figure_images",                                "few"),       # figure rows
    (r"train_size|.*_train_size|n_train|pool_images",            "train"),     # training subsets (IDFR's FR pool); None too
    (r".*_size|n_.*|.*_images|.*_per_image",                     "size"),      # other subsets; None (= all) too
    (r"epochs|.*_epochs",                                        "one"),
    (r"steps_per_epoch",                                         "few"),
    (r".*_steps|steps|steps_grid|max_iter|n_iter|mi_refine",     "few"),       # a list: ranks 1, 2 of its first two
    (r"restarts|n_restarts",                                     "one"),
    (r".*samples|.*_draws",                                      "few"),       # EOT draws (a list: 1, 2)
    (r"sweep_.*|candidates|seeds",                               "first_few"), # selections trained per entry
    (r".*attacks",                                               "per_kind"),  # first entry of each kind of attack
)


def dry_run_name(profile: str) -> str:
    """The name of `profile`'s dry run: results go to results/<profile>-dry-run/."""
    return profile + DRY_RUN_SUFFIX


def is_dry_run(profile: Mapping[str, Any]) -> bool:
    """True for a profile made by `dry_run` (its numbers are no results)."""
    return bool(profile.get("dry_run"))


def dry_run_banner(profile_name: str) -> str:
    """The line that marks everything a dry run writes (SUMMARY.md, REPORT.md, each notebook's first output) as no
    result; "" for any other profile."""
    if not profile_name.endswith(DRY_RUN_SUFFIX):
        return ""
    return (f"**DRY RUN of profile `{profile_name.removesuffix(DRY_RUN_SUFFIX)}`: NOT RESULTS.** Every subset, "
            f"epoch, iteration and sweep was capped to a minimum to check that the code runs; no number here "
            f"measures any method.")


def dry_run(profile: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `profile` capped to a minimum, as PyTorch Lightning's fast_dev_run: every training subset
    DRY_RUN_TRAIN images and every other DRY_RUN_SIZE, every epoch count 1, every step, iteration, EOT and figure
    count at most DRY_RUN_FEW, every sweep its first DRY_RUN_FEW entries, every attack list one entry per kind of
    attack (rules in _DRY_RUN_RULES, by key); AutoAttack DRY_RUN_FEW iterations, queries and target classes. A
    notebook section's `dry_run` mapping replaces its settings before the caps (nested mappings key by key): the few
    levels of a strength grid that its tables look up, where a rule by key cannot know which ones. Everything else
    is kept (eps grids of curves too), so the dry run exercises the profile's datasets, models and code paths in
    minutes. Values keep their types (None, meaning
    "all", becomes an int). Trained models are cached under their configuration, which the caps change (subset
    digests, epochs), so a dry run never writes an entry a full run would load."""
    if is_dry_run(profile):
        return copy.deepcopy(dict(profile))
    profile = copy.deepcopy(dict(profile))
    for section in profile["notebooks"].values():
        _merge(section, section.pop(DRY_RUN_KEY, None) or {})
    capped = _cap(profile, None)
    capped.update(name=dry_run_name(profile["name"]), dry_run=True,
                  description=f"DRY RUN of {profile['name']} (capped to a minimum; not results): "
                              f"{profile.get('description', '')}")
    return capped


def _merge(settings: dict[str, Any], replaced: Mapping[str, Any]) -> None:
    """Put `replaced` into `settings` in place: nested mappings key by key, any other value whole."""
    for key, value in replaced.items():
        if isinstance(value, Mapping) and isinstance(settings.get(key), dict):
            _merge(settings[key], value)
        else:
            settings[key] = copy.deepcopy(value)


def _rule(key: str | None) -> str:
    if key is None:
        return "keep"
    return next((rule for pattern, rule in _DRY_RUN_RULES if re.fullmatch(pattern, key)), "keep")


def _one_per_kind(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first attack entry of each kind (attack, norm and parameter names): the others differ only in values
    (budgets, step sizes), a sweep whose code path the first entry already runs."""
    kinds = [(e["name"], e.get("norm"), tuple(sorted(e.get("params") or {}))) for e in entries]
    return [e for i, e in enumerate(entries) if kinds[i] not in kinds[:i]]


def _cap(node: Any, key: str | None) -> Any:
    """`node` (the value of setting `key`) with its dry-run rule applied, recursively for sections and lists."""
    rule = _rule(key)
    if isinstance(node, dict):
        if "version" in node:  # AutoAttack's parameters: its own budgets, left to the official ones in profiles
            node = {**node, "n_iter": DRY_RUN_FEW, "n_queries": DRY_RUN_FEW, "n_target_classes": DRY_RUN_FEW}
        return {k: _cap(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        if rule == "first_few":
            node = node[:DRY_RUN_FEW]
        if rule == "per_kind" and all(isinstance(v, dict) and "name" in v for v in node):
            node = _one_per_kind(node)
        if rule == "few" and all(isinstance(v, int) and not isinstance(v, bool) for v in node):
            return [min(v, rank) for rank, v in enumerate(node[:DRY_RUN_FEW], 1)]  # increasing, like the original
        return [_cap(v, key if isinstance(v, (dict, list)) else None) for v in node]
    if isinstance(node, bool) or not (node is None or isinstance(node, int)):
        return node
    limit = {"train": DRY_RUN_TRAIN, "size": DRY_RUN_SIZE, "few": DRY_RUN_FEW, "one": 1}.get(rule)
    if limit is None or (node is None and rule not in ("train", "size")):  # None steps: "the paper's rule", kept
        return node
    return limit if node is None else min(node, limit)


def notebook_config(profile: Mapping[str, Any], notebook: str) -> dict[str, Any]:
    """The profile's section for one notebook (ValueError naming the notebook if absent)."""
    return _section(profile, "notebooks", notebook, "no section for notebook")


def notebook_profile(profile: Mapping[str, Any], notebook: str) -> dict[str, Any]:
    """The profile as `notebook` sees it: a copy whose dataset sections take the notebook section's
    `dataset_settings` ({dataset: {role section: settings}}, each replacing that whole section), so that one
    notebook can use its paper's classifiers (ARN's ResNet-110 on CIFAR-10) while the others keep the shared ones."""
    out = copy.deepcopy(dict(profile))
    for dataset, sections in notebook_config(profile, notebook).get("dataset_settings", {}).items():
        if dataset not in out.get("datasets", {}):
            raise ValueError(f"profile {profile['name']!r}: notebook {notebook!r} has dataset_settings for {dataset!r}, "
                             f"which has no section under datasets (it has: {', '.join(sorted(out.get('datasets', {})))})")
        out["datasets"][dataset].update(copy.deepcopy(sections))
    return out


def dataset_config(profile: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The profile's data and classifier settings for one dataset."""
    return _section(profile, "datasets", dataset, "no settings for dataset")


def _section(profile: Mapping[str, Any], group: str, key: str, missing: str) -> dict[str, Any]:
    sections = profile.get(group, {})
    if key not in sections:
        raise ValueError(f"profile {profile['name']!r} has {missing} {key!r}; it has: {', '.join(sorted(sections))}")
    return copy.deepcopy(sections[key])


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set an existing setting: a misspelt key is an error naming the section's settings, never a new key."""
    if not isinstance(dotted, str):
        raise ValueError(f"override keys must be dotted strings such as 'datasets.digits.test_size', got {dotted!r}")
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section of the profile")
        node = node[key]
    if keys[-1] not in node:
        section = ".".join(keys[:-1]) or "the top level"
        raise ValueError(f"override {dotted!r}: {section} has no setting {keys[-1]!r}; "
                         f"it has: {', '.join(map(str, node))}")
    node[keys[-1]] = value
