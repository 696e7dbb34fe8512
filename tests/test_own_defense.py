"""A defense of one's own through notebook 09's evaluation (lib.benchmark.evaluate_defense and its command), and the
README's worked example run exactly as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from lib.benchmark import evaluate_defense, load_defense, main, own_factory
from lib.defenses.base import Built, Defense, NoDefense

REPO = Path(__file__).resolve().parents[1]


def _readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block in README.md's section "Evaluate your own defense"."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Evaluate your own defense\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


class Identity(Defense):
    """Returns its input: it must score exactly as the registered `none`."""

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_defense_defined_here_is_evaluated_like_the_registered_ones(tmp_path):
    result = evaluate_defense(Identity, profile="smoke", dataset="digits", name="mine", beside=["none"], out=tmp_path)
    for norm, board in result.leaderboards.items():
        rows = board.set_index("defense")
        assert set(rows.index) == {"none", "mine"} and rows.loc["mine", "name"] == "mine"
        same = [c for c in board.columns if c.startswith(("clean_acc", "worst_", "white:", "gray:", "black:"))]
        assert rows.loc["mine", same].tolist() == rows.loc["none", same].tolist(), norm   # same attacks, same results
    mine = result.per_example[result.per_example.defense == "mine"].drop(columns="defense").reset_index(drop=True)
    none = result.per_example[result.per_example.defense == "none"].drop(columns="defense").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, none)
    assert set(result.per_example.threat) == {"black", "gray", "white"} and len(mine) % 48 == 0
    assert set(result.sanity.defense) == {"mine", "none"} and set(result.sanity.status) <= {"PASS", "WARN", "n/a"}
    assert len(result.sanity[result.sanity.defense == "mine"]) == 6
    saved = {p.name for p in (tmp_path / "tables").iterdir()}
    assert {"digits_leaderboard_linf.csv", "digits_leaderboard_l2.csv", "digits_per_example.csv.gz",
            "digits_sanity.csv", "digits_all_rows.csv"} <= saved
    assert "## digits, linf 0.1: leaderboard" in result.summary() and "## Sanity checks" in result.summary()


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    blocks = _readme_blocks()
    assert [lang for lang, _ in blocks] == ["python", "bash", "python"]
    assert blocks[0][1] == (REPO / "examples" / "gaussian_blur_defense.py").read_text()
    env = {**os.environ, "ADV_RESULTS_DIR": str(tmp_path / "results"), "OMP_NUM_THREADS": "1", "ADV_DATA_DOWNLOAD": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(blocks[1][1], shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    board = done.stdout.split("## digits, linf 0.1: leaderboard", 1)[1].split("##", 1)[0]
    assert re.search(r"^\| gaussianblur\s+\| linf 0.1", board, flags=re.M), board
    assert {"No defense", "Median filter 2x2"} <= {line.split("|")[1].strip() for line in board.splitlines() if "| linf" in line}
    sanity = done.stdout.split("## Sanity checks", 1)[1]
    assert re.search(r"^\| gaussianblur\s+\|( (PASS|WARN|n/a)\s+\|){6}$", sanity, flags=re.M), sanity
    assert (tmp_path / "results" / "smoke" / "own_defenses" / "gaussianblur" / "tables" / "digits_per_example.csv.gz").is_file()

    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path / "api"))
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(compile(blocks[2][1], "README.md", "exec"), scope)
    result = scope["result"]
    assert list(result.leaderboards["linf"].defense) == ["blur"] and set(result.sanity.defense) == {"blur"}


def test_the_defense_can_be_an_instance_a_class_or_a_factory(digits_model):
    built = own_factory(NoDefense())({}, "digits", digits_model)
    assert isinstance(built, Built) and built.classifier is digits_model
    assert isinstance(own_factory(NoDefense)({}, "digits", digits_model).defense, NoDefense)
    own = Built(NoDefense(), torch.nn.Identity())
    assert own_factory(lambda profile, dataset, classifier, *, device=None: own)({}, "digits", digits_model) is own
    with pytest.raises(TypeError, match="returned int"):
        own_factory(lambda profile, dataset, classifier, *, device=None: 3)({}, "digits", digits_model)
    for wrong in (torch.nn.Identity, torch.nn.Identity(), "blur"):
        with pytest.raises(TypeError, match="must be a lib.defenses.base.Defense"):
            own_factory(wrong)


def test_bad_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="other than a registered defense"):
        evaluate_defense(Identity, name="jpeg")
    with pytest.raises(ValueError, match="beside must be a list of registered defenses"):
        evaluate_defense(Identity, beside=["magic"])
    with pytest.raises(ValueError, match="no settings for dataset 'cifar10'"):
        evaluate_defense(Identity, dataset="cifar10", out=tmp_path)
    with pytest.raises(ValueError, match="path/to/file.py:Name"):
        load_defense("examples/gaussian_blur_defense.py")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_defense("nowhere.py:X")
    with pytest.raises(ValueError, match="defines no 'Nope'"):
        load_defense("examples/gaussian_blur_defense.py:Nope")
    assert load_defense("lib.defenses.base:NoDefense") is NoDefense
    with pytest.raises(SystemExit):
        main(["--defense", "nowhere.py:X"])
