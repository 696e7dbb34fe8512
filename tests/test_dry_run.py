"""Dry runs (lib.profiles.dry_run, runner --dry-run): capped profiles, and every notebook of the paper and quick
profiles run end to end on tiny datasets written in each real on-disk format (tests/fixtures/datasets.py)."""
from __future__ import annotations

import copy
import fnmatch
import json
import os
from pathlib import Path

import pytest

from fixtures import datasets as fixture
from lib import runner
from lib.profiles.schema import CLASSIFIER_ROLES
from lib.profiles import (DRY_RUN_FEW, DRY_RUN_SIZE, DRY_RUN_TRAIN, PROFILES, dry_run, dry_run_banner, dry_run_name,
                          is_dry_run, load_profile)


def _leaves(tree, path=()):
    """(path of keys, value) of every scalar in a profile (list items get their index in the path)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _leaves(value, (*path, i))
    else:
        yield path, tree


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _last_key(path) -> str:
    return next(k for k in reversed(path) if isinstance(k, str))


def _attack_lists(tree, path=()):
    """(path, list) of every list of attack entries (mappings with a `name`) in a profile."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _attack_lists(value, (*path, str(key)))
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) and "name" in v for v in tree):
        yield path, tree


def _kind(entry) -> tuple:
    return entry["name"], entry.get("norm"), tuple(sorted(entry.get("params") or {}))


def _label(entry) -> str:
    return entry.get("label", entry["name"])


def _aligned(full, dry):
    """`full` with each attack list cut to the entries the dry run kept (by label), after checking that the dry
    run kept exactly one entry of each kind of attack, in order."""
    full = copy.deepcopy(full)
    for path, kept in _attack_lists(dry):
        first_of_kind = {}
        for entry in _get(full, path):
            first_of_kind.setdefault(_kind(entry), entry)
        assert [_label(e) for e in kept] == [_label(e) for e in first_of_kind.values()], path
        _get(full, path[:-1])[path[-1]] = list(first_of_kind.values())
    return full


def _with_dry_run_settings(profile):
    """`profile` with each notebook section's `dry_run` settings in place of its own, nested mappings key by key
    (what the caps start from)."""
    def merged(settings, replaced):
        return {**settings, **{k: merged(settings[k], v) if isinstance(v, dict) and isinstance(settings.get(k), dict)
                               else v for k, v in replaced.items()}}

    profile = copy.deepcopy(profile)
    profile["notebooks"] = {name: merged({k: v for k, v in section.items() if k != "dry_run"}, section.get("dry_run", {}))
                            for name, section in profile["notebooks"].items()}
    return profile


@pytest.mark.parametrize("name", PROFILES)
def test_dry_run_caps_every_count_and_keeps_the_rest(name):
    full, dry = load_profile(name), load_profile(dry_run_name(name))
    assert dry == dry_run(full) and is_dry_run(dry) and not is_dry_run(full)
    assert dry["name"] == f"{name}-dry-run" and dry["datasets"].keys() == full["datasets"].keys()
    full = _aligned(_with_dry_run_settings(full), dry)
    capped = 0
    for path, value in _leaves(dry):
        key = _last_key(path)
        if path[0] in ("name", "description", "dry_run"):
            continue
        try:
            original = _get(full, path)
        except (IndexError, KeyError):   # AutoAttack budgets the dry run adds, and list items it dropped
            assert key in ("n_iter", "n_queries", "n_target_classes") and value == DRY_RUN_FEW, path
            continue
        assert type(value) is type(original) or original is None, (path, original, value)
        if value != original:
            capped += 1
            assert isinstance(value, int) and not isinstance(value, bool), (path, original, value)
        if key in ("epochs", "pre_epochs", "dict_epochs"):
            assert value == min(original, 1), path   # 0 (pretrained, no training) stays 0
        elif key.endswith("steps") and value is not None:
            assert value <= DRY_RUN_FEW, path
        elif key in ("train_size", "sfm_train_size", "id_train_size", "n_train", "pool_images"):
            assert value <= DRY_RUN_TRAIN, path
        elif key.endswith("image_size") or key in ("arch", "name", "eps", "width", "depth", "batch_size", "lr"):
            assert value == original, path
        elif key.endswith("_size") and key not in ("batch_size", "eval_batch_size", "patch_size"):
            assert value <= DRY_RUN_SIZE, path
        elif len(path) > 1 and path[-2] == "datasets":   # the datasets each notebook runs on
            assert value == original, path
    assert capped > 10
    for section in dry["notebooks"].values():
        for key in ("sweep_ratios", "seeds"):
            assert len(section.get(key, [])) <= DRY_RUN_FEW
    assert dry_run(dry) == dry


def test_step_lists_stay_increasing_and_none_steps_keep_the_papers_rule():
    dry = load_profile("paper-dry-run")["notebooks"]
    assert dry["05_attack_invariant_arn"]["bpda_steps"] == [1, 2]
    assert dry["04_image_reconstruction"]["cw"]["steps_grid"] == [1, 2]
    assert dry["04_image_reconstruction"]["bim_steps"] is None       # Kurakin's rule
    assert dry["02_idfr"]["eval_size"] == DRY_RUN_SIZE and dry["02_idfr"]["id_train_size"] == DRY_RUN_TRAIN
    assert dry["09_cross_defense_benchmark"]["attacks"][-1]["params"]["n_queries"] == DRY_RUN_FEW
    assert dry["09_cross_defense_benchmark"]["attacks"][-1]["params"]["n_target_classes"] == DRY_RUN_FEW


def test_a_notebook_section_names_the_strengths_its_dry_run_purifies():
    """RegionSparse's dry run purifies the strengths its tables look up (OMP at 299 x 299 dominates its time), not
    the whole grid; a full run keeps the grid, and a `dry_run` setting the section does not have is refused."""
    full = load_profile("paper")["notebooks"]["03_regionsparse"]
    dry = load_profile("paper-dry-run")["notebooks"]["03_regionsparse"]
    assert full["linf_grid"] == [2, 6, 10, 14, 18, 22] and dry["linf_grid"] == [10, 22] and "dry_run" not in dry
    for grid, level in (("linf_grid", dry["ablation"]["linf"]), ("l2_grid", dry["ablation"]["l2"]),
                        ("linf_grid", dry["transfer"]["linf"]), ("l2_grid", dry["transfer"]["l2"])):
        assert level in dry[grid]
    assert set(dry["table2_linf"]) <= set(dry["linf_grid"]) and set(dry["table2_l2"]) <= set(dry["l2_grid"])
    with pytest.raises(ValueError, match="dry_run replaces linf_grids, which the section does not set"):
        load_profile("paper", {"notebooks.03_regionsparse.dry_run": {"linf_grids": [10]}})


def test_a_dry_run_setting_replaces_nested_settings_key_by_key():
    """A nested mapping in `dry_run` changes only the keys it names, and a nested key the section does not have is
    refused with its dotted path."""
    key = "notebooks.03_regionsparse.dry_run"
    full = load_profile("paper")["notebooks"]["03_regionsparse"]
    dry = load_profile("paper-dry-run", {key: {"extended": {"linf": [22]}}})["notebooks"]["03_regionsparse"]
    assert dry["extended"] == {"linf": [22], "l2": full["extended"]["l2"]} and dry["linf_grid"] == full["linf_grid"]
    with pytest.raises(ValueError, match=r"dry_run replaces extended\.linfs, which the section does not set"):
        load_profile("paper", {key: {"extended": {"linfs": [22]}}})


def test_attack_lists_keep_one_entry_per_kind_of_attack():
    """Entries that differ only in budget are a sweep (one kept); a different loss or norm is another code path."""
    dry = load_profile("paper-dry-run")["notebooks"]
    labels = {key: [e["label"] for e in dry["01_sfm_defense"][key]] for key in ("black_attacks", "gray_attacks")}
    assert labels == {"black_attacks": ["PGD-8", "MIM-8", "Diverse-8"], "gray_attacks": ["FGSM-8", "PGD-8", "CW"]}
    assert [e["label"] for e in dry["09_cross_defense_benchmark"]["attacks"]] == [
        e["label"] for e in load_profile("paper")["notebooks"]["09_cross_defense_benchmark"]["attacks"]]


@pytest.mark.parametrize("name", PROFILES)
def test_a_dry_run_trains_nothing_a_full_run_would_load(name):
    """Cached classifiers are keyed by their training subset and settings: every one differs in the dry run."""
    full, dry = load_profile(name), load_profile(dry_run_name(name))
    for dataset, section in full["datasets"].items():
        for role in CLASSIFIER_ROLES.values():
            if role in section:
                before = (section.get("train_size"), section[role]["epochs"])
                after = (dry["datasets"][dataset].get("train_size"), dry["datasets"][dataset][role]["epochs"])
                assert before != after, (dataset, role)


def test_dry_run_names_and_banner():
    assert dry_run_banner("paper") == ""
    assert "NOT RESULTS" in dry_run_banner("paper-dry-run")
    with pytest.raises(ValueError, match="valid profiles: smoke, quick, paper"):
        load_profile("fast-dry-run")


# --------------------------------------------------------------------------- end to end on the fixtures


def _dry_run_env(root: Path, monkeypatch, datasets: tuple[str, ...], weights: bool) -> Path:
    """Fixtures of `datasets` (and stand-in ImageNet weights) under root, trusted in every notebook kernel."""
    data_root = root / "data"
    fixture.write_datasets(data_root, datasets)
    if weights:
        fixture.write_imagenet_weights(root / "torch", data_root)
    fixture.kernel_startup(root / "ipython", data_root)
    for var, value in (("ADV_DATA_ROOT", data_root), ("ADV_RESULTS_DIR", root / "results"),
                       ("ADV_CACHE_DIR", root / "cache"), ("IPYTHONDIR", root / "ipython"),
                       ("TORCH_HOME", root / "torch"), ("ADV_DATA_DOWNLOAD", "0"),
                       ("OMP_NUM_THREADS", os.cpu_count() or 1)):   # the suite's one thread per test: not here
        monkeypatch.setenv(var, str(value))
    return root / "results"


@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory):
    """The runner's paper dry run over all notebooks on fixtures of every dataset and stand-in ImageNet weights.
    One notebook at a time: 01, 02, 03 and 05 each hold 12-13 GB at their peak (README: "Dry runs")."""
    root = tmp_path_factory.mktemp("paper_dry_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        results = _dry_run_env(root, monkeypatch, tuple(fixture.WRITERS), weights=True)
        code = runner.main(["--profile", "paper", "--dry-run"])
    return code, results / "paper-dry-run"


@pytest.fixture(scope="module")
def quick_dry_run(tmp_path_factory):
    """The quick profile's dry run with MNIST and CIFAR-10 fixtures (Fashion-MNIST: Debian's files when installed)."""
    root = tmp_path_factory.mktemp("quick_dry_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        results = _dry_run_env(root, monkeypatch, ("mnist", "cifar10"), weights=False)
        code = runner.main(["--profile", "quick", "--dry-run"])
    return code, results / "quick-dry-run"


def _statuses(out: Path, books: list[Path]) -> dict[str, dict]:
    return {book.stem: runner.read_status(out / book.stem) for book in books}


@pytest.mark.timeout(3600)
@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("run", ["paper_dry_run", "quick_dry_run"])
def test_dry_run_finishes_every_notebook_and_says_it_is_no_result(run, request):
    code, out = request.getfixturevalue(run)
    books = runner.discover()
    failed = {nb: s and s["error"] for nb, s in _statuses(out, books).items() if not s or s["status"] != "ok"}
    assert not failed and code == 0, failed
    banner = dry_run_banner(out.name)
    assert banner in (out / "SUMMARY.md").read_text()
    assert not any(b.stem.startswith("10") for b in books) or banner in (out / "REPORT.md").read_text()
    for book in books:
        executed = json.loads((out / book.stem / book.name).read_text())
        first = next(c for c in executed["cells"] if c["cell_type"] == "code" and c.get("outputs"))
        assert "NOT RESULTS" in "".join(first["outputs"][0].get("text", "")), book.stem


# --------------------------------------------------------------------------- the papers' tables the dry run covers

PRODUCED_BY = Path(runner.__file__).resolve().parent / "reference" / "produced_by.csv"


def _produced_by() -> list[dict[str, str]]:
    """lib/reference/produced_by.csv: per paper table, the notebook and the globs of our result tables (space
    separated) that reproduce it, or the reason we never produce it."""
    import csv

    with PRODUCED_BY.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_paper_table_has_a_producing_notebook_or_a_skip_reason():
    import pandas as pd

    from lib.reproduction import NOTEBOOK_PAPERS

    index = pd.read_csv(Path(runner.__file__).resolve().parent / "reference" / "index.csv")
    rows = _produced_by()
    assert sorted((r["paper"], r["table"]) for r in rows) == sorted(zip(index["paper"], index["table"]))
    books = {book.stem for book in runner.discover()}
    for row in rows:
        produced = bool(row["notebook"]) or bool(row["result_tables"])
        assert produced != bool(row["skip_reason"]), row          # one or the other, never both or neither
        if produced:
            assert row["notebook"] in books and NOTEBOOK_PAPERS[row["notebook"]] == row["paper"], row
            assert row["result_tables"].split(), row


@pytest.mark.timeout(3600)
@pytest.mark.notebook
@pytest.mark.slow
def test_paper_dry_run_writes_every_paper_table_it_is_mapped_to(paper_dry_run):
    """Every paper table mapped to a notebook is written by the dry run."""
    _, out = paper_dry_run
    missing = []
    for row in _produced_by():
        written = {p.stem for p in (out / row["notebook"] / "tables").glob("*.csv")} if row["notebook"] else set()
        missing += [(row["paper"], row["table"], glob) for glob in row["result_tables"].split()
                    if not fnmatch.filter(written, glob)]
    assert not missing, missing
